"""fsm.snapshot.replace: the fold's copy of a frozen snapshot, made without calling __init__,
must be what dataclasses.replace makes."""

from __future__ import annotations

import dataclasses

import pytest

from fsm.snapshot import DcsFacts, LeaderView, LeaseFacts, Settings, Snapshot, replace


def snapshot() -> Snapshot:
    return Snapshot(
        name="m1",
        now=3.5,
        dcs=DcsFacts(reachable=True, leader=LeaderView("m2", 7)),
        lease=LeaseFacts(held=False),
        settings=Settings(ttl=5.0),
        pods_gone=frozenset({"m3"}),
        extra={"base_settings": Settings()},
    )


def test_it_makes_what_dataclasses_replace_makes() -> None:
    s = snapshot()
    changes = {"now": 9.0, "busy": "start", "lease": LeaseFacts(held=True, term=7)}
    fast, slow = replace(s, **changes), dataclasses.replace(s, **changes)
    assert fast == slow
    assert type(fast) is Snapshot
    assert {f.name: getattr(fast, f.name) for f in dataclasses.fields(Snapshot)} == {
        f.name: getattr(slow, f.name) for f in dataclasses.fields(Snapshot)
    }
    assert s.now == 3.5 and s.busy is None  # the original is untouched
    assert replace(s.settings, ttl=2.0) == Settings(ttl=2.0)


def test_the_copy_stays_frozen_and_an_unknown_field_is_refused() -> None:
    copy = replace(snapshot(), now=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        copy.now = 2.0  # type: ignore[misc]
    with pytest.raises(TypeError, match="no field 'nope'"):
        replace(copy, nope=1)
