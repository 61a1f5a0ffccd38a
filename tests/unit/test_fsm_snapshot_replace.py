"""fsm.snapshot.replace: the fold's copy of a frozen snapshot, made without calling __init__,
must be what dataclasses.replace makes; and fsm.snapshot.direct_init's __init__ must be the
dataclass's own (the same parameters, defaults and instances)."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest

from fsm.snapshot import (
    DataState,
    DcsFacts,
    LeaderView,
    LeaseFacts,
    MemberView,
    PgFacts,
    Settings,
    Snapshot,
    direct_init,
    replace,
)


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


def as_generated(cls: type[Any]) -> type[Any]:
    """The same fields made into a frozen dataclass with the ``__init__`` @dataclass writes."""
    spec = [
        (f.name, f.type, dataclasses.field(default=f.default))
        if f.default is not dataclasses.MISSING
        else (f.name, f.type)
        for f in dataclasses.fields(cls)
    ]
    return dataclasses.make_dataclass(f"Generated{cls.__name__}", spec, frozen=True)


@pytest.mark.parametrize(
    ("cls", "args", "kwargs"),
    [
        (MemberView, ("m1",), {}),
        (MemberView, ("m2", "replica", 3), {"lsn": 5, "state": "running", "election": 2}),
        (PgFacts, (), {}),
        (PgFacts, (DataState.STANDBY, "sys"), {"running": True, "lsn": 9, "crashed": True}),
    ],
)
def test_direct_init_is_the_dataclass_init_with_one_dict_update(
    cls: type[Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    generated = as_generated(cls)
    assert cls.__init__ is not generated.__init__
    ours, theirs = inspect.signature(cls), inspect.signature(generated)
    assert [(p.name, p.default, p.kind) for p in ours.parameters.values()] == [
        (p.name, p.default, p.kind) for p in theirs.parameters.values()
    ]
    made, reference = cls(*args, **kwargs), generated(*args, **kwargs)
    assert vars(made) == vars(reference)
    assert made == cls(*args, **kwargs) and hash(made) == hash(cls(*args, **kwargs))
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.running = True
    with pytest.raises(TypeError):
        cls(*args, nope=1, **kwargs)


def test_direct_init_refuses_what_it_cannot_copy() -> None:
    with pytest.raises(TypeError, match="plain fields"):
        direct_init(DcsFacts)  # a default_factory
    with pytest.raises(TypeError, match="without them"):

        @direct_init
        @dataclasses.dataclass(frozen=True)
        class WithPostInit:
            x: int = 0

            def __post_init__(self) -> None:
                pass
