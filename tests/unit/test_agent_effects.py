"""Every effect against in-memory ports: the outcome it posts when it works, and when its call
fails (``ok: false``, retried by the machine) as opposed to an answer "no" (``ok: true``). Each
effect runs as the loop runs it (Agent.run_effect), so an effect that raises is covered too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from events.dcs import DCSError, Leader, TimelineCounter
from fsm.machine import EFFECT, TABLE, Effect, Role
from fsm.snapshot import DataState, DcsFacts, LeaseFacts
from pgsidecar.agent.effects import EFFECTS
from pgsidecar.postgres.control import PostgresError
from tests.support.agent_fakes import Rig, peer, put, see


def test_every_effect_of_the_table_has_a_runtime_effect() -> None:
    """A trigger whose effect the runtime lacks would leave ``busy`` set forever."""
    needed = {EFFECT[row.trigger] for row in TABLE} - {Effect.NONE}
    assert needed == set(EFFECTS)


async def run(rig: Rig, effect: Effect) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """Run ``effect`` as the loop does; returns its outcome and every other input it posted."""
    trigger = next(t for t, e in EFFECT.items() if e is effect)
    await rig.agent.run_effect(trigger, effect)
    posted = rig.posted()
    outcomes = [d for t, d in posted if t == "effect" and d.get("name") != "diverged"]
    assert len(outcomes) == 1, f"{effect} posted {len(outcomes)} outcomes: {posted}"
    assert outcomes[0]["name"] == effect
    return outcomes[0], [(t, d) for t, d in posted if t != "effect"]


def lease_inputs(others: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [d for t, d in others if t == "lease"]


def with_master(rig: Rig, name: str = "pg2", term: int = 5) -> None:
    rig.dcs.leader = Leader(name, term)
    rig.dcs.members[name] = peer(name)
    see(rig)


@pytest.fixture
async def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


# -- bootstrap --------------------------------------------------------------------------------


async def test_bootstrap_won_runs_initdb(rig: Rig) -> None:
    out, _ = await run(rig, Effect.BOOTSTRAP)
    assert out == {"name": Effect.BOOTSTRAP, "ok": True, "won": True}
    assert rig.dcs.initialize == "pg1" and rig.pg.data is DataState.PRIMARY_CLEAN
    assert [r.body["name"] for r in rig.sink.of("action")] == ["initdb"]


async def test_bootstrap_lost_is_an_answer(rig: Rig) -> None:
    rig.dcs.initialize = "pg2"
    out, _ = await run(rig, Effect.BOOTSTRAP)
    assert out == {"name": Effect.BOOTSTRAP, "ok": True, "won": False}
    assert rig.pg.called("initdb") == []


async def test_bootstrap_failed_initdb_gives_the_key_back(rig: Rig) -> None:
    rig.pg.fail["initdb"] = PostgresError("initdb: disk full")
    out, _ = await run(rig, Effect.BOOTSTRAP)
    assert out["ok"] is False and "disk full" in out["error"]
    assert rig.dcs.initialize is None, "the initialize key is cancelled for the next member"


async def test_bootstrap_dcs_failure_is_a_failed_call(rig: Rig) -> None:
    rig.dcs.fail["try_initialize"] = DCSError("timeout")
    out, _ = await run(rig, Effect.BOOTSTRAP)
    assert out["ok"] is False


# -- clone ------------------------------------------------------------------------------------------


async def test_clone_from_the_master(rig: Rig) -> None:
    with_master(rig)
    out, others = await run(rig, Effect.CLONE)
    assert out == {"name": Effect.CLONE, "ok": True, "source": "pg2"}
    (src,) = rig.pg.called("basebackup")[0]
    assert (src.host, src.user) == ("pg2.local", "replicator")
    assert [d["data"] for t, d in others if t == "pg"] == ["standby"]  # probed after the copy


async def test_clone_prefers_a_streaming_replica_tagged_clonefrom(rig: Rig) -> None:
    with_master(rig)
    rig.dcs.members["pg3"] = peer("pg3", "replica", streaming=True, tags={"clonefrom": True})
    see(rig)
    out, _ = await run(rig, Effect.CLONE)
    assert out["source"] == "pg3"


async def test_clone_without_a_master_fails(rig: Rig) -> None:
    out, _ = await run(rig, Effect.CLONE)
    assert out["ok"] is False and "no reachable master" in out["error"]


async def test_clone_failed_basebackup_fails(rig: Rig) -> None:
    with_master(rig)
    rig.pg.fail["basebackup"] = PostgresError("pg_basebackup: connection refused")
    out, _ = await run(rig, Effect.CLONE)
    assert out["ok"] is False


# -- start a standby, follow -------------------------------------------------------------------------


async def test_start_standby_points_at_the_master(rig: Rig) -> None:
    rig.pg.data = DataState.STANDBY
    with_master(rig)
    out, others = await run(rig, Effect.START_STANDBY)
    assert out == {"name": Effect.START_STANDBY, "ok": True, "upstream": "pg2"}
    role, upstream, slot, _params = rig.pg.configs[-1]
    assert role == "standby" and upstream is not None and upstream.host == "pg2.local"
    assert slot == "pg1" and rig.fence.started == 1
    assert any(t == "pg" and d["running"] for t, d in others)


async def test_start_standby_failure_counts_the_failed_start(rig: Rig) -> None:
    rig.pg.data = DataState.STANDBY
    rig.pg.fail["start"] = PostgresError("postgres did not start")
    out, others = await run(rig, Effect.START_STANDBY)
    assert out["ok"] is False
    (pg,) = [d for t, d in others if t == "pg"]
    assert pg["start_failures"] == 1, "the machine backs off on start_failures"


async def test_follow_repoints_and_reloads(rig: Rig) -> None:
    with_master(rig)
    out, _ = await run(rig, Effect.FOLLOW)
    assert out == {"name": Effect.FOLLOW, "ok": True, "upstream": "pg2"}
    assert rig.pg.configs[-1][0] == "standby" and len(rig.pg.called("reload")) == 1


async def test_follow_without_the_masters_address_fails(rig: Rig) -> None:
    out, _ = await run(rig, Effect.FOLLOW)
    assert out["ok"] is False and "not published" in out["error"]


async def test_follow_failed_reload_fails(rig: Rig) -> None:
    with_master(rig)
    rig.pg.fail["reload"] = PostgresError("pg_reload_conf failed")
    out, _ = await run(rig, Effect.FOLLOW)
    assert out["ok"] is False


# -- announce ------------------------------------------------------------------------------------


async def test_announce_publishes_a_fresh_position(rig: Rig) -> None:
    put(rig, Role.CANDIDATE, dcs=DcsFacts(reachable=True, lost_term=9))
    out, _ = await run(rig, Effect.ANNOUNCE)
    assert out == {"name": Effect.ANNOUNCE, "ok": True, "term": 9}
    assert rig.dcs.members["pg1"]["election"] == 9


async def test_announce_failed_put_fails(rig: Rig) -> None:
    put(rig, Role.CANDIDATE)
    rig.dcs.fail["put_member"] = DCSError("session gone")
    out, _ = await run(rig, Effect.ANNOUNCE)
    assert out["ok"] is False


# -- acquire ---------------------------------------------------------------------------------------


async def test_acquire_won_arms_the_fence_from_the_last_renewal(rig: Rig) -> None:
    put(rig, Role.CANDIDATE)
    rig.dcs.ttl = 4.0
    renewed = rig.clock.monotonic() - 0.5  # recent: its deadline is more than a cycle ahead
    rig.agent.state.lease_sent = renewed
    out, others = await run(rig, Effect.ACQUIRE)
    term = rig.dcs.leader.term if rig.dcs.leader else None
    assert out == {"name": Effect.ACQUIRE, "ok": True, "won": True, "term": term}
    assert lease_inputs(others) == [{"held": True, "term": term}]
    # ttl 4 s, clock drift 1 %, margin 0.6 s: the deadline counts from the renewal, not now
    assert rig.fence.deadline == pytest.approx(renewed + 4.0 * 0.99 - 0.6)
    assert rig.dcs.called("renew_session") == []


async def test_acquire_after_an_old_renewal_renews_first(rig: Rig) -> None:
    """After a DCS stall the last renewal can be older than the fencing window: a win armed
    from it would fence at once and waste the election (seen in the simulator after a stall).
    The session is renewed before the acquire and the deadline counts from that renewal."""
    put(rig, Role.CANDIDATE)
    rig.dcs.ttl = 4.0
    rig.agent.state.lease_sent = rig.clock.monotonic() - 10.0
    before = rig.clock.monotonic()
    out, _ = await run(rig, Effect.ACQUIRE)
    assert out["ok"] is True and out["won"] is True
    assert len(rig.dcs.called("renew_session")) == 1
    assert rig.fence.deadline is not None and rig.fence.deadline >= before + 4.0 * 0.99 - 0.6


async def test_acquire_whose_first_renewal_fails_is_a_failed_call(rig: Rig) -> None:
    put(rig, Role.CANDIDATE)
    rig.agent.state.lease_sent = rig.clock.monotonic() - 60.0
    rig.dcs.fail["renew_session"] = DCSError("timeout")
    out, _ = await run(rig, Effect.ACQUIRE)
    assert out["ok"] is False and "won" not in out
    assert rig.dcs.called("acquire_leader") == [], "no race on a session we could not renew"
    assert rig.fence.deadline is None


async def test_acquire_lost_is_an_answer(rig: Rig) -> None:
    put(rig, Role.CANDIDATE)
    rig.dcs.leader = Leader("pg2", 3)
    out, others = await run(rig, Effect.ACQUIRE)
    assert out == {"name": Effect.ACQUIRE, "ok": True, "won": False}
    assert lease_inputs(others) == [] and rig.fence.deadline is None


async def test_acquire_without_the_required_watchdog_device_stands_aside(rig: Rig) -> None:
    put(rig, Role.CANDIDATE)
    rig.fence.lead = False
    out, _ = await run(rig, Effect.ACQUIRE)
    assert out["ok"] is True and out["won"] is False and out["reason"] == "no watchdog device"
    assert rig.dcs.called("acquire_leader") == []


async def test_acquire_failed_call_is_not_a_lost_race(rig: Rig) -> None:
    put(rig, Role.CANDIDATE)
    rig.dcs.fail["acquire_leader"] = DCSError("timeout")
    out, _ = await run(rig, Effect.ACQUIRE)
    assert out["ok"] is False and "won" not in out


# -- release -----------------------------------------------------------------------------------------


async def test_release_deletes_our_key_and_gives_the_lease_up(rig: Rig) -> None:
    rig.dcs.leader = Leader("pg1", 7)
    see(rig)
    put(rig, Role.DEMOTED, lease=LeaseFacts(held=True, term=7))
    rig.fence.arm(1e12)
    out, others = await run(rig, Effect.RELEASE)
    assert out == {"name": Effect.RELEASE, "ok": True, "released_term": 7}
    assert rig.dcs.leader is None and rig.fence.deadline is None
    assert lease_inputs(others) == [{"held": False, "term": None}]


async def test_release_of_a_key_not_ours_releases_nothing(rig: Rig) -> None:
    with_master(rig)
    put(rig, Role.REPLICA)
    out, _ = await run(rig, Effect.RELEASE)
    assert out == {"name": Effect.RELEASE, "ok": True, "released_term": None}
    assert rig.dcs.leader == Leader("pg2", 5)


async def test_release_failed_call_fails(rig: Rig) -> None:
    rig.dcs.leader = Leader("pg1", 7)
    see(rig)
    rig.dcs.fail["release_leader"] = DCSError("unreachable")
    out, _ = await run(rig, Effect.RELEASE)
    assert out["ok"] is False


# -- promote ----------------------------------------------------------------------------------------


async def promoting(rig: Rig, **cluster: Any) -> None:
    rig.pg.data, rig.pg.timeline, rig.pg.lsn = DataState.STANDBY, 1, 100
    rig.pg.write_config("standby", None, None)
    await rig.pg.start(timeout=1)
    rig.dcs.leader = Leader("pg1", 8)
    rig.dcs.members["pg2"] = peer("pg2", "replica")
    rig.dcs.config = {"postgresql": {"parameters": {"work_mem": "8MB"}}}
    see(rig)
    put(rig, Role.MASTER, lease=LeaseFacts(held=True, term=8))
    rig.fence.arm(1e12)
    rig.pg.calls.clear()


async def test_promote_a_running_standby(rig: Rig) -> None:
    await promoting(rig)
    out, _ = await run(rig, Effect.PROMOTE)
    assert out == {"name": Effect.PROMOTE, "ok": True}
    assert not rig.pg.in_recovery
    # the cluster's parameters are in the config loaded before the promotion, not a later one
    promoting_config = rig.pg.configs[-2]
    assert promoting_config[0] == "standby" and promoting_config[3]["work_mem"] == "8MB"
    assert promoting_config[3]["synchronous_standby_names"] == ""
    assert rig.pg.configs[-1][0] == "primary" and rig.pg.configs[-1][3]["work_mem"] == "8MB"
    assert rig.pg.called("ensure_slots") == [({"pg2"},)]
    names = [n for n, _ in rig.pg.calls]
    assert names.index("write_config") < names.index("promote") < names.index("ensure_roles")


async def test_promote_deletes_the_switchover_it_answered(rig: Rig) -> None:
    await promoting(rig)
    rig.dcs.switchover = {"from": "pg2", "to": "pg1"}
    see(rig)
    out, _ = await run(rig, Effect.PROMOTE)
    assert out["ok"] is True and rig.dcs.switchover is None


async def test_promote_gives_the_lease_up_when_the_sync_record_cannot_be_written(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path, synchronous_mode="on")
    await promoting(rig)
    rig.dcs.fail["put_sync"] = DCSError("unreachable")
    out, others = await run(rig, Effect.PROMOTE)
    assert out == {"name": Effect.PROMOTE, "ok": False, "released_term": 8}
    assert lease_inputs(others) == [{"held": False, "term": None}]
    assert rig.fence.deadline is None and rig.dcs.leader is None
    assert rig.pg.called("promote") == [], "nothing is promised before the record exists"


async def test_promote_failed_promotion_fails(rig: Rig) -> None:
    await promoting(rig)
    rig.pg.fail["promote"] = PostgresError("promotion did not complete")
    out, _ = await run(rig, Effect.PROMOTE)
    assert out["ok"] is False


async def test_promote_names_a_timeline_above_every_one_the_cluster_claimed(rig: Rig) -> None:
    """Another member promoted from our point and named timeline 2 before it lost the lease
    (the counter says 2); PostgreSQL alone would name 2 again. The claim raises the counter to
    3 before the promotion, and a placeholder history file for 2 makes PostgreSQL name 3."""
    await promoting(rig)
    rig.dcs.timeline = TimelineCounter(2, 1)
    out, _ = await run(rig, Effect.PROMOTE)
    assert out == {"name": Effect.PROMOTE, "ok": True}
    assert rig.dcs.timeline.value == 3
    assert rig.pg.called("reserve_timelines") == [(1, 3)]
    assert rig.pg.timeline == 3, "the promotion named the claimed timeline"
    pg_calls = [n for n, _ in rig.pg.calls]
    assert pg_calls.index("reserve_timelines") < pg_calls.index("promote")
    (action,) = [r for r in rig.sink.of("action") if r.body["name"] == "promote"]
    assert action.body["timeline"] == 3


async def test_promote_creates_the_counter_from_what_postgres_would_pick(rig: Rig) -> None:
    """No counter yet (a cluster from before it existed): it is created at PostgreSQL's own
    choice, which counts history files already in pg_wal (here timeline 2's)."""
    await promoting(rig)
    rig.pg.history_files.add(2)
    out, _ = await run(rig, Effect.PROMOTE)
    assert out["ok"] is True
    assert rig.dcs.timeline.value == 3 and rig.pg.timeline == 3
    assert rig.pg.called("reserve_timelines") == [(1, 3)], "nothing to fill: 2 exists"
    assert rig.pg.history_files == {2, 3}


async def test_two_promotions_from_the_same_point_name_different_timelines(
    tmp_path: Path,
) -> None:
    """The seed-1004 case with the agent's own effect twice against one DCS: two members on
    timeline 2 at the same point, promoted one after the other, name 3 and 4."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = Rig(tmp_path / "a")
    second = Rig(tmp_path / "b", dcs=first.dcs)  # one store
    named = []
    for rig in (first, second):
        await promoting(rig)
        rig.pg.timeline = 2
        rig.pg.history_files.add(2)
        rig.dcs.leader = Leader("pg1", 8)
        see(rig)
        out, _ = await run(rig, Effect.PROMOTE)
        assert out["ok"] is True
        named.append(rig.pg.timeline)
    assert named == [3, 4]
    assert 3 in second.pg.history_files, "a placeholder made the second skip 3"


async def test_promote_gives_the_lease_up_when_no_timeline_can_be_claimed(rig: Rig) -> None:
    await promoting(rig)
    rig.dcs.fail["put_timeline"] = DCSError("unreachable")
    out, others = await run(rig, Effect.PROMOTE)
    assert out == {"name": Effect.PROMOTE, "ok": False, "released_term": 8}
    assert lease_inputs(others) == [{"held": False, "term": None}]
    assert rig.fence.deadline is None and rig.dcs.leader is None
    assert rig.pg.called("promote") == [], "never promoted without a claimed timeline"
    assert rig.pg.in_recovery


async def test_promote_raises_the_counter_to_a_newer_timeline_postgres_named(rig: Rig) -> None:
    """With a restore_command PostgreSQL also counts history files in the archive, so it can
    name a timeline above the claim: the counter follows it."""
    await promoting(rig)
    real_promote = rig.pg.promote

    async def promote_past_the_claim() -> None:
        await real_promote()
        rig.pg.timeline = 7  # the archive held history files up to 6

    rig.pg.promote = promote_past_the_claim  # type: ignore[method-assign]
    out, _ = await run(rig, Effect.PROMOTE)
    assert out["ok"] is True
    assert rig.dcs.timeline.value == 7
    (action,) = [r for r in rig.sink.of("action") if r.body["name"] == "promote"]
    assert action.body["timeline"] == 7, "the record names the timeline PostgreSQL named"


async def test_starting_a_primary_in_place_claims_no_timeline(rig: Rig) -> None:
    """A master that starts its stopped PostgreSQL stays on its timeline: nothing claimed."""
    rig.pg.data, rig.pg.timeline = DataState.PRIMARY_CLEAN, 1
    put(rig, Role.MASTER, lease=LeaseFacts(held=True, term=3))
    rig.fence.arm(1e12)
    out, _ = await run(rig, Effect.PROMOTE)
    assert out["ok"] is True
    assert rig.dcs.called("put_timeline") == [] and rig.pg.timeline == 1


# -- start a primary in place --------------------------------------------------------------------


async def test_start_primary_with_a_valid_lease(rig: Rig) -> None:
    rig.pg.data = DataState.PRIMARY_CRASHED
    put(rig, Role.MASTER, lease=LeaseFacts(held=True, term=3))
    rig.fence.arm(1e12)
    out, _ = await run(rig, Effect.START_PRIMARY)
    assert out == {"name": Effect.START_PRIMARY, "ok": True}
    assert rig.pg.running and rig.pg.configs[-1][0] == "primary"


async def test_start_primary_without_a_valid_lease_never_starts(rig: Rig) -> None:
    rig.pg.data = DataState.PRIMARY_CRASHED
    put(rig, Role.MASTER, lease=LeaseFacts(held=True, term=3))
    out, others = await run(rig, Effect.START_PRIMARY)
    assert out["ok"] is False and "lease" in out["error"]
    assert lease_inputs(others) == [{"held": False, "term": None}]
    assert rig.pg.called("start") == []


# -- fence -----------------------------------------------------------------------------------------


async def test_fence_stops_a_running_master_at_once(rig: Rig) -> None:
    await promoting(rig)
    out, others = await run(rig, Effect.FENCE)
    assert out == {"name": Effect.FENCE, "ok": True}
    assert rig.pg.fenced == 1 and not rig.pg.running and rig.fence.deadline is None
    assert lease_inputs(others) == [{"held": False, "term": None}]


async def test_fence_failed_stop_fails(rig: Rig) -> None:
    await promoting(rig)
    rig.pg.fence = lambda: True  # type: ignore[method-assign]  # the signal did not stop it
    rig.pg.fail["stop"] = PostgresError("postgres did not exit after SIGKILL")
    out, _ = await run(rig, Effect.FENCE)
    assert out["ok"] is False


# -- hand-off (switchover, shutdown) -------------------------------------------------------------


async def test_handoff_publishes_where_it_stopped_then_releases(rig: Rig) -> None:
    await promoting(rig)
    rig.pg.in_recovery = False
    out, others = await run(rig, Effect.HANDOFF)
    assert out == {"name": Effect.HANDOFF, "ok": True, "released_term": 8}
    assert rig.pg.called("checkpoint") and rig.pg.called("stop") == [("fast",)]
    _name, mine = rig.dcs.called("put_member")[0]
    assert mine["role"] == "demoted" and mine["lsn"] == 100 and mine["running"] is False
    assert rig.dcs.leader is None
    assert lease_inputs(others) == [{"held": False, "term": None}]


async def test_handoff_whose_release_fails_says_nothing_was_released(rig: Rig) -> None:
    await promoting(rig)
    rig.dcs.fail["release_leader"] = DCSError("unreachable")
    out, _ = await run(rig, Effect.HANDOFF)
    assert out == {"name": Effect.HANDOFF, "ok": True, "released_term": None}


async def test_handoff_failed_stop_fails(rig: Rig) -> None:
    await promoting(rig)
    rig.pg.fail["stop"] = PostgresError("postgres did not exit")
    out, _ = await run(rig, Effect.HANDOFF)
    assert out["ok"] is False


# -- give up ----------------------------------------------------------------------------------------


async def test_give_up_stops_and_releases(rig: Rig) -> None:
    await promoting(rig)
    out, others = await run(rig, Effect.GIVE_UP)
    assert out == {"name": Effect.GIVE_UP, "ok": True, "released_term": 8}
    assert rig.pg.called("stop") == [("immediate",)] and rig.dcs.leader is None
    assert lease_inputs(others) == [{"held": False, "term": None}]


async def test_give_up_failed_stop_fails(rig: Rig) -> None:
    await promoting(rig)
    rig.pg.fail["stop"] = PostgresError("postgres did not exit")
    out, _ = await run(rig, Effect.GIVE_UP)
    assert out["ok"] is False


# -- rewind ----------------------------------------------------------------------------------------


async def test_rewind_from_the_master(rig: Rig) -> None:
    rig.pg.data = DataState.PRIMARY_CLEAN
    with_master(rig)
    put(rig, Role.REWINDING)
    out, _ = await run(rig, Effect.REWIND)
    assert out == {"name": Effect.REWIND, "ok": True, "result": "rewound"}
    (src,) = rig.pg.called("rewind")[0]
    assert (src.host, src.user) == ("pg2.local", "postgres")


async def test_rewind_without_a_master_fails(rig: Rig) -> None:
    put(rig, Role.REWINDING)
    out, _ = await run(rig, Effect.REWIND)
    assert out["ok"] is False and "master" in out["error"]


async def test_rewind_failed_pg_rewind_fails(rig: Rig) -> None:
    with_master(rig)
    put(rig, Role.REWINDING)
    rig.pg.fail["rewind"] = PostgresError("pg_rewind: could not find common ancestor")
    out, _ = await run(rig, Effect.REWIND)
    assert out["ok"] is False


# -- operator restart, wipe ------------------------------------------------------------------------


async def test_restart_pg_keeps_the_role_and_reads_pending_restart(rig: Rig) -> None:
    await promoting(rig)
    rig.pg.in_recovery = False
    rig.pg.pending = ["shared_buffers"]
    out, _ = await run(rig, Effect.RESTART_PG)
    assert out == {"name": Effect.RESTART_PG, "ok": True}
    assert rig.pg.called("stop") == [("fast",)] and rig.pg.running
    assert rig.pg.configs[-1][0] == "primary"
    assert rig.agent.state.pending_restart == ["shared_buffers"]


async def test_restart_pg_failed_start_fails(rig: Rig) -> None:
    await promoting(rig)
    rig.pg.fail["start"] = PostgresError("postgres did not start")
    out, _ = await run(rig, Effect.RESTART_PG)
    assert out["ok"] is False


async def test_wipe(rig: Rig) -> None:
    rig.pg.data = DataState.INVALID
    out, others = await run(rig, Effect.WIPE)
    assert out == {"name": Effect.WIPE, "ok": True}
    assert rig.pg.data is DataState.MISSING
    assert [d["data"] for t, d in others if t == "pg"] == ["missing"]


async def test_wipe_failure_fails(rig: Rig) -> None:
    rig.pg.fail["wipe_data"] = OSError("read-only file system")
    out, _ = await run(rig, Effect.WIPE)
    assert out["ok"] is False and "read-only" in out["error"]
