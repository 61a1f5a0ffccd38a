"""Bad input, tried on purpose (hypothesis), on every parser that takes outside data: the agent
config, values read from DCS keys, Kafka / journal records, recorded inputs. For any input: no
crash, a clear error (ConfigError / ValueError naming the problem) or a counted skip, and never a
transition taken on garbage. The number of cases each test ran is printed with -s (hypothesis
statistics: `pytest --hypothesis-show-statistics`)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events.dcs.base import decode_json_object
from events.sinks import read_journal
from fsm.inputs import Input, member_view, step
from fsm.machine import Role
from fsm.records import Record
from fsm.snapshot import Snapshot
from pgsidecar.config import ConfigError, load_config

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)

# The unit tier runs a sample of each search (hypothesis's default count);
# tests/sim/test_deep_searches.py runs the same tests with several times more examples.
UNIT_EXAMPLES = 100

VALID = {
    "name": "pg1",
    "cluster": "c",
    "state_dir": "/tmp/x",
    "postgresql": {"data_dir": "/tmp/x/pgdata", "port": 5432},
}
FIELDS = [
    ("name",),
    ("cluster",),
    ("postgresql", "port"),
    ("postgresql", "data_dir"),
    ("postgresql", "superuser", "password"),
    ("settings", "ttl"),
    ("settings", "synchronous_mode"),
    ("dcs", "type"),
    ("dcs", "etcd", "endpoints"),
    ("api", "port"),
    ("tags", "failover_priority"),
    ("kafka", "bootstrap_servers"),
    ("bogus",),
]


@settings(max_examples=UNIT_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FIELDS), json_value)
def test_config_any_value_is_accepted_or_a_clear_error(path: tuple[str, ...], value: Any) -> None:
    data = json.loads(json.dumps(VALID))
    node = data
    for p in path[:-1]:
        node = node.setdefault(p, {})
    node[path[-1]] = value
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(data, fh)
    try:
        load_config(fh.name, environ={})
    except ConfigError as exc:
        msg = str(exc)
        assert msg.startswith("invalid configuration") or "password_file" in msg
        # the message names the field, never echoes the value (it may be a secret)
        assert path[0] in msg or "top level" in msg
        if isinstance(value, str) and len(value) > 3 and path[-1] == "password":
            assert value not in msg
    finally:
        Path(fh.name).unlink()


@settings(max_examples=UNIT_EXAMPLES, deadline=None)
@given(st.binary(max_size=200))
def test_config_file_of_random_bytes_is_a_clear_error(raw: bytes) -> None:
    with tempfile.NamedTemporaryFile("wb", suffix=".yaml", delete=False) as fh:
        fh.write(raw)
    try:
        # random bytes are never a complete config: always an error, never a silent success
        with pytest.raises(ConfigError) as info:
            load_config(fh.name, environ={})
    finally:
        Path(fh.name).unlink()
    msg = str(info.value)
    # clear: it names the file and the problem (which field, for a mapping that fails validation)
    assert fh.name in msg, msg
    problems = (
        "is not UTF-8 text",
        "is not valid YAML",
        "must hold a mapping at the top level",
        "invalid configuration in",
    )
    assert any(p in msg for p in problems), msg
    if "invalid configuration in" in msg:
        fields = [ln for ln in msg.splitlines()[1:] if ln.startswith("  ") and ": " in ln]
        assert fields, f"names no field: {msg!r}"


@settings(max_examples=UNIT_EXAMPLES, deadline=None)
@given(st.binary(max_size=120))
def test_dcs_json_values_decode_or_give_a_reason(raw: bytes) -> None:
    value, reason = decode_json_object("k", raw)
    assert (value is None) != (reason is None) or raw == b""
    if value is not None:
        assert isinstance(value, dict)


@settings(max_examples=UNIT_EXAMPLES, deadline=None)
@given(json_value)
def test_member_values_of_any_shape_never_crash(value: Any) -> None:
    mv = member_view("m", value)
    if mv is not None:
        assert mv.failover_priority >= 0 and (mv.lsn is None or isinstance(mv.lsn, int))


@settings(max_examples=UNIT_EXAMPLES, deadline=None)
@given(json_value)
def test_records_decode_or_raise_value_error(value: Any) -> None:
    try:
        rec = Record.from_dict(value)
    except ValueError:
        return
    assert isinstance(rec.seq, int) and isinstance(rec.body, dict)


@settings(max_examples=UNIT_EXAMPLES, deadline=None)
@given(json_value, st.sampled_from(["input", "transition", "action", "bogus"]))
def test_records_with_a_valid_envelope_and_any_body(body: Any, kind: str) -> None:
    data = {
        "schema": "pgsidecar.record/1",
        "kind": kind,
        "cluster": "c",
        "node": "n",
        "seq": 1,
        "time": 1.0,
        "term": None,
        "body": body,
    }
    try:
        Record.from_dict(data)
    except ValueError as exc:
        assert str(exc)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=60).map(lambda b: b.decode("latin-1")), json_value.map(json.dumps)
        ),
        max_size=20,
    )
)
def test_journal_lines_are_skipped_and_counted_not_fatal(lines: list[str]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as fh:
        fh.write("\n".join(line.replace("\n", " ") for line in lines) + "\n")
    try:
        recs, skipped = read_journal(Path(fh.name))
        text = "\n".join(line.replace("\n", " ") for line in lines)
        assert len(recs) + len(skipped) <= len(text.splitlines()) + 1
        for lineno, reason in skipped:
            assert lineno >= 1 and reason
    finally:
        Path(fh.name).unlink()


@settings(max_examples=UNIT_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["dcs", "pg", "lease", "effect", "peer", "pod", "timer"]),
    st.dictionaries(st.text(max_size=12), json_value, max_size=8),
)
def test_recorded_inputs_with_garbage_data_never_crash_nor_promote(
    kind: str, data: dict[str, Any]
) -> None:
    """An input written by another version (or by hand) with arbitrary data: the fold and the
    decision never crash, and garbage never makes a replica master."""
    s = Snapshot(name="pg1")
    s, _, _ = step(Role.INIT, s, Input("start", 0.0, {"settings": {"ttl": 10.0}}))
    for role in (Role.INIT, Role.REPLICA, Role.CANDIDATE):
        _, taken, _ = step(role, s, Input(kind, 1.0, data))
        assert all(dest is not Role.MASTER for _, _, dest in taken)


@settings(max_examples=UNIT_EXAMPLES, deadline=None)
@given(json_value)
def test_input_envelope_decode(value: Any) -> None:
    try:
        Input.from_dict(value)
    except ValueError as exc:
        assert str(exc)
