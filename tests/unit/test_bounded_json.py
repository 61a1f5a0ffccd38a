"""Hostile but well-formed JSON never ends a reader: every value from the DCS, Kafka or the journal
is decoded within bounds (fsm/bounded_json.py); one that breaks them is skipped, counted and named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from events.dcs.base import build_view
from events.kafka import decode
from events.sinks import read_journal
from fsm import bounded_json
from fsm.records import Record

HOSTILE = {
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "deep-object": b'{"a":' * 5000 + b"1" + b"}" * 5000,
    "long-int": b'{"lsn": ' + b"9" * 5000 + b"}",
    "int-past-u64": b'{"lsn": 18446744073709551616}',
    "nan": b'{"lsn": NaN}',
    "infinity": b'{"at": Infinity}',
    "overflowing-float": b'{"at": 1e400}',
    "not-utf8": b'{"name": "\xff"}',
    "huge": b'{"x": "' + b"a" * (2 << 20) + b'"}',
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_values_are_refused_with_a_value_error_naming_why(name: str) -> None:
    with pytest.raises(ValueError) as e:
        bounded_json.loads(HOSTILE[name])
    assert str(e.value)  # a reason, never an empty message


def test_values_this_project_writes_pass() -> None:
    member = {"lsn": 2**64 - 1, "timeline": 3, "tags": {"nofailover": False}, "at": 1.5e9}
    assert bounded_json.loads(json.dumps(member)) == member
    assert bounded_json.loads(json.dumps([[[[[[1]]]]]])) == [[[[[[1]]]]]]


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_key_in_the_dcs_is_skipped_and_the_view_goes_on(name: str) -> None:
    base = "/pgsidecar/c/"
    good = json.dumps({"role": "replica", "lsn": 5}).encode()
    view = build_view(
        base,
        [
            (base + "members/bad", HOSTILE[name], 3, True),
            (base + "switchover", HOSTILE[name], 4, True),
            (base + "members/good", good, 5, True),
            (base + "leader", b"good", 6, True),
        ],
        index=6,
    )
    assert set(view.members) == {"good"} and view.switchover is None
    assert view.leader is not None and view.leader.name == "good"
    assert {k for k, _ in view.malformed} == {base + "members/bad", base + "switchover"}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_kafka_record_is_a_value_error(name: str) -> None:
    with pytest.raises(ValueError):
        decode(HOSTILE[name])


def test_a_hostile_journal_line_is_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    good = Record("input", "c", "n", 1, 1.0, None, {"type": "timer"})
    with open(path, "wb") as fh:
        fh.write(HOSTILE["deep"] + b"\n" + HOSTILE["long-int"] + b"\n")
        fh.write(json.dumps(good.to_dict()).encode() + b"\n")
    records, skipped = read_journal(path)
    assert [lineno for lineno, _ in skipped] == [1, 2]
    assert records == [good]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=50,
)


@given(json_values)
def test_any_value_decodes_within_bounds_or_raises_value_error(value: object) -> None:
    try:
        raw = json.dumps(value)
    except ValueError:
        return
    try:
        out = bounded_json.loads(raw)
    except ValueError:
        return
    bounded_json.check(out)  # what comes out is within the bounds
