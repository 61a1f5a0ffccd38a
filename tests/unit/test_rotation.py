"""Size-bounded, rotated files (events/rotation.py): the journal, and reading a rotated journal as
one stream in ``pgsidecar history`` / ``replay``; the seq that continues after a rotation; the
settings."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from events.rotation import RotatingLines, rotate_if_larger, rotated_files
from events.sinks import JournalSink, read_journal
from fsm.machine import Role
from fsm.records import Record
from pgsidecar.agent.recorder import SeqStore
from pgsidecar.cli import build_parser
from pgsidecar.config import AgentConfig, LogRotation
from tests.support.agent_fakes import Rig


def test_rotating_lines_keeps_each_file_under_the_bound_and_drops_the_oldest(
    tmp_path: Path,
) -> None:
    path = tmp_path / "x.log"
    f = RotatingLines(path, max_bytes=100, backups=2)
    for i in range(30):
        f.write(f"line {i:02d} " + "." * 10)  # 19 bytes with the newline: 5 per file
    f.close()
    assert [p.name for p in rotated_files(path)] == ["x.log.2", "x.log.1", "x.log"]
    assert all(p.stat().st_size <= 100 for p in rotated_files(path))
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in rotated_files(path))
    kept = [line[:7] for p in rotated_files(path) for line in p.read_text().splitlines()]
    # the newest lines, in order, oldest first; the ones before were rotated away
    assert kept == [f"line {i:02d}" for i in range(30 - len(kept), 30)]
    assert len(kept) == 15


def test_rotating_lines_refuses_a_setting_that_would_never_rotate(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="backups"):
        RotatingLines(tmp_path / "x", max_bytes=100, backups=0)


def test_a_failed_write_raises_instead_of_printing(tmp_path: Path) -> None:
    f = RotatingLines(tmp_path / "x", max_bytes=1000, backups=1)
    f.write("a")
    f._handler.stream.close()  # what a write to a lost disk looks like from here
    with pytest.raises(ValueError):
        f.write("b")


def test_rotate_if_larger(tmp_path: Path) -> None:
    path = tmp_path / "fence.log"
    assert not rotate_if_larger(path, 10, 2)  # missing: nothing to do
    path.write_text("small\n")
    assert not rotate_if_larger(path, 10, 2)
    for text in ("first run, long enough\n", "second run, long enough\n", "third one\n"):
        path.write_text(text)
        assert rotate_if_larger(path, 10, 2)
        assert not path.exists()  # the writer begins the new one
    assert (tmp_path / "fence.log.1").read_text() == "third one\n"
    assert (tmp_path / "fence.log.2").read_text() == "second run, long enough\n"
    assert not (tmp_path / "fence.log.3").exists()


def test_rotated_files_orders_by_number_not_by_name(tmp_path: Path) -> None:
    for name in ("j", "j.1", "j.2", "j.10", "j.x", "jj.1"):
        (tmp_path / name).write_text("")
    assert [p.name for p in rotated_files(tmp_path / "j")] == ["j.10", "j.2", "j.1", "j"]
    assert rotated_files(tmp_path / "missing") == []


# ------------------------------------------------------------------ the journal


async def recorded_life(tmp_path: Path) -> list[Record]:
    """Every record of an in-memory agent that bootstraps, leads and stops."""
    rig = Rig(tmp_path)
    run = asyncio.ensure_future(rig.agent.run())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not (rig.agent.state.role is Role.MASTER and not rig.agent.snapshot.busy):
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    rig.agent.request_stop()
    assert await asyncio.wait_for(run, 10) == 0
    return list(rig.sink.records)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    args = build_parser().parse_args(list(argv))
    rc = args.func(args)
    return rc, capsys.readouterr().out


async def test_history_and_replay_read_a_rotated_journal_as_one_stream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = await recorded_life(tmp_path / "agent")
    assert len(records) > 20

    whole = tmp_path / "whole" / "journal.jsonl"
    rotated = tmp_path / "rotated" / "journal.jsonl"
    one = JournalSink(whole)
    many = JournalSink(rotated, max_bytes=1500, backups=1000)
    for rec in records:
        one.emit(rec)
        many.emit(rec)
    await one.close()
    await many.close()
    files = rotated_files(rotated)
    assert len(files) > 3, "the journal was rotated"
    assert all(p.stat().st_size <= 1500 for p in files)

    got, skipped = read_journal(rotated)
    assert skipped == []
    assert [(r.node, r.seq) for r in got] == [(r.node, r.seq) for r in records]

    capsys.readouterr()  # the agent's own log lines
    for command in (("history",), ("history", "--json"), ("replay",)):
        rc_whole, out_whole = run_cli(capsys, *command, "--journal", str(whole))
        rc_rotated, out_rotated = run_cli(capsys, *command, "--journal", str(rotated))
        assert (rc_rotated, out_rotated) == (rc_whole, out_whole)
    assert rc_rotated == 0 and ": ok" in out_rotated
    inputs = sum(1 for r in records if r.kind == "input")
    assert f"{inputs} inputs replayed" in out_rotated


def test_a_bad_line_in_a_rotated_file_is_skipped_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    rec = Record("input", "c", "n", 1, 1.0, None, {"type": "start", "data": {}})
    (tmp_path / "journal.jsonl.1").write_text("not json\n")
    path.write_text(json.dumps(rec.to_dict()) + "\n")
    recs, skipped = read_journal(path)
    assert [r.seq for r in recs] == [1]
    assert len(skipped) == 1 and skipped[0][0] == 1
    assert skipped[0][1].startswith("journal.jsonl.1: ")


def test_read_journal_without_any_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_journal(tmp_path / "journal.jsonl")


def test_seq_continues_above_a_rotated_journal(tmp_path: Path) -> None:
    """Right after a rotation the journal is empty; without state.json (a lost reservation) seq
    must still continue above what the rotated file holds."""
    rec = Record("input", "c", "n", 4321, 1.0, None, {"type": "start", "data": {}})
    (tmp_path / "journal.jsonl.1").write_text(json.dumps(rec.to_dict()) + "\n")
    (tmp_path / "journal.jsonl").write_text("")
    assert SeqStore(tmp_path / "state.json").next() == 4322


def test_journal_sink_rotates_and_fsyncs_transitions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal.jsonl"
    sink = JournalSink(path, max_bytes=600, backups=2)
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    for seq in range(1, 20):
        sink.emit(Record("input", "c", "n", seq, 1.0, None, {"type": "start", "data": {}}))
    rotations = len(fsyncs)  # the directory, once per rotation
    body = {"from": "init", "to": "replica", "trigger": "start_replica", "reason": "r"}
    sink.emit(Record("transition", "c", "n", 20, 1.0, None, body))
    assert len(fsyncs) > rotations  # the transition (after a rotation it needed, maybe)
    assert len(rotated_files(path)) == 3
    recs, _ = read_journal(path)
    assert recs[-1].seq == 20 and recs[-1].kind == "transition"
    assert [r.seq for r in recs] == sorted(r.seq for r in recs)


# ------------------------------------------------------------------ settings


def test_settings_defaults_and_bounds(tmp_path: Path) -> None:
    cfg = AgentConfig.model_validate(
        {
            "name": "pg-1",
            "cluster": "pg",
            "state_dir": str(tmp_path),
            "postgresql": {"data_dir": str(tmp_path / "data")},
        }
    )
    assert (cfg.log_rotation.max_bytes, cfg.log_rotation.backups) == (64 * 1024 * 1024, 4)
    with pytest.raises(ValueError):
        LogRotation(backups=0)
    with pytest.raises(ValueError):
        LogRotation(max_bytes=1000)
