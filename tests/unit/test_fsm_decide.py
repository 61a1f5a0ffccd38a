"""The guards, scenario by scenario, driven through ``step`` exactly as the runtime drives them."""

from __future__ import annotations

import dataclasses
from typing import Any

from fsm.inputs import Input, step
from fsm.machine import Role, decide, sync_allows
from fsm.snapshot import DataState, Settings, Snapshot, SyncSet

LSN = 0x3000000


def member(
    name: str, lsn: int = LSN, tl: int = 2, running: bool = True, **kw: Any
) -> dict[str, Any]:
    return {
        "role": kw.pop("role", "replica"),
        "lsn": lsn,
        "timeline": tl,
        "running": running,
        "streaming": True,
        "host": "127.0.0.1",
        "port": 5432,
        **kw,
    }


def dcs(leader: str | None = None, term: int = 10, **members: dict[str, Any]) -> dict[str, Any]:
    return {
        "leader": {"name": leader, "term": term} if leader else None,
        "members": members,
        "initialize": "pg1",
        "config": None,
        "switchover": None,
    }


def pg(
    running: bool = True, lsn: int = LSN, tl: int = 2, data: str = "standby", **kw: Any
) -> dict[str, Any]:
    return {
        "data": data,
        "running": running,
        "accepting": running,
        "in_recovery": kw.pop("in_recovery", True),
        "timeline": tl,
        "lsn": lsn,
        "receiver_streaming": kw.pop("streaming", False),
        **kw,
    }


class Node:
    """One node's machine driven by inputs, as the agent drives it."""

    def __init__(self, name: str, role: Role = Role.INIT, **settings: Any) -> None:
        self.role = role
        self.s = Snapshot(name=name)
        self.t = 0.0
        self.log: list[str] = []
        self.feed("start", settings={"ttl": 10.0, "election_timeout": 1.0, **settings})

    def feed(self, type_: str, dt: float = 0.01, **data: Any) -> list[str]:
        self.t += dt
        self.s, taken, self.last = step(self.role, self.s, Input(type_, self.t, data))
        fired = []
        for _src, d, dest in taken:
            assert d.trigger is not None
            fired.append(d.trigger)
            self.role = dest
        self.log += fired
        return fired

    def done(self, name: str, **data: Any) -> list[str]:
        return self.feed("effect", name=name, ok=data.pop("ok", True), **data)

    def wake(self) -> list[str]:
        """The timer the last decision asked for fires (the runtime posts it at ``wake_at``)."""
        assert self.last.wake_at is not None, f"no wake-up asked for: {self.last}"
        return self.feed("timer", dt=max(0.0, self.last.wake_at - self.t))


def test_bootstrap_path_first_member_initdb_then_master() -> None:
    n = Node("pg1")
    n.feed("pg", **pg(running=False, data="missing"))
    d = dcs()
    d["initialize"] = None
    assert n.feed("dcs", **d) == ["bootstrap"]
    assert n.s.busy == "bootstrap"
    # initdb done: the data dir is a cleanly shut down primary; no leader anywhere
    n.feed("pg", **pg(running=False, data="primary_clean", tl=1))
    d["initialize"] = "pg1"
    n.feed("dcs", **d)
    assert n.done("bootstrap", won=True) == ["start_replica"]
    assert n.role is Role.REPLICA
    # started read-only, no leader: stand for election, publish, race, win, promote
    assert (
        n.feed("pg", **pg(tl=1, streaming=False)) == []
    )  # busy: the start effect has not reported
    assert n.done("start_standby", upstream=None) == ["leader_lost"]
    assert n.done("announce", term=0) == ["race"]
    assert n.feed("lease", held=True, term=11) == []  # acquire still busy
    assert n.done("acquire", won=True, term=11) == ["won_lease"]
    assert n.role is Role.MASTER


def test_second_member_waits_for_bootstrap_then_clones() -> None:
    n = Node("pg2")
    n.feed("pg", **pg(running=False, data="missing"))
    assert n.feed("dcs", **dcs()) == []  # initialized by pg1, no leader yet: wait
    assert n.feed("dcs", **dcs("pg1", 11, pg1=member("pg1", role="master"))) == ["clone"]
    n.feed("pg", **pg(running=False, data="standby"))
    assert n.done("clone") == ["start_replica"]
    n.feed("pg", **pg())
    n.done("start_standby", upstream="pg1")
    assert n.role is Role.REPLICA and n.s.upstream == "pg1"


def test_former_primary_with_another_leader_goes_through_rewinding() -> None:
    for state in ("primary_clean", "primary_crashed"):
        n = Node("pg1")
        n.feed("pg", **pg(running=False, data=state))
        assert n.feed("dcs", **dcs("pg2", 20, pg2=member("pg2", role="master"))) == ["rewind"]
        assert n.role is Role.REWINDING
        assert n.done("rewind", result="rewound") == ["rewound"]
        assert n.role is Role.REPLICA


def test_rewind_failures_are_bounded_then_reclone() -> None:
    n = Node("pg1", rewind_attempts=2)
    n.feed("pg", **pg(running=False, data="primary_crashed"))
    n.feed("dcs", **dcs("pg2", 20, pg2=member("pg2", role="master")))
    # a failed call is retried after a bounded back-off, not at once
    assert n.done("rewind", ok=False) == []
    assert n.last.wake_at is not None and 0 < n.last.wake_at - n.t <= 5
    assert n.wake() == ["retry_rewind"]
    assert n.done("rewind", ok=False) == ["reclone"]
    assert n.role is Role.INIT
    n.feed("pg", **pg(running=False, data="missing"))
    assert n.done("wipe") == ["clone"]


def replica_following(name: str = "pg2", lsn: int = LSN) -> Node:
    n = Node(name)
    n.feed("pg", **pg(running=False, data="standby"))
    n.feed("dcs", **dcs("pg1", 10, pg1=member("pg1", role="master", lsn=lsn), pg3=member("pg3")))
    n.feed("pg", **pg(lsn=lsn))
    n.done("start_standby", upstream="pg1")
    assert n.role is Role.REPLICA
    return n


def test_most_advanced_replica_races_and_the_other_waits() -> None:
    ahead, behind = replica_following("pg2"), replica_following("pg3")
    for n, me, other, my_lsn, other_lsn in (
        (ahead, "pg2", "pg3", LSN + 100, LSN),
        (behind, "pg3", "pg2", LSN, LSN + 100),
    ):
        n.feed("pg", **pg(lsn=my_lsn))
        assert n.feed("dcs", **dcs(None, pg3=member("pg3"), pg2=member("pg2"))) == ["leader_lost"]
        n.done("announce", term=10)
        # the peer's fresh position arrives
        members = {
            me: member(me, lsn=my_lsn, election=10),
            other: member(other, lsn=other_lsn, election=10),
        }
        fired = n.feed("dcs", **dcs(None, **members))
        if n is ahead:
            assert fired == ["race"], n.last
        else:
            assert fired == [] and n.role is Role.CANDIDATE, "the one behind must not race"
            assert n.last.wake_at is not None


def test_candidate_waits_for_fresh_positions_until_election_timeout() -> None:
    n = replica_following("pg2")
    n.feed("dcs", **dcs(None, pg2=member("pg2"), pg3=member("pg3")))
    assert n.done("announce", term=10) == []  # pg3 has not published a fresh position
    assert n.last.wake_at is not None
    # nothing from pg3; the timer fires after election_timeout
    assert n.feed("timer", dt=1.1) == ["race"]


def test_nofailover_never_races() -> None:
    n = Node("pg2", nofailover=True)
    n.feed("pg", **pg(running=False))
    n.feed("dcs", **dcs("pg1", 10, pg1=member("pg1", role="master")))
    n.feed("pg", **pg())
    n.done("start_standby", upstream="pg1")
    assert n.feed("dcs", **dcs(None)) == []
    assert n.feed("timer", dt=30) == []
    assert n.role is Role.REPLICA


def test_lagging_replica_does_not_race() -> None:
    n = replica_following("pg2", lsn=LSN + 50 * 1024 * 1024)  # master published LSN + 50 MiB
    n.feed("pg", **pg(lsn=LSN))  # we are 50 MiB behind, limit is 1 MiB
    assert n.feed("dcs", **dcs(None)) == []
    assert n.role is Role.REPLICA


def test_switchover_target_races_at_once_others_stand_aside() -> None:
    target, other = replica_following("pg2"), replica_following("pg3")
    sw = {"from": "pg1", "to": "pg2", "requested_at": 1.0}
    for n in (target, other):
        d = dcs(
            None, pg1=member("pg1", role="demoted", lsn=LSN), pg2=member("pg2"), pg3=member("pg3")
        )
        d["switchover"] = sw
        assert n.feed("dcs", **d) == ["leader_lost"]
    assert target.done("announce", term=10) == ["race"]
    assert other.done("announce", term=10) == []
    assert other.role is Role.CANDIDATE


def test_switchover_target_waits_for_the_old_masters_last_wal() -> None:
    n = replica_following("pg2")
    d = dcs(None, pg1=member("pg1", role="demoted", lsn=LSN + 500), pg2=member("pg2"))
    d["switchover"] = {"from": "pg1", "to": "pg2"}
    n.feed("dcs", **d)
    assert n.done("announce", term=10) == []
    assert n.feed("pg", **pg(lsn=LSN + 500)) == ["race"]


def test_replica_follows_a_new_master() -> None:
    n = replica_following("pg2")
    assert n.feed("dcs", **dcs("pg3", 12, pg3=member("pg3", role="master"))) == ["follow"]
    n.done("follow", upstream="pg3")
    assert n.s.upstream == "pg3"


def test_replica_restarts_its_stopped_postgres() -> None:
    n = replica_following()
    assert n.feed("pg", **pg(running=False, crashed=True)) == ["restart"]


def test_replica_with_deleted_data_reclones() -> None:
    n = replica_following()
    assert n.feed("pg", **pg(running=False, data="missing")) == ["reclone"]
    assert n.role is Role.INIT


def master_node() -> Node:
    n = Node("pg1")
    n.feed("pg", **pg(running=False, data="standby"))
    n.feed("dcs", **dcs(None, pg2=member("pg2"), pg3=member("pg3")))
    n.feed("pg", **pg())
    n.done("start_standby", upstream=None)
    n.done("announce", term=0)
    n.feed(
        "dcs",
        **dcs(
            None,
            pg1=member("pg1", election=0),
            pg2=member("pg2", election=0),
            pg3=member("pg3", election=0),
        ),
    )
    n.feed("lease", held=True, term=30)
    n.done("acquire", won=True, term=30)
    n.done("promote")
    n.feed("dcs", **dcs("pg1", 30, pg1=member("pg1", role="master"), pg2=member("pg2")))
    assert n.role is Role.MASTER, n.log
    return n


def test_master_demotes_when_the_lease_is_lost_even_while_busy() -> None:
    n = master_node()
    n.feed("pg", **pg(running=False, crashed=True, in_recovery=False))
    assert n.log[-1] == "restart_in_place" and n.s.busy == "start_primary"
    assert n.feed("lease", held=False) == ["lease_lost"]
    assert n.role is Role.DEMOTED


def test_master_demotes_when_the_key_names_another() -> None:
    n = master_node()
    assert n.feed("dcs", **dcs("pg2", 31, pg2=member("pg2", role="master"))) == ["lease_lost"]


def test_master_keeps_the_lease_on_a_view_older_than_its_own_term() -> None:
    """After a DCS outage a fresh read (no key) is posted at once, while the watch still
    delivers what it queued: a member that won the key at term 30 then saw the old master's key
    at term 20. That key was gone before ours was created: it fenced a master for nothing
    (simulator seed 3003). A key of another member at a newer term still demotes it."""
    n = master_node()
    stale = dcs("pg2", 20, pg2=member("pg2", role="master"), pg1=member("pg1"))
    stale["index"] = 25
    assert n.feed("dcs", **stale) == []
    assert n.role is Role.MASTER
    assert n.feed("dcs", **dcs("pg2", 31, pg2=member("pg2", role="master"))) == ["lease_lost"]


def test_master_restart_in_place_then_give_up_after_timeout() -> None:
    n = master_node()
    assert n.feed("pg", **pg(running=False, crashed=True, in_recovery=False)) == [
        "restart_in_place"
    ]
    n.feed("pg", **pg(running=False, start_failures=1, in_recovery=False))
    n.done("start_primary", ok=False)
    assert n.feed("timer", dt=31) == ["start_timeout"]


def test_sigterm_on_master_hands_off() -> None:
    n = master_node()
    assert n.feed("stop") == ["shutdown"]
    assert n.s.busy == "handoff"


def test_switchover_request_demotes_the_master() -> None:
    n = master_node()
    d = dcs("pg1", 30, pg1=member("pg1", role="master"), pg2=member("pg2"))
    d["switchover"] = {"from": "pg1", "to": "pg2"}
    assert n.feed("dcs", **d) == ["switchover"]
    n.feed("pg", **pg(running=False, data="primary_clean", in_recovery=None))
    n.feed("lease", held=False, term=None)
    # the key is deleted; the view that shows it gone has not arrived yet: nothing to do
    assert n.done("handoff", released_term=30) == []
    # the target took over: the old master rejoins through rewinding
    assert n.feed("dcs", **dcs("pg2", 31, pg2=member("pg2", role="master"))) == ["rejoin"]


def test_paused_cluster_takes_no_automatic_action() -> None:
    n = replica_following()
    d = dcs(None)
    d["config"] = {"pause": True}
    assert n.feed("dcs", **d) == []
    assert n.feed("pg", **pg(running=False)) == []


def test_malformed_dcs_values_are_ignored_not_acted_on() -> None:
    n = replica_following()
    d = dcs("pg1", 10, pg1=member("pg1", role="master"))
    d["members"]["bad"] = "not an object"
    d["members"]["pg3"] = {"lsn": "NaN", "timeline": [], "running": "yes"}
    assert n.feed("dcs", **d) == []
    assert "bad" not in n.s.dcs.members
    assert n.s.dcs.members["pg3"].lsn is None


def test_decide_is_pure() -> None:
    n = replica_following()
    a = decide(n.role, n.s)
    b = decide(n.role, n.s)
    assert a == b
    assert n.s.pg.data is DataState.STANDBY


def test_switchover_source_does_not_win_its_own_switchover_back() -> None:
    """Regression (found by the benchmark): after a switchover to "any replica" the old master
    restarted read-only, stood for election, won the tie on its name and took the lease back."""
    n = master_node()
    sw = {"from": "pg1", "to": None}
    d = dcs("pg1", 30, pg1=member("pg1", role="master"), pg2=member("pg2"))
    d["switchover"] = sw
    assert n.feed("dcs", **d) == ["switchover"]
    n.feed("pg", **pg(running=False, data="primary_clean", in_recovery=None))
    n.feed("lease", held=False)
    d = dcs(None, pg1=member("pg1", role="demoted"), pg2=member("pg2"))
    d["switchover"] = sw
    n.feed("dcs", **d)
    assert n.done("handoff") == ["start_replica"]
    n.feed("pg", **pg())
    assert n.done("start_standby", upstream=None) == ["leader_lost"]
    d = dcs(None, pg1=member("pg1", election=30), pg2=member("pg2", election=30))
    d["switchover"] = sw
    n.feed("dcs", **d)
    assert n.done("announce", term=30) == []
    assert n.role is Role.CANDIDATE and n.last.wake_at is not None
    # nobody took over within one TTL: it may race again
    assert n.feed("timer", dt=11) == ["race"]


def test_own_pod_terminating_is_a_graceful_stop() -> None:
    n = master_node()
    pod = {
        "event": "MODIFIED",
        "pod": "pg1-0",
        "member": "pg1",
        "own": True,
        "deleting": True,
        "ready": True,
    }
    assert n.feed("pod", **pod) == ["shutdown"]


def test_candidate_does_not_wait_for_a_peer_whose_pod_is_gone() -> None:
    n = replica_following("pg2")
    n.feed("dcs", **dcs(None, pg2=member("pg2"), pg3=member("pg3")))
    assert n.done("announce", term=10) == []  # pg3 has not published a fresh position
    gone = {
        "event": "DELETED",
        "pod": "pg3-0",
        "member": "pg3",
        "own": False,
        "deleting": True,
        "ready": False,
    }
    assert n.feed("pod", **gone) == ["race"]


def test_peer_pod_events_never_make_a_node_master() -> None:
    n = replica_following("pg2")
    for ev in ("ADDED", "MODIFIED", "DELETED"):
        for member_name in ("pg1", "pg2", "pg3"):
            n.feed(
                "pod", event=ev, member=member_name, own=False, deleting=ev == "DELETED", ready=True
            )
            assert n.role is Role.REPLICA


def sync_view(
    sync_members: list[str], pg2_lsn: int = LSN, pg3_lsn: int = LSN, leader: str = "pg1"
) -> dict[str, Any]:
    d = dcs(
        None,
        pg2=member("pg2", lsn=pg2_lsn, election=10),
        pg3=member("pg3", lsn=pg3_lsn, election=10),
    )
    d["sync"] = {"leader": leader, "term": 10, "members": sync_members}
    d["config"] = {"synchronous_mode": "on"}
    return d


def sync_replica(name: str, lsn: int = LSN) -> Node:
    n = replica_following(name)
    d = dcs("pg1", 10, pg1=member("pg1", role="master"), pg2=member("pg2"), pg3=member("pg3"))
    d["sync"] = {"leader": "pg1", "term": 10, "members": ["pg2"]}
    d["config"] = {"synchronous_mode": "on"}
    n.feed("dcs", **d)
    n.feed("pg", **pg(lsn=lsn))
    return n


def test_sync_mode_only_a_recorded_synchronous_member_may_race() -> None:
    outsider = sync_replica("pg3", lsn=LSN + 500)  # ahead, but not in the synchronous set
    assert outsider.feed("dcs", **sync_view(["pg2"], pg3_lsn=LSN + 500)) == []
    assert outsider.feed("timer", dt=30) == []
    assert outsider.role is Role.REPLICA
    insider = sync_replica("pg2", lsn=LSN)  # behind the outsider, but it has every acked commit
    assert insider.feed("dcs", **sync_view(["pg2"], pg3_lsn=LSN + 500)) == ["leader_lost"]
    assert insider.done("announce", term=10) == ["race"]


def test_sync_mode_empty_recorded_set_means_no_automatic_failover() -> None:
    for name in ("pg2", "pg3"):
        n = sync_replica(name)
        assert n.feed("dcs", **sync_view([])) == []
        assert n.feed("timer", dt=30) == []
        assert n.role is Role.REPLICA


def test_sync_mode_the_master_that_recorded_the_set_may_race_again() -> None:
    """It lost its lease (a DCS stall longer than the TTL) while its set was empty: every commit
    it acknowledged is in its own WAL and nobody has been master since, so it may lead again;
    otherwise no member ever could (found by the simulator, seed 218). The others still may
    not: they are not in the set."""
    s = Snapshot(name="pg1", settings=Settings(synchronous_mode="on"))
    s = dataclasses.replace(
        s,
        dcs=dataclasses.replace(s.dcs, sync=SyncSet(leader="pg1", term=10, members=frozenset())),
    )
    assert sync_allows(s, "pg1")
    assert not sync_allows(s, "pg2")
    with_member = dataclasses.replace(
        s, dcs=dataclasses.replace(s.dcs, sync=SyncSet("pg1", 10, frozenset({"pg2"})))
    )
    assert sync_allows(with_member, "pg2") and not sync_allows(with_member, "pg3")


def fresh_replica(name: str, view: dict[str, Any], lsn: int = LSN) -> Node:
    """A member whose agent just started while no member holds the key: it never saw the
    master that wrote the synchronous record lead (a restarted agent, or one cut off from the
    DCS all through that master's term)."""
    n = Node(name)
    n.feed("pg", **pg(running=False, data="standby", lsn=lsn))
    assert n.feed("dcs", **view) == ["start_replica"]
    n.feed("pg", **pg(lsn=lsn))
    return n


def test_sync_mode_the_record_binds_a_member_that_never_saw_its_writer_lead() -> None:
    """A restarted agent outside the recorded set once took the record for a stale one (its
    writer was not the last leader it had seen) and raced: the set's acknowledged commits were
    lost (simulator seeds 2013, 3001, 3005). Now it waits; the member in the set races."""
    outsider = fresh_replica("pg3", sync_view(["pg2"], pg3_lsn=LSN + 500), lsn=LSN + 500)
    assert outsider.done("start_standby", upstream=None) == []
    assert outsider.feed("timer", dt=30) == []
    assert outsider.role is Role.REPLICA
    insider = fresh_replica("pg2", sync_view(["pg2"], pg3_lsn=LSN + 500))
    assert insider.done("start_standby", upstream=None) == ["leader_lost"]
    assert insider.done("announce", term=0) == ["race"]


def test_sync_mode_a_restarted_master_with_an_empty_set_races_past_the_others() -> None:
    """The master's set was empty when its agent was killed; restarted, it took its own record
    for a stale one, so it counted its peers as contenders and waited for pg2 (ahead by name),
    which, bound by the record, never stood: no master at all (simulator seed 3002). Now it
    counts only members the record allows, and races."""
    old_master = fresh_replica("pg3", sync_view([], leader="pg3"))
    assert old_master.done("start_standby", upstream=None) == ["leader_lost"]
    assert old_master.done("announce", term=0) == ["race"]


def test_sync_mode_a_record_of_an_older_master_binds_too() -> None:
    """Which master wrote the record does not matter, only what it says: a member that saw pg1
    lead and finds pg0's record (pg1 never wrote one) is bound by it like every other member."""
    outsider = replica_following("pg3")
    assert outsider.feed("dcs", **sync_view(["pg2"], leader="pg0")) == []
    assert outsider.feed("timer", dt=30) == []
    assert outsider.role is Role.REPLICA
    recorded = replica_following("pg2")
    assert recorded.feed("dcs", **sync_view(["pg2"], leader="pg0")) == ["leader_lost"]


def test_a_rewinding_former_master_with_no_master_left_starts_and_leads_again() -> None:
    """Strict mode: pg1 won the key and wrote its own empty synchronous record, so only pg1
    may lead. It was demoted at once and went to rewind against pg2, named by the key in a
    view, but pg2 was not there and its key is gone. Waiting in ``rewinding`` for another
    member to be elected waited forever: the record lets nobody else (simulator seed 3003).
    pg1 starts read-only, stands for election and races."""
    n = master_node()
    n.feed("dcs", **{**sync_view([], leader="pg1"), "leader": {"name": "pg1", "term": 30}})
    assert n.feed("dcs", **dcs("pg2", 31, pg2=member("pg2", role="master"))) == ["lease_lost"]
    n.feed("pg", **pg(running=False))
    n.feed("lease", held=False)
    assert n.done("fence") == ["rejoin"] and n.role is Role.REWINDING
    assert n.done("rewind", ok=False, error="cannot connect to pg2:5432") == []
    view = sync_view([], leader="pg1")
    view["config"] = {"synchronous_mode": "strict"}
    assert n.feed("dcs", **view) == ["start_replica"]
    n.feed("pg", **pg())
    assert n.done("start_standby", upstream=None) == ["leader_lost"]
    assert n.done("announce", term=31) == ["race"]


def test_a_rewinding_member_whose_data_is_unusable_waits_for_a_master() -> None:
    """Without usable data it cannot start, let alone lead: it waits for a master to clone
    from, as before."""
    n = master_node()
    assert n.feed("dcs", **dcs("pg2", 31, pg2=member("pg2", role="master"))) == ["lease_lost"]
    n.feed("pg", **pg(running=False))
    n.feed("lease", held=False)
    assert n.done("fence") == ["rejoin"]
    n.feed("pg", **pg(running=False, data="invalid"))
    assert n.done("rewind", ok=False, error="pg_rewind left the data unusable") == []
    assert n.feed("dcs", **dcs(None, pg3=member("pg3"))) == []
    assert n.role is Role.REWINDING and n.last.awaits == "peers"


def test_sync_mode_off_ignores_the_record() -> None:
    n = replica_following("pg3")
    d = sync_view(["pg2"])
    d["config"] = {"synchronous_mode": "off"}
    assert n.feed("dcs", **d) == ["leader_lost"]


def test_candidate_does_not_race_while_the_old_masters_wal_still_streams() -> None:
    n = replica_following("pg2")
    assert n.feed(
        "dcs", **dcs(None, pg2=member("pg2", election=10), pg3=member("pg3", election=10))
    ) == ["leader_lost"]
    n.feed("pg", **pg(streaming=True))  # the key is gone, the stream is not: the master lives
    assert n.done("announce", term=10) == []
    assert n.role is Role.CANDIDATE
    assert n.feed("pg", **pg(streaming=False)) == ["race"]  # the stream stopped: race


def test_paused_replica_neither_rewinds_nor_reclones_nor_restarts() -> None:
    n = replica_following()
    d = dcs("pg1", 10, pg1=member("pg1", role="master"))
    d["config"] = {"pause": True}
    n.feed("dcs", **d)
    assert n.feed("effect", name="diverged", done=False) == []
    assert n.feed("pg", **pg(running=False, data="missing")) == []
    assert n.feed("pg", **pg(running=False)) == []
    d["config"] = {"pause": False}
    assert n.feed("dcs", **d) == ["rewind"]


def test_scheduled_switchover_waits_for_its_time() -> None:
    n = master_node()
    d = dcs("pg1", 30, pg1=member("pg1", role="master"), pg2=member("pg2"))
    d["switchover"] = {"from": "pg1", "to": "pg2", "at_monotonic": n.t + 60}
    assert n.feed("dcs", **d) == []
    assert n.last.wake_at is not None and n.last.wake_at > n.t
    assert n.feed("timer", dt=30) == []
    assert n.feed("timer", dt=31) == ["switchover"]


def test_master_stopped_by_an_operator_while_paused_is_restarted_in_place_on_resume() -> None:
    n = master_node()
    d = dcs("pg1", 30, pg1=member("pg1", role="master"), pg2=member("pg2"))
    d["config"] = {"pause": True}
    n.feed("dcs", **d)
    assert n.feed("pg", **pg(running=False, in_recovery=None, data="primary_clean")) == []
    assert n.feed("timer", dt=120) == [], "paused: no restart, no give-up, however long"
    d["config"] = {"pause": False}
    assert n.feed("dcs", **d) == ["restart_in_place"]
    assert n.role is Role.MASTER


def test_a_stream_from_the_old_master_restarted_as_a_standby_does_not_hold_a_candidate() -> None:
    """A stream from the old master holds a candidate back while that master may still write;
    once it has published that it stepped down (a switchover's old master, restarted as a
    standby, serves WAL to a standby that reconnects at once), the stream is no master's."""
    n = replica_following("pg2")
    n.feed("pg", **pg(lsn=LSN + 100, streaming=True, receiver_upstream="10.0.0.1:5432"))
    old = member("pg1", role="master", host="10.0.0.1", election=10)
    us = member("pg2", lsn=LSN + 100, host="10.0.0.2", election=10)
    assert n.feed("dcs", **dcs(None, pg1=old, pg2=us)) == ["leader_lost"]
    assert n.done("announce", term=10) == []
    assert "still streams to us" in str(n.last), n.last
    for role in ("demoted", "replica", "candidate"):
        m = replica_following("pg2")
        m.feed("pg", **pg(lsn=LSN + 100, streaming=True, receiver_upstream="10.0.0.1:5432"))
        stepped_down = member("pg1", role=role, host="10.0.0.1", election=10)
        assert m.feed("dcs", **dcs(None, pg1=stepped_down, pg2=us)) == ["leader_lost"]
        assert m.done("announce", term=10) == ["race"], (role, m.last)
