"""The transition table, exhaustively: every (state, trigger) pair is either a row of the table
(and the machine takes it to the row's destination) or rejected by the machine."""

from __future__ import annotations

import pytest
from transitions import MachineError

from fsm.machine import EFFECT, TABLE, TRIGGERS, Decision, Role, RoleMachine
from fsm.snapshot import Snapshot

PAIRS = [(role, trigger) for role in Role for trigger in TRIGGERS]


@pytest.mark.parametrize(("role", "trigger"), PAIRS, ids=[f"{r.value}-{t}" for r, t in PAIRS])
def test_every_state_trigger_pair_is_defined_or_rejected(role: Role, trigger: str) -> None:
    rows = [row for row in TABLE if row.source is role and row.trigger == trigger]
    m = RoleMachine("c", "n", initial=role)
    s = Snapshot(name="n")
    if rows:
        assert len(rows) == 1, "a (state, trigger) pair must have exactly one row"
        tr = m.fire(Decision(trigger, "because"), s, seq=7, wall_time=1.0)
        assert m.role is rows[0].dest
        assert (tr.source, tr.dest, tr.trigger, tr.seq, tr.reason) == (
            role.value,
            rows[0].dest.value,
            trigger,
            7,
            "because",
        )
    else:
        with pytest.raises(MachineError):
            m.fire(Decision(trigger, "x"), s, seq=1, wall_time=1.0)
        assert m.role is role, "a rejected trigger must not change the role"


def test_every_row_says_why_and_has_an_effect() -> None:
    for row in TABLE:
        assert row.why.endswith(".") and len(row.why) > 30, row
        assert row.trigger in EFFECT, f"no effect bound to {row.trigger}"


def test_master_is_entered_only_by_winning_the_lease() -> None:
    # a standby leader already holds the lease it won as a candidate: the promotion marker only
    # lets it do what winning does in a normal cluster
    into_master = [
        row for row in TABLE if row.dest is Role.MASTER and row.source is not Role.MASTER
    ]
    assert [(r.source, r.trigger) for r in into_master] == [
        (Role.CANDIDATE, "won_lease"),
        (Role.STANDBY_LEADER, "promote_cluster"),
    ]
    into_standby_leader = [
        row
        for row in TABLE
        if row.dest is Role.STANDBY_LEADER and row.source is not Role.STANDBY_LEADER
    ]
    assert [(r.source, r.trigger) for r in into_standby_leader] == [
        (Role.CANDIDATE, "won_standby_lease")
    ]


def test_init_never_leads_to_a_writable_role_directly() -> None:
    # a former master comes back read-only (replica) or through rewinding, never as master
    assert {row.dest for row in TABLE if row.source is Role.INIT} <= {
        Role.INIT,
        Role.REPLICA,
        Role.REWINDING,
    }


def test_unknown_trigger_is_rejected() -> None:
    m = RoleMachine("c", "n")
    with pytest.raises(MachineError):
        m.fire(Decision("promote_yourself", "x"), Snapshot(name="n"), seq=1, wall_time=0)
