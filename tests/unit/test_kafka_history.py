"""``pgsidecar history`` formatting (pgsidecar/history.py), from a journal (the same from the topic:
tests/e2e/test_kafka_history_topic.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from events.kafka import journal_skipped
from events.sinks import JournalSink, merge_by_time, read_journal
from fsm.records import Record, Transition
from pgsidecar.history import (
    format_history,
    format_json_lines,
    format_lsn,
    format_table,
    parse_since,
    role_changes,
)

T0 = 1_700_000_000.0


def failover() -> list[Record]:
    """A small recorded failover: pg-2 was master, pg-1 takes over, pg-2 comes back as replica."""

    def tr(node: str, seq: int, dt: float, src: str, dst: str, trig: str, why: str, term: int | None,
           tl: int, lsn: int) -> Record:  # fmt: skip
        return Transition("c1", node, seq, T0 + dt, src, dst, trig, why, term, tl, lsn).to_record()

    return [
        tr(
            "pg-2",
            1,
            0.0,
            "init",
            "master",
            "bootstrap",
            "initialized the cluster",
            1,
            1,
            0x3000028,
        ),
        tr(
            "pg-1",
            1,
            0.5,
            "init",
            "replica",
            "leader_seen",
            "pg-2 holds the leader key",
            1,
            1,
            0x3000060,
        ),
        Record("input", "c1", "pg-1", 2, T0 + 1, 1, {"type": "pg", "data": {}}),
        tr(
            "pg-1",
            3,
            10.0,
            "replica",
            "candidate",
            "leader_gone",
            "leader key expired",
            1,
            1,
            0x5000000,
        ),
        tr(
            "pg-1", 4, 10.2, "candidate", "master", "lease_acquired", "won the key", 7, 2, 0x5000000
        ),
        tr("pg-2", 2, 12.0, "master", "demoted", "lease_lost", "could not renew", 1, 1, 0x5000100),
        tr(
            "pg-2", 3, 14.0, "demoted", "rewinding", "timeline_forked", "pg_rewind", 7, 1, 0x5000100
        ),
        tr(
            "pg-2", 4, 16.0, "rewinding", "replica", "rewound", "streams from pg-1", 7, 2, 0x5000200
        ),
    ]


def test_role_changes_keep_transitions_only_per_node_order_and_dedup() -> None:
    recs = failover()
    changes = role_changes(recs + recs[:2])  # duplicates from a resend after a crash
    assert [(c.node, c.seq) for c in changes] == [
        ("pg-2", 1), ("pg-1", 1), ("pg-1", 3), ("pg-1", 4), ("pg-2", 2), ("pg-2", 3), ("pg-2", 4),
    ]  # fmt: skip
    assert [c.seq for c in role_changes(recs, node="pg-2")] == [1, 2, 3, 4]
    assert [c.seq for c in role_changes(recs, since=T0 + 11)] == [2, 3, 4]


def test_merge_keeps_seq_order_when_a_clock_steps_back() -> None:
    a1 = Record("transition", "c", "a", 1, T0 + 5, 1, {})
    a2 = Record("transition", "c", "a", 2, T0 + 1, 1, {})  # the clock of a stepped back
    b1 = Record("transition", "c", "b", 1, T0 + 3, 1, {})
    merged = merge_by_time([a2, b1, a1])
    assert [(r.node, r.seq) for r in merged if r.node == "a"] == [("a", 1), ("a", 2)]


def test_table_has_a_section_per_node_with_current_role() -> None:
    text = format_table(role_changes(failover()), skipped=["line 7: unknown schema 'x'"])
    lines = text.splitlines()
    assert lines[0].startswith(
        "pg-2: replica since 2023-11-14T22:13:36.000Z (term 7, timeline 2; 4 transitions)"
    )
    assert any(line.startswith("pg-1: master since") for line in lines)
    row = next(line for line in lines if "candidate -> master" in line)
    for cell in ("lease_acquired", " 7 ", "0/5000000", "won the key", "2023-11-14T22:13:30.200Z"):
        assert cell in row
    assert "1 record skipped:" in text and "line 7: unknown schema 'x'" in text
    assert format_table([]) == "no transitions recorded\n"


def test_json_lines() -> None:
    out = format_json_lines(role_changes(failover(), node="pg-1"))
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["from"], r["to"]) for r in rows] == [
        ("init", "replica"),
        ("replica", "candidate"),
        ("candidate", "master"),
    ]
    last = rows[-1]
    assert last["term"] == 7 and last["timeline"] == 2 and last["lsn"] == "0/5000000"
    assert last["lsn_bytes"] == 0x5000000 and last["ts"] == T0 + 10.2
    assert last["time"] == "2023-11-14T22:13:30.200Z" and last["trigger"] == "lease_acquired"
    assert format_history(failover(), as_json=True, node="nobody") == ""


def test_lsn_and_since_parsing() -> None:
    assert format_lsn(0x16B374D848) == "16/B374D848"
    assert format_lsn(None) is None
    now = 1_700_000_000.0
    assert parse_since("10m", now) == now - 600
    assert parse_since("2h", now) == now - 7200
    assert parse_since("1700000000.5", now) == 1_700_000_000.5
    assert parse_since("2023-11-14T22:13:20Z", now) == 1_700_000_000.0
    assert parse_since("2023-11-14T22:13:20", now) == 1_700_000_000.0  # UTC unless it says
    with pytest.raises(ValueError, match="--since"):
        parse_since("yesterday-ish", now)


def test_history_from_a_journal_with_a_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    sink = JournalSink(path)
    for r in failover():
        sink.emit(r)
    asyncio.run(sink.close())
    with open(path, "a") as fh:
        fh.write("{not json\n")
    records, skipped = read_journal(path)
    text = format_history(records, skipped=journal_skipped(skipped))
    assert "pg-1: master since" in text
    assert "1 record skipped:" in text and "line 9:" in text
