"""The agent's input sources against in-memory ports: lease renewal (and the fence deadline it
moves), the DCS views, the fork check, Kafka peers, the watchdog's call; and the two writes
whose success was once recorded before PostgreSQL had reloaded them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from events.dcs import ClusterView, DCSError, Leader, SessionLost
from events.settings import KafkaSettings
from fsm.machine import Role
from fsm.records import Record
from fsm.snapshot import DataState, LeaseFacts, PgFacts
from pgsidecar.agent.loop import AgentApi
from pgsidecar.agent.pgconfig import leader_conninfo
from pgsidecar.agent.sources import (
    FORK_CHECK_AFTER,
    ForkCheck,
    PeerFeed,
    fence_deadline,
    renewal_latency_histogram,
    watchdog_fired,
)
from pgsidecar.postgres.control import PostgresError
from tests.support.agent_fakes import ManualClock, Rig, peer, put, see


@pytest.fixture
async def rig(tmp_path: Path) -> Rig:
    r = Rig(tmp_path)
    r.dcs.ttl = 4.0
    return r


def types(posted: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [t for t, _ in posted]


# -- lease renewal ------------------------------------------------------------------------------


def test_fence_deadline_keeps_the_margin_and_the_drift() -> None:
    # margin = clamp(0.15 ttl, 0.5, 2): 0.6 s at ttl 4, 2 s at ttl 30, 0.5 s at ttl 2
    assert fence_deadline(10.0, 4.0, 0.01) == pytest.approx(10.0 + 3.96 - 0.6)
    assert fence_deadline(0.0, 30.0, 0.0) == pytest.approx(28.0)
    assert fence_deadline(0.0, 2.0, 0.0) == pytest.approx(1.5)


async def test_renewal_moves_the_fence_deadline_while_we_hold_the_lease(rig: Rig) -> None:
    renewal = rig.agent.renewal
    put(rig, Role.MASTER, lease=LeaseFacts(held=True, term=3))
    before = rig.clock.monotonic()
    assert await renewal.renew_once(1.0, down=False) is False
    assert rig.agent.state.lease_sent >= before
    assert rig.fence.deadline == pytest.approx(renewal.fence_deadline(rig.agent.state.lease_sent))
    assert rig.posted() == []
    assert rig.agent.recorder.counters["lease_renewals"] == 1


async def test_a_renewal_latency_counts_from_when_it_was_due(rig: Rig) -> None:
    """A renewal that the event loop woke late is as late for the fencing deadline as one the
    DCS answered late: its latency is measured from when it was due, not from when it was sent;
    a failed renewal is no latency at all (it is counted as a failure)."""
    seen: list[float] = []
    renewal = rig.agent.renewal
    renewal.observe_latency = seen.append
    assert await renewal.renew_once(1.0, down=False, due=rig.clock.monotonic() - 0.4) is False
    assert len(seen) == 1 and 0.4 <= seen[0] < 0.6
    rig.dcs.fail["renew_session"] = DCSError("down")
    assert await renewal.renew_once(1.0, down=False) is True
    assert len(seen) == 1


def test_the_renewal_latency_histogram_is_on_the_agents_registry() -> None:
    registry = CollectorRegistry()
    observe = renewal_latency_histogram(registry)
    for seconds in (0.004, 0.02, 0.7):
        observe(seconds)
    name = "pgsidecar_lease_renewal_latency_seconds"
    assert registry.get_sample_value(f"{name}_bucket", {"le": "0.025"}) == 2
    assert registry.get_sample_value(f"{name}_bucket", {"le": "0.5"}) == 2
    assert registry.get_sample_value(f"{name}_bucket", {"le": "1.0"}) == 3
    assert registry.get_sample_value(f"{name}_count") == 3
    renewal_latency_histogram(None)(1.0)  # no registry: a no-op


async def test_the_fencing_margin_is_the_time_left_before_the_deadline(rig: Rig) -> None:
    api = AgentApi(rig.agent)
    assert api.fencing_margin() is None, "no lease held: no margin"
    put(rig, Role.MASTER, lease=LeaseFacts(held=True, term=3))
    assert await rig.agent.renewal.renew_once(1.0, down=False) is False
    margin = api.fencing_margin()
    assert margin is not None
    assert margin == pytest.approx(rig.fence.deadline - rig.clock.monotonic(), abs=0.05)
    assert 0 < margin < rig.agent.renewal.session_ttl()


async def test_renewal_failure_posts_dcs_down_once(rig: Rig) -> None:
    renewal = rig.agent.renewal
    rig.dcs.fail["renew_session"] = DCSError("connection refused")
    assert await renewal.renew_once(1.0, down=False) is True
    assert rig.posted() == [("dcs_down", {})]
    assert await renewal.renew_once(1.0, down=True) is True
    assert rig.posted() == [], "no repeat while it stays down"
    assert rig.agent.recorder.counters["lease_renewal_failures"] == 2, "every failure counts"


async def test_a_renewal_that_times_out_is_a_failure(rig: Rig) -> None:
    async def hang() -> None:
        await asyncio.sleep(10)

    rig.dcs.renew_session = hang  # type: ignore[method-assign]
    assert await rig.agent.renewal.renew_once(0.05, down=False) is True
    assert types(rig.posted()) == ["dcs_down"]


async def test_the_dcs_answering_again_posts_a_fresh_view(rig: Rig) -> None:
    rig.dcs.leader = Leader("pg2", 4)
    assert await rig.agent.renewal.renew_once(1.0, down=True) is False
    ((kind, data),) = rig.posted()
    assert kind == "dcs" and data["leader"] == {"name": "pg2", "term": 4}


async def test_session_lost_fences_and_reopens(rig: Rig) -> None:
    rig.pg.data = DataState.PRIMARY_CLEAN
    rig.pg.write_config("primary", None, None)
    await rig.pg.start(timeout=1)
    put(rig, Role.MASTER, lease=LeaseFacts(held=True, term=3))
    rig.fence.arm(1e12)
    rig.dcs.fail["renew_session"] = SessionLost("404")
    sessions = rig.dcs.sessions
    assert await rig.agent.renewal.renew_once(1.0, down=False) is False
    assert rig.pg.fenced == 1 and rig.fence.deadline is None
    assert rig.agent.recorder.counters["sessions_lost"] == 1
    posted = rig.posted()
    assert posted[0] == ("lease", {"held": False, "term": None})
    assert types(posted)[1:] == ["dcs"], "a fresh view after the new session"
    assert rig.dcs.sessions == sessions + 1
    assert rig.dcs.members["pg1"]["instance_id"] == rig.agent.recorder.seqs.instance_id


async def test_session_lost_without_the_lease_does_not_fence(rig: Rig) -> None:
    rig.dcs.fail["renew_session"] = SessionLost("404")
    assert await rig.agent.renewal.renew_once(1.0, down=False) is False
    assert rig.pg.fenced == 0 and types(rig.posted()) == ["dcs"]


async def test_session_lost_and_no_new_session_keeps_what_it_knew(rig: Rig) -> None:
    rig.dcs.fail["renew_session"] = SessionLost("404")
    rig.dcs.fail["open_session"] = DCSError("unreachable")
    assert await rig.agent.renewal.renew_once(1.0, down=True) is True
    assert await rig.agent.renewal.renew_once(1.0, down=False) is False
    assert rig.posted() == [], "no view without a session; retried at the next renewal"


def test_the_watchdog_firing_is_a_lost_lease() -> None:
    got: list[tuple[str, dict[str, Any]]] = []
    watchdog_fired(lambda type_, **data: got.append((type_, data)))
    assert got == [("lease", {"held": False, "term": None})]


# -- DCS views ---------------------------------------------------------------------------------


async def test_a_read_never_posts_a_view_older_than_the_watchs(rig: Rig) -> None:
    views = rig.agent.views
    views.post_view(ClusterView(index=10), from_watch=True)
    views.post_view(ClusterView(index=9, leader=Leader("old", 1)), from_watch=False)
    views.post_view(ClusterView(index=3), from_watch=True)  # the watch's own index restarted
    assert [d["index"] for _, d in rig.posted()] == [10, 3]


async def test_malformed_values_are_counted_and_skipped(rig: Rig) -> None:
    rig.agent.views.post_view(ClusterView(malformed=(("k", "not JSON"),)), from_watch=True)
    assert rig.agent.counters["malformed_dcs_values"] == 1


async def test_a_scheduled_switchover_is_put_on_our_monotonic_clock(rig: Rig) -> None:
    at = rig.clock.wall() + 30
    rig.agent.views.post_view(ClusterView(switchover={"at": at}), from_watch=True)
    ((_, data),) = rig.posted()
    assert data["switchover"]["at_monotonic"] == pytest.approx(rig.clock.monotonic() + 30, 0.01)


# -- PostgreSQL: the fork check ----------------------------------------------------------------


async def test_fork_check_reports_a_forked_timeline(rig: Rig) -> None:
    rig.dcs.leader = Leader("pg2", 5)
    rig.dcs.members["pg2"] = peer("pg2", timeline=3)
    see(rig)
    put(
        rig,
        Role.REPLICA,
        pg=PgFacts(running=True, in_recovery=True, timeline=2, lsn=500, receiver_streaming=False),
    )
    rig.pg.history = [(1, 100), (2, 400)]  # the master left timeline 2 at 400; we have 500
    clock = ManualClock()
    actions: list[tuple[Any, ...]] = []
    fork = ForkCheck(
        rig.agent.state,
        rig.pg,
        rig.inbox.post,
        lambda *a, **kw: actions.append((*a, kw)),
        clock,
    )
    await fork.check()  # not streaming from now on
    clock.now += FORK_CHECK_AFTER
    await fork.check()
    assert rig.posted() == [("effect", {"name": "diverged", "done": False})]
    assert actions[0][:2] == ("fork_check", "forked")
    # not checked again before FORK_CHECK_AFTER, and a timeline the master's history knows is
    # not a fork
    rig.pg.history = [(1, 100), (2, 600)]
    clock.now += 1
    await fork.check()
    clock.now += FORK_CHECK_AFTER
    await fork.check()
    assert rig.posted() == [] and actions[-1][:2] == ("fork_check", "not_forked")


async def _fork_check_once(rig: Rig) -> list[tuple[Any, ...]]:
    actions: list[tuple[Any, ...]] = []
    clock = ManualClock()
    fork = ForkCheck(
        rig.agent.state, rig.pg, rig.inbox.post, lambda *a, **kw: actions.append((*a, kw)), clock
    )
    await fork.check()
    clock.now += FORK_CHECK_AFTER
    await fork.check()
    return actions


@pytest.mark.parametrize("our_switch, forked", [(450, True), (400, False)])
async def test_the_same_timeline_number_from_another_promotion_is_a_fork(
    rig: Rig, our_switch: int, forked: bool
) -> None:
    """Two members promoted from timeline 2 (one whose lease was lost at once) both call theirs
    3: one timeline only if both left timeline 2 at the same point."""
    rig.dcs.leader = Leader("pg2", 5)
    rig.dcs.members["pg2"] = peer("pg2", timeline=3)
    see(rig)
    put(
        rig,
        Role.REPLICA,
        pg=PgFacts(running=True, in_recovery=True, timeline=3, lsn=600, receiver_streaming=False),
    )
    rig.pg.history = [(1, 100), (2, 400)]  # the master's timeline 3 left 2 at 400
    rig.pg.histories[("127.0.0.1", 5432)] = [(1, 100), (2, our_switch)]  # ours
    actions = await _fork_check_once(rig)
    assert actions[-1][:2] == ("fork_check", "forked" if forked else "not_forked")
    assert rig.posted() == ([("effect", {"name": "diverged", "done": False})] if forked else [])


async def test_a_standby_that_answers_no_query_is_checked_from_pg_control(rig: Rig) -> None:
    """Not consistent yet (it waits for WAL of a timeline the master never had): no LSN from
    SQL, so the fork check reads where it has got to from pg_control."""
    rig.dcs.leader = Leader("pg2", 5)
    rig.dcs.members["pg2"] = peer("pg2", timeline=3)
    see(rig)
    put(rig, Role.REPLICA, pg=PgFacts(running=True, in_recovery=True, timeline=2, lsn=None))
    rig.pg.lsn = 500  # pg_control's checkpoint
    rig.pg.history = [(1, 100), (2, 400)]
    actions = await _fork_check_once(rig)
    assert "controldata" in [c[0] for c in rig.pg.calls]
    assert actions[-1][:2] == ("fork_check", "forked")
    assert rig.posted() == [("effect", {"name": "diverged", "done": False})]


async def test_fork_check_that_cannot_read_the_history_reports_nothing(rig: Rig) -> None:
    rig.dcs.leader = Leader("pg2", 5)
    rig.dcs.members["pg2"] = peer("pg2")
    see(rig)
    put(rig, Role.REPLICA, pg=PgFacts(running=True, in_recovery=True, timeline=2, lsn=500))
    rig.pg.fail["timeline_history"] = PostgresError("connection refused")
    clock = ManualClock()
    fork = ForkCheck(rig.agent.state, rig.pg, rig.inbox.post, lambda *a, **kw: None, clock)
    await fork.check()
    clock.now += FORK_CHECK_AFTER
    await fork.check()
    assert rig.posted() == []


# -- Kafka peers ---------------------------------------------------------------------------------


def test_only_peers_transitions_of_our_cluster_become_inputs() -> None:
    got: list[tuple[str, dict[str, Any]]] = []
    feed = PeerFeed(
        KafkaSettings(bootstrap_servers=["k:9092"], topic="t"),
        "c1",
        "pg1",
        lambda type_, **d: got.append((type_, d)),
    )
    body = {"from": "candidate", "to": "master", "trigger": "won_lease", "lsn": 7, "timeline": 2}
    feed.on_record(Record("transition", "c1", "pg2", 11, 0.0, 4, body))
    feed.on_record(Record("transition", "c1", "pg1", 12, 0.0, 4, body))  # our own
    feed.on_record(Record("transition", "c2", "pg2", 13, 0.0, 4, body))  # another cluster
    feed.on_record(Record("input", "c1", "pg2", 14, 0.0, 4, {}))  # not a transition
    assert got == [
        (
            "peer",
            {
                "node": "pg2",
                "seq": 11,
                "term": 4,
                "source": "candidate",
                "dest": "master",
                "trigger": "won_lease",
                "lsn": 7,
                "timeline": 2,
            },
        )
    ]


# -- applied only once reloaded ------------------------------------------------------------------


async def running_master(rig: Rig, **cluster: Any) -> None:
    rig.pg.data = DataState.PRIMARY_CLEAN
    rig.pg.write_config("primary", None, None)
    await rig.pg.start(timeout=1)
    rig.dcs.leader = Leader("pg1", 8)
    rig.dcs.members["pg2"] = peer("pg2", "replica", streaming=True)
    see(rig)
    put(rig, Role.MASTER, lease=LeaseFacts(held=True, term=8), pg=await rig.pg.probe())
    rig.fence.arm(1e12)


async def test_a_failed_reload_of_the_synchronous_set_is_retried(tmp_path: Path) -> None:
    rig = Rig(tmp_path, synchronous_mode="on")
    await running_master(rig)
    rig.stats = ({"pg2": ("streaming", "async", 0)}, 100)
    rig.pg.fail["reload"] = PostgresError("pg_reload_conf failed")
    with pytest.raises(PostgresError):
        await rig.agent.sync.tick()
    assert rig.agent.sync.applied is None, "not applied: PostgreSQL never loaded it"
    rig.pg.fail.clear()
    await rig.agent.sync.tick()
    assert rig.agent.sync.applied == 'FIRST 1 ("pg2")'
    assert rig.pg.configs[-1][3]["synchronous_standby_names"] == 'FIRST 1 ("pg2")'
    assert len(rig.pg.called("reload")) == 2, "the second tick wrote and reloaded it again"


async def test_an_unanswered_write_of_the_synchronous_set_keeps_postgresql_waiting(
    tmp_path: Path,
) -> None:
    """A grow of the record whose answer never came may still land (simulator seed 105160):
    until a swap from the index it was made from succeeds, PostgreSQL keeps waiting for the
    member it named, even once that member is gone; and after that swap it can never land."""
    rig = Rig(tmp_path, synchronous_mode="on")
    await running_master(rig)
    sync = rig.agent.sync
    rig.stats = ({"pg2": ("streaming", "async", 0)}, 100)
    await sync.tick()  # an empty record of ours; PostgreSQL now waits for pg2
    assert sync.applied == 'FIRST 1 ("pg2")'
    see(rig)
    rig.stats = ({"pg2": ("streaming", "sync", 150)}, 150)
    rig.dcs.fail["swap_sync"] = DCSError("no answer within 2s")
    with pytest.raises(DCSError):
        await sync.tick()  # the grow naming pg2: sent, no answer
    grow, index = rig.dcs.called("swap_sync")[-1]
    assert grow["members"] == ["pg2"]
    rig.stats = ({}, 200)  # pg2 is gone, the store is away
    rig.dcs.fail["read_sync"] = DCSError("unreachable")
    with pytest.raises(DCSError):
        await sync.tick()
    assert sync.applied == 'FIRST 1 ("pg2")', "commits must still wait for pg2"
    rig.dcs.fail.clear()
    await sync.tick()  # the store is back: a swap from the same index, then no one to wait for
    assert rig.dcs.called("swap_sync")[-1][1] == index
    assert rig.dcs.sync is not None and rig.dcs.sync["members"] == []
    assert sync.applied == ""
    assert await rig.dcs.swap_sync(grow, index) is False, "the late grow can never land now"


async def test_a_failed_reload_of_the_cluster_parameters_is_retried(rig: Rig) -> None:
    await running_master(rig)
    rig.dcs.config = {"postgresql": {"parameters": {"work_mem": "16MB"}}}
    see(rig)
    rig.pg.pending = ["shared_buffers"]
    rig.pg.fail["reload"] = PostgresError("pg_reload_conf failed")
    config = rig.agent.config
    assert config.parameters_changed()
    with pytest.raises(PostgresError):
        await config.apply_cluster_parameters()
    assert config.parameters_changed(), "still to apply"
    assert not [r for r in rig.sink.of("action") if r.body["name"] == "apply_parameters"]
    rig.pg.fail.clear()
    await config.apply_cluster_parameters()
    assert not config.parameters_changed()
    assert rig.pg.configs[-1][3]["work_mem"] == "16MB"
    assert rig.agent.state.pending_restart == ["shared_buffers"]
    (applied,) = [r.body for r in rig.sink.of("action") if r.body["name"] == "apply_parameters"]
    assert applied["pending_restart"] == ["shared_buffers"]


async def test_parameters_are_not_marked_applied_in_a_role_that_writes_no_config(
    rig: Rig,
) -> None:
    await running_master(rig)
    put(rig, Role.CANDIDATE)
    rig.dcs.config = {"postgresql": {"parameters": {"work_mem": "16MB"}}}
    see(rig)
    await rig.agent.config.apply_cluster_parameters()
    assert rig.pg.called("reload") == [] and rig.agent.config.parameters_changed()
    put(rig, Role.REPLICA)
    await rig.agent.config.apply_cluster_parameters()
    assert len(rig.pg.called("reload")) == 1 and not rig.agent.config.parameters_changed()


async def test_new_parameters_keep_the_upstream_the_machine_chose(rig: Rig) -> None:
    """A replica rewrites its config for new cluster parameters with the upstream it was told
    to follow, whatever the view says now: the machine re-points a standby only when the
    leader differs from the upstream it configured, so a rewrite naming none (a view without a
    leader) or another member would leave it following nobody (simulator seeds 2324, 3060)."""
    rig.pg.data = DataState.STANDBY
    rig.dcs.leader = Leader("pg2", 8)
    rig.dcs.members["pg2"] = peer("pg2")
    see(rig)
    config = rig.agent.config
    config.write_standby(leader_conninfo(rig.agent.state, rig.pg, replication=True))
    await rig.pg.start(timeout=1)
    followed = rig.pg.configs[-1][1]
    assert followed is not None and followed.host == "pg2.local"
    put(rig, Role.REPLICA, upstream="pg2", pg=await rig.pg.probe())
    for leader in (None, Leader("pg3", 9)):
        rig.dcs.leader = leader
        rig.dcs.members["pg3"] = peer("pg3")
        work_mem = "32MB" if leader else "16MB"
        rig.dcs.config = {"postgresql": {"parameters": {"work_mem": work_mem}}}
        see(rig)
        assert config.parameters_changed()
        await config.apply_cluster_parameters()
        role, upstream, slot, parameters = rig.pg.configs[-1]
        assert (role, upstream, slot) == ("standby", followed, "pg1")
        assert parameters["work_mem"] == work_mem


# -- the master's replication slots --------------------------------------------------------------


async def test_a_failed_slot_sync_is_retried_on_the_next_view(rig: Rig) -> None:
    """A member without its slot can never stream from us: a sync that failed (PostgreSQL not
    answering for a moment) must not count as done."""
    rig.dcs.members["pg2"] = peer("pg2", role="replica")
    see(rig)
    put(rig, Role.MASTER, lease=LeaseFacts(held=True, term=3))
    members = rig.agent.members
    rig.pg.fail["ensure_slots"] = PostgresError("connection refused")
    members.on_master_view(rig.agent.state.snapshot)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(rig.pg.called("ensure_slots")) == 1
    del rig.pg.fail["ensure_slots"]
    members.on_master_view(rig.agent.state.snapshot)  # the same members: tried again
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(rig.pg.called("ensure_slots")) == 2
    members.on_master_view(rig.agent.state.snapshot)  # done now: not again
    await asyncio.sleep(0)
    assert len(rig.pg.called("ensure_slots")) == 2
