"""Hostile but well-formed JSON never ends a reader: every value from the DCS, Kafka or the journal
is decoded within bounds (fsm/bounded_json.py); one that breaks them is skipped, counted and named."""

from __future__ import annotations

import json
import math
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


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([2**64 - 1, 2**64, -(2**64) + 1, -(2**64)])
    | st.floats()
    | st.text()
)
json_trees = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=30,
)
# wrapped in 0 to 40 lists, so that depths on both sides of the bound are drawn
json_values = st.tuples(json_trees, st.integers(0, 40)).map(lambda t: _wrap(t[0], t[1]))


def _wrap(value: object, levels: int) -> object:
    for _ in range(levels):
        value = [value]
    return value


def _within_bounds(value: object) -> bool:
    """The documented bounds, restated independently of fsm/bounded_json.py: depth, integer range,
    finite floats (a dict or list counts one level; a scalar none)."""

    def walk(v: object, depth: int) -> bool:
        if isinstance(v, dict | list):
            if depth > bounded_json.MAX_DEPTH:
                return False
            children = v.values() if isinstance(v, dict) else v
            return all(walk(c, depth + 1) for c in children)
        if isinstance(v, bool):
            return True
        if isinstance(v, int):
            return abs(v) < 2**64
        if isinstance(v, float):
            return math.isfinite(v)
        return True

    return walk(value, 1)


@given(json_values)
def test_a_value_within_the_bounds_round_trips_and_one_outside_is_refused(value: object) -> None:
    raw = json.dumps(value)  # Python writes NaN and Infinity, which loads must refuse
    if _within_bounds(value):
        out = bounded_json.loads(raw)
        # NaN never compares equal, and within bounds there is none: plain equality holds
        assert out == value
    else:
        with pytest.raises(ValueError) as e:
            bounded_json.loads(raw)
        assert str(e.value)
