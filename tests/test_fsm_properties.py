"""Property tests (hypothesis): whatever the inputs, in whatever order, a node is never master
without holding the lease, and the machine never takes a transition the table does not have."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsm.inputs import Input, step
from fsm.machine import TABLE, Role, lease_valid
from fsm.snapshot import Snapshot

NAMES = ["pg1", "pg2", "pg3"]
ME = "pg1"

lsns = st.integers(min_value=0, max_value=2**40)
tls = st.integers(min_value=1, max_value=5)

member = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["master", "replica", "demoted", "candidate"]),
        "lsn": st.one_of(st.none(), lsns),
        "timeline": st.one_of(st.none(), tls),
        "running": st.booleans(),
        "streaming": st.booleans(),
        "host": st.just("127.0.0.1"),
        "port": st.just(5432),
        "election": st.one_of(st.none(), st.integers(0, 50)),
        "nofailover": st.booleans(),
    }
)
garbage = st.one_of(
    st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2)
)

dcs_input = st.fixed_dictionaries(
    {
        "leader": st.one_of(
            st.none(),
            st.fixed_dictionaries({"name": st.sampled_from(NAMES), "term": st.integers(1, 60)}),
            garbage,
        ),
        "members": st.dictionaries(
            st.sampled_from(NAMES + ["x"]), st.one_of(member, garbage), max_size=4
        ),
        "initialize": st.one_of(st.none(), st.sampled_from(NAMES)),
        "config": st.one_of(st.none(), st.fixed_dictionaries({"pause": st.booleans()}), garbage),
        "switchover": st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {"from": st.sampled_from(NAMES), "to": st.one_of(st.none(), st.sampled_from(NAMES))}
            ),
        ),
        "index": st.integers(0, 80),
    }
)
pg_input = st.fixed_dictionaries(
    {
        "data": st.sampled_from(
            [
                "unknown",
                "missing",
                "invalid",
                "standby",
                "primary_clean",
                "primary_crashed",
                "bogus",
            ]
        ),
        "running": st.booleans(),
        "accepting": st.booleans(),
        "in_recovery": st.one_of(st.none(), st.booleans()),
        "timeline": st.one_of(st.none(), tls),
        "lsn": st.one_of(st.none(), lsns),
        "receiver_streaming": st.booleans(),
        "crashed": st.booleans(),
        "start_failures": st.integers(0, 3),
    }
)
effect_input = st.fixed_dictionaries(
    {
        "name": st.sampled_from(
            [
                "bootstrap",
                "clone",
                "start_standby",
                "follow",
                "announce",
                "acquire",
                "promote",
                "start_primary",
                "fence",
                "handoff",
                "give_up",
                "rewind",
                "wipe",
                "diverged",
            ]
        ),
        "ok": st.booleans(),
        "won": st.booleans(),
        "term": st.one_of(st.none(), st.integers(0, 60)),
        "upstream": st.one_of(st.none(), st.sampled_from(NAMES)),
    }
)
lease_input = st.fixed_dictionaries(
    {"held": st.booleans(), "term": st.one_of(st.none(), st.integers(1, 60))}
)

inputs = st.one_of(
    st.tuples(st.just("dcs"), dcs_input),
    st.tuples(st.just("dcs_down"), st.just({})),
    st.tuples(st.just("pg"), pg_input),
    st.tuples(st.just("effect"), effect_input),
    st.tuples(st.just("lease"), lease_input),
    st.tuples(st.just("timer"), st.just({})),
    st.tuples(st.just("stop"), st.just({})),
    st.tuples(
        st.just("pod"),
        st.fixed_dictionaries(
            {
                "event": st.sampled_from(["ADDED", "MODIFIED", "DELETED", "BOGUS"]),
                "member": st.one_of(st.sampled_from(NAMES), garbage),
                "own": st.booleans(),
                "deleting": st.booleans(),
                "ready": st.booleans(),
            }
        ),
    ),
    st.tuples(
        st.just("peer"),
        st.fixed_dictionaries(
            {
                "node": st.sampled_from(NAMES),
                "dest": st.sampled_from(["master", "demoted"]),
                "term": st.integers(0, 10**6),
            }
        ),
    ),
)


def _master_start() -> tuple[Role, Snapshot, float]:
    """A node that has just become master the regular way (the prefix of a real bootstrap)."""
    from tests.test_fsm_decide import Node, dcs, pg

    n = Node(ME)
    n.feed("pg", **pg(running=False, data="standby"))
    n.feed("dcs", **dcs(None))
    n.feed("pg", **pg())
    n.done("start_standby", upstream=None)
    n.done("announce", term=0)
    n.feed("lease", held=True, term=5)
    n.done("acquire", won=True, term=5)
    assert n.role is Role.MASTER
    return n.role, n.s, n.t


def run(seq: list[tuple[str, dict[str, Any]]], dts: list[float], from_master: bool = False) -> None:
    role = Role.INIT
    s = Snapshot(name=ME)
    t = 0.0
    rows = {(r.source, r.trigger): r.dest for r in TABLE}
    if from_master:
        role, s, t = _master_start()
    else:
        s, _, _ = step(role, s, Input("start", t, {"settings": {"ttl": 10.0}}))
    for (kind, data), dt in zip(seq, dts, strict=False):
        t += dt
        s, taken, _ = step(role, s, Input(kind, t, data))
        for src, d, dest in taken:
            assert src is role and (role, d.trigger) in rows and rows[(role, d.trigger)] is dest
            role = dest
        if role is Role.MASTER:
            assert lease_valid(s), "master without a valid lease"
            leader = s.dcs.leader
            assert leader is None or leader.name == ME, "master while the key names another member"


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(inputs, min_size=1, max_size=40), st.lists(st.floats(0, 20), min_size=40, max_size=40)
)
def test_never_master_without_the_lease(
    seq: list[tuple[str, dict[str, Any]]], dts: list[float]
) -> None:
    run(seq, dts)


# Biased generator: drive a node towards mastership (won acquire + held lease are frequent), then
# lose the lease in every way, so the interesting paths are well covered, not just reachable.
biased = st.lists(
    st.one_of(
        st.tuples(
            st.just("effect"),
            st.fixed_dictionaries(
                {"name": st.just("acquire"), "won": st.just(True), "term": st.integers(1, 60)}
            ),
        ),
        st.tuples(
            st.just("lease"),
            st.fixed_dictionaries({"held": st.booleans(), "term": st.integers(1, 60)}),
        ),
        st.tuples(st.just("pg"), pg_input),
        st.tuples(st.just("dcs"), dcs_input),
        st.tuples(st.just("effect"), effect_input),
    ),
    min_size=5,
    max_size=60,
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(biased, st.lists(st.floats(0, 5), min_size=60, max_size=60))
def test_never_master_without_the_lease_biased(
    seq: list[tuple[str, dict[str, Any]]], dts: list[float]
) -> None:
    run(seq, dts)


def test_the_biased_generator_does_reach_master() -> None:
    """Guard against a vacuous property: the inputs above can make a node master."""
    from tests.test_fsm_decide import Node, dcs, member, pg

    n = Node("pg1")
    n.feed("pg", **pg(running=False, data="standby"))
    n.feed("dcs", **dcs(None))
    n.feed("pg", **pg())
    n.done("start_standby", upstream=None)
    n.done("announce", term=0)
    n.feed("lease", held=True, term=5)
    n.done("acquire", won=True, term=5)
    assert n.role is Role.MASTER
    n.feed("dcs", **{**dcs("pg1", 5, pg1=member("pg1")), "index": 5})
    assert n.role is Role.MASTER
    n.feed("dcs", **{**dcs(None), "index": 9})
    assert n.role is Role.DEMOTED, "a newer view without the key must demote"


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(inputs, min_size=1, max_size=40), st.lists(st.floats(0, 20), min_size=40, max_size=40)
)
def test_a_master_never_stays_master_without_the_lease(
    seq: list[tuple[str, dict[str, Any]]], dts: list[float]
) -> None:
    """From a real master, any input sequence: it leaves master as soon as the lease is gone."""
    run(seq, dts, from_master=True)
