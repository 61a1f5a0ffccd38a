"""The standby_leader role: a standby cluster's leader holds the lease but never writes, its
replicas follow it, and only the cluster's promotion marker makes it a master."""

from __future__ import annotations

from typing import Any

from fsm.machine import Role
from fsm.snapshot import STANDBY_SOURCE
from tests.unit.test_fsm_decide import LSN, Node, dcs, member, pg

PROMOTED = {"by": "operator", "at": 1.0}


def standby_dcs(
    leader: str | None = None, term: int = 10, promoted: bool = False, **members: dict[str, Any]
) -> dict[str, Any]:
    d = dcs(leader, term, **members)
    if promoted:
        d["standby_promoted"] = dict(PROMOTED)
    return d


def standby_leader(name: str = "pg1") -> Node:
    """A standby-cluster member that has just won the election: a standby leader."""
    n = Node(name, standby_cluster=True)
    n.feed("pg", **pg(running=False, data="standby"))
    assert n.feed("dcs", **standby_dcs(None)) == ["start_replica"]
    n.feed("pg", **pg())
    assert n.done("start_standby", upstream=None) == ["leader_lost"]
    assert n.done("announce", term=0) == ["race"]
    n.feed("lease", held=True, term=11)
    assert n.done("acquire", won=True, term=11) == ["won_standby_lease"]
    assert n.role is Role.STANDBY_LEADER and n.s.busy == "follow"
    assert n.done("follow", upstream=STANDBY_SOURCE) == []
    assert n.s.upstream == STANDBY_SOURCE
    return n


def test_winner_of_a_standby_cluster_follows_the_source_and_never_promotes() -> None:
    n = standby_leader()
    n.feed("dcs", **standby_dcs("pg1", 11, pg1=member("pg1", role="standby_leader")))
    assert n.role is Role.STANDBY_LEADER
    assert n.last.awaits == "lease_watchdog"
    assert "won_lease" not in n.log and "promote_cluster" not in n.log


def test_the_same_win_in_a_normal_cluster_promotes() -> None:
    # the row above would fail to matter if a normal cluster took the same path
    n = Node("pg1")
    n.feed("pg", **pg(running=False, data="standby"))
    n.feed("dcs", **dcs(None))
    n.feed("pg", **pg())
    n.done("start_standby", upstream=None)
    n.done("announce", term=0)
    n.feed("lease", held=True, term=11)
    assert n.done("acquire", won=True, term=11) == ["won_lease"]
    assert n.role is Role.MASTER


def test_failed_repointing_is_retried_after_its_back_off() -> None:
    n = Node("pg1", standby_cluster=True)
    n.feed("pg", **pg(running=False, data="standby"))
    n.feed("dcs", **standby_dcs(None))
    n.feed("pg", **pg())
    n.done("start_standby", upstream=None)
    n.done("announce", term=0)
    n.feed("lease", held=True, term=11)
    n.done("acquire", won=True, term=11)
    assert n.done("follow", ok=False) == []
    assert n.last.wake_at is not None
    assert n.wake() == ["follow_source"]
    assert n.role is Role.STANDBY_LEADER


def test_standby_leader_restarts_a_stopped_postgres_as_a_standby() -> None:
    n = standby_leader()
    assert n.feed("pg", **pg(running=False)) == ["restart_standby_leader"]
    assert n.s.busy == "start_standby" and n.role is Role.STANDBY_LEADER


def test_lost_lease_steps_down_to_replica_without_fencing() -> None:
    n = standby_leader()
    fired = n.feed("dcs", **standby_dcs("pg2", 12, pg2=member("pg2", role="standby_leader")))
    assert fired == ["standby_lease_lost"]
    assert n.role is Role.REPLICA and n.s.busy == "release"
    assert "lease_lost" not in n.log, "a standby leader's PostgreSQL has nothing to fence"
    n.feed("lease", held=False, term=None)
    # the released key's outcome: now a replica that follows the new standby leader
    assert n.done("release", released_term=None) == ["follow"]


def test_expired_lease_on_our_clock_steps_down() -> None:
    n = standby_leader()
    n.feed("lease", held=True, term=11, deadline=n.t + 1.0)
    assert n.feed("timer", dt=2.0) == ["standby_lease_lost"]
    assert n.role is Role.REPLICA


def test_replica_of_a_standby_cluster_follows_the_standby_leader() -> None:
    n = Node("pg2", standby_cluster=True)
    n.feed("pg", **pg(running=False, data="missing"))
    assert n.feed("dcs", **standby_dcs(None)) == []  # initialised by pg1: wait for its leader
    view = standby_dcs("pg1", 11, pg1=member("pg1", role="standby_leader"))
    assert n.feed("dcs", **view) == ["clone"]
    n.feed("pg", **pg(running=False, data="standby"))
    assert n.done("clone") == ["start_replica"]
    n.feed("pg", **pg())
    n.done("start_standby", upstream="pg1")
    assert n.role is Role.REPLICA and n.s.upstream == "pg1"


def test_failover_inside_a_standby_cluster_elects_a_standby_leader() -> None:
    n = Node("pg2", standby_cluster=True)
    n.feed("pg", **pg(running=False, data="standby"))
    n.feed("dcs", **standby_dcs("pg1", 11, pg1=member("pg1", role="standby_leader")))
    n.feed("pg", **pg())
    n.done("start_standby", upstream="pg1")
    assert n.feed("dcs", **standby_dcs(None, pg2=member("pg2"))) == ["leader_lost"]
    assert n.done("announce", term=11) == ["race"]
    n.feed("lease", held=True, term=14)
    assert n.done("acquire", won=True, term=14) == ["won_standby_lease"]
    assert n.role is Role.STANDBY_LEADER


def test_promotion_marker_promotes_the_standby_leader() -> None:
    n = standby_leader()
    fired = n.feed(
        "dcs", **standby_dcs("pg1", 11, promoted=True, pg1=member("pg1", role="standby_leader"))
    )
    assert fired == ["promote_cluster"]
    assert n.role is Role.MASTER and n.s.busy == "promote"
    assert n.done("promote") == []
    assert n.role is Role.MASTER


def test_promotion_marker_cannot_be_taken_back() -> None:
    # once seen, a later view without the marker (deleted by hand) does not make the cluster a
    # standby again: its master would otherwise hand the lease to a member that follows the
    # source after the cluster has written on its own timeline
    n = Node("pg2", standby_cluster=True)
    n.feed("pg", **pg(running=False, data="standby"))
    n.feed("dcs", **standby_dcs("pg1", 11, promoted=True, pg1=member("pg1", role="master")))
    n.feed("pg", **pg())
    n.done("start_standby", upstream="pg1")
    n.feed("dcs", **standby_dcs("pg1", 11, pg1=member("pg1", role="master")))
    assert n.feed("dcs", **standby_dcs(None, pg2=member("pg2"))) == ["leader_lost"]
    n.done("announce", term=11)
    n.feed("lease", held=True, term=14)
    assert n.done("acquire", won=True, term=14) == ["won_lease"]
    assert n.role is Role.MASTER


def test_marker_is_ignored_without_a_standby_cluster_section() -> None:
    # nothing in the DCS can make a normal cluster a standby one, and the marker changes nothing
    n = Node("pg1")
    n.feed("pg", **pg(running=False, data="standby"))
    n.feed("dcs", **standby_dcs(None, promoted=True))
    n.feed("pg", **pg(lsn=LSN))
    n.done("start_standby", upstream=None)
    n.done("announce", term=0)
    n.feed("lease", held=True, term=11)
    assert n.done("acquire", won=True, term=11) == ["won_lease"]


def test_standby_leader_asked_to_stop_waits_for_the_runtime() -> None:
    n = standby_leader()
    assert n.feed("stop") == []
    assert n.last.awaits == "stop" and n.role is Role.STANDBY_LEADER
