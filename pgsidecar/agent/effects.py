"""The effects: one async function per Effect of the table (fsm.machine.EFFECT), each taking only
the ports and parts it uses and posting its outcome as an ``effect`` input.

An outcome says which failure: ``ok: false`` means the *call* failed (an error or a timeout, the
outcome unknown; an effect that raises gets it from the loop's runner), ``ok: true`` with an
answer (``won: false``, ``released_term: None``) means the call worked and the answer was no.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from events.dcs import DCS, DCSError
from events.tasks import bounded
from fsm.machine import Effect, Role
from pgsidecar.agent.archiving import BootstrapPort
from pgsidecar.agent.membership import Membership
from pgsidecar.agent.pgconfig import (
    PgConfig,
    Upstream,
    clone_source,
    leader_conninfo,
    source_conninfo,
)
from pgsidecar.agent.ports import Clock, FencePort, PostgresPort
from pgsidecar.agent.sources import PgWatch
from pgsidecar.agent.state import ActionLog, NodeState, Post
from pgsidecar.backup import BackupError
from pgsidecar.backup.pitr import RecoveryResult
from pgsidecar.postgres.control import PostgresError
from pgsidecar.syncrep import SyncManager

log = structlog.get_logger("pgsidecar.agent")


@dataclass(frozen=True)
class Report:
    """How an effect tells what happened: its outcome (an ``effect`` input), other inputs it
    learnt (``lease``), and action records of what it did."""

    post: Post
    action: ActionLog
    clock: Clock

    def outcome(self, name: Effect, ok: bool, **data: Any) -> None:
        self.post("effect", name=name, ok=ok, **data)

    def now(self) -> float:
        return self.clock.monotonic()


class PgRunner:
    """Starts and stops our PostgreSQL for the effects: the role's config written first, the
    fence told the new postmaster, the exit watched, each step recorded."""

    def __init__(
        self,
        *,
        state: NodeState,
        pg: PostgresPort,
        fence: FencePort,
        config: PgConfig,
        watch: PgWatch,
        report: Report,
        start_timeout: float,
    ) -> None:
        self.state = state
        self.pg = pg
        self.fence = fence
        self.config = config
        self.watch = watch
        self.report = report
        self.start_timeout = start_timeout

    async def start(self, role: Literal["primary", "standby"], upstream: Upstream | None) -> None:
        failures = self.state.snapshot.pg.start_failures
        if failures:
            # back off before anything else: a full disk fails already at writing the config
            await asyncio.sleep(min(5.0, 0.5 * 2**failures))
        started = self.report.now()
        try:
            if role == "primary":
                self.config.write_primary()
            else:
                self.config.write_standby(upstream)
            await self.pg.start(timeout=self.start_timeout)
            # the fence process learns the new postmaster's pid now, not at its next ping
            self.fence.postmaster_started()
        except (PostgresError, OSError):
            self.watch.post_facts(await self.pg.probe(), start_failures=failures + 1)
            raise
        self.report.action(
            "start_postgres",
            "ok",
            started,
            as_role=role,
            upstream=upstream[0] if upstream else None,
        )
        self.watch.watch_exit()
        await self.watch.probe_now()

    async def stop(self, mode: Literal["fast", "immediate"]) -> None:
        if not self.pg.running:
            return
        self.watch.expect_exit()
        started = self.report.now()
        await self.pg.stop(mode)
        self.report.action("stop_postgres", "ok", started, mode=mode)


async def release_own_key(name: str, dcs: DCS, term: int | None, within: float) -> int | None:
    """Delete the leader key if it still names us at ``term`` (compare-and-delete). Returns
    the term when it is gone by our hand, None when not (a failed release is not an error
    here: the machine's ``release_key`` retries while a view still shows the key)."""
    if term is None:
        return None
    try:
        released = await bounded(dcs.release_leader(name, term), within)
    except (DCSError, TimeoutError) as exc:
        log.warning("leader_key_release_failed", term=term, error=str(exc) or type(exc).__name__)
        return None
    log.info("released_leader_key", term=term, released=released)
    return term if released else None


async def reserve_timeline(dcs: DCS, pg: PostgresPort, current: int, within: float) -> int:
    """Before a promotion from timeline ``current``: claim in the DCS a timeline above every
    one claimed in the cluster before (and above what PostgreSQL would pick from its own
    pg_wal), then write placeholder history files for the numbers in between, so that the
    promotion names the claimed one. PostgreSQL alone names one above the newest history file
    it can see: two members promoted from the same point on different machines, with no shared
    archive, would both name the same timeline, and nothing could tell their WAL apart."""
    own_choice = pg.next_timeline(current)
    claimed = await bounded(dcs.claim_timeline(own_choice), within)
    written = pg.reserve_timelines(current, claimed)
    log.info("timeline_claimed", timeline=claimed, current=current, placeholders=written)
    return claimed


async def record_named_timeline(dcs: DCS, pg: PostgresPort, claimed: int, within: float) -> int:
    """After the promotion, the timeline PostgreSQL named (returned). It can exceed the claim
    when its restore_command found newer history files in the archive; then the counter is
    raised to it, so that no later promotion names it again. Best effort: the failover is
    done."""
    named = (await pg.probe()).timeline
    if named is None or named == claimed:
        return claimed
    if named < claimed:
        log.error("promotion_named_another_timeline", claimed=claimed, named=named)
        return named
    log.warning("promotion_named_a_newer_timeline", claimed=claimed, named=named)
    try:
        await bounded(dcs.claim_timeline(named), within)
    except (DCSError, TimeoutError) as exc:
        log.error("timeline_counter_not_raised", named=named, error=str(exc))
    return named


# -- the effects ------------------------------------------------------------------------------------


async def bootstrap(
    name: str,
    dcs: DCS,
    pg: PostgresPort,
    watch: PgWatch,
    report: Report,
    restore: BootstrapPort | None = None,
    source: Upstream | None = None,
) -> None:
    """Race for the initialize key; the winner makes the cluster's first data directory: initdb,
    or (``restore``, the bootstrap section) a restore from another cluster's repository
    recovered to its target and promoted. Either way the result is a cleanly stopped primary's
    data directory, which the machine starts and elects as after initdb. A standby cluster
    (``source``: the standby_cluster section) copies the source cluster with pg_basebackup
    instead: a standby's data directory, which its standby leader keeps following. A failure
    gives the key back for the next attempt (a partial restore is wiped first)."""
    won = await dcs.try_initialize(name)
    if not won:
        report.outcome(Effect.BOOTSTRAP, ok=True, won=False)
        return
    started = report.now()
    result: RecoveryResult | None = None
    try:
        if source is not None:
            await pg.basebackup(source[1])
        elif restore is None:
            await pg.initdb()
        else:
            result = await restore.restore()
    except Exception as exc:
        wiped = restore is not None and await wipe_restore(
            pg, report, started, str(exc) or type(exc).__name__
        )
        await dcs.cancel_initialize(name)
        if restore is not None and wiped:
            restore.settle()
        raise
    except asyncio.CancelledError:
        # the agent is stopping: a partial restore must not be taken for data at the next start
        # (if this does not finish, the restore's mark has the next start do it)
        if restore is not None:
            with contextlib.suppress(Exception):
                if await bounded(wipe_restore(pg, report, started, "cancelled"), 30):
                    await bounded(dcs.cancel_initialize(name), 5)
                    restore.settle()
        raise
    if source is not None:
        report.action("basebackup", "ok", started, source=source[0])
    elif result is None:
        report.action("initdb", "ok", started)
    else:
        report.action(
            "restore_from_repository",
            "ok",
            started,
            system_id=result.system_id,
            timeline=result.timeline,
        )
    await watch.probe_now()
    report.outcome(Effect.BOOTSTRAP, ok=True, won=True)


async def wipe_restore(pg: PostgresPort, report: Report, started: float, error: str) -> bool:
    """After a failed or interrupted restore: wipe the partial data directory and record the
    failure. Returns whether the wipe worked. The restore's mark is settled by the caller only
    once the initialize key is given back too: a mark left behind has the next start finish
    both, where data gone with the key still naming us would wait for an operator."""
    wiped = True
    try:
        await pg.wipe_data()
    except Exception as exc:  # noqa: BLE001 - the key goes back all the same
        log.error("restore_wipe_failed", error=str(exc))
        wiped = False
    with contextlib.suppress(OSError):  # a full disk must not keep the key from going back
        report.action("restore_from_repository", "failed", started, error=error[:500])
    return wiped


async def clone(
    state: NodeState,
    pg: PostgresPort,
    watch: PgWatch,
    report: Report,
    restore_replica: Callable[[], Awaitable[str | None]] | None = None,
) -> None:
    """A new replica's data: restored from the backup repository when there is one (the
    archive replays it up to the master's WAL, then it streams: the master copies nothing),
    else, or when the restore fails, pg_basebackup from a streaming replica tagged clonefrom
    or the master."""
    failures = state.snapshot.clone_failures
    if failures:
        # back off: the master may not have created the replication role yet
        await asyncio.sleep(min(10.0, 0.25 * 2**failures))
    src = clone_source(state, pg)
    if src is None:
        report.outcome(Effect.CLONE, ok=False, error="no reachable master to clone from")
        return
    started = report.now()
    await pg.wipe_data()
    if restore_replica is not None:
        try:
            label = await restore_replica()
        except (BackupError, OSError) as exc:
            log.warning("restore_from_repository_failed", error=str(exc))
            report.action("restore_replica", "failed", started, error=str(exc)[:500])
            await pg.wipe_data()
            started = report.now()
        else:
            if label is not None:
                report.action("restore_replica", "ok", started, backup=label)
                await watch.probe_now()
                report.outcome(Effect.CLONE, ok=True, source="repository")
                return
    await pg.basebackup(src[1])
    report.action("basebackup", "ok", started, source=src[0])
    await watch.probe_now()
    report.outcome(Effect.CLONE, ok=True, source=src[0])


async def start_standby(
    state: NodeState, pg: PostgresPort, runner: PgRunner, report: Report
) -> None:
    up = leader_conninfo(state, pg, replication=True)
    await runner.start("standby", up)
    report.outcome(Effect.START_STANDBY, ok=True, upstream=up[0] if up else None)


async def follow(state: NodeState, pg: PostgresPort, config: PgConfig, report: Report) -> None:
    up = leader_conninfo(state, pg, replication=True)
    if up is None:
        report.outcome(Effect.FOLLOW, ok=False, error="the master's address is not published yet")
        return
    config.write_standby(up)
    await pg.reload()
    report.outcome(Effect.FOLLOW, ok=True, upstream=up[0])


async def announce(
    state: NodeState, dcs: DCS, members: Membership, watch: PgWatch, report: Report
) -> None:
    # publish a fresh position: peers compare theirs with it before anyone races
    await watch.probe_now()
    term = state.snapshot.dcs.lost_term or 0
    data = members.member_data(election=term)
    members.published(data)
    await dcs.put_member(state.name, data)
    report.outcome(Effect.ANNOUNCE, ok=True, term=term)


async def acquire(
    state: NodeState,
    dcs: DCS,
    fence: FencePort,
    fence_deadline: Callable[[float], float],
    report: Report,
    fresh_lease: Callable[[], Awaitable[None]] | None = None,
) -> None:
    # A call that fails (error, timeout) raises: the runner posts ``ok: false`` (outcome
    # unknown: the DCS may have committed it), the machine retries after a back-off, and the
    # retry confirms a key our session already holds (acquire is idempotent for its holder).
    if not fence.can_lead():
        # fencing.mode: required and the watchdog device cannot be used: stand aside (an
        # answer, not a failure: the others race; we try again after a TTL)
        log.error("cannot_lead_without_watchdog_device", device=fence.device_state)
        report.outcome(Effect.ACQUIRE, ok=True, won=False, reason="no watchdog device")
        return
    if fresh_lease is not None:
        # a win must leave its fence deadline ahead of us, not behind (see fresh_for_race)
        await fresh_lease()
    leader = await dcs.acquire_leader(state.name)
    if leader is not None and leader.name == state.name:
        # from the last renewal, not from this request: creating a key bound to the session
        # does not extend the session (a renewal sent just before could be up to ttl/4 old)
        fence.arm(fence_deadline(state.lease_sent))
        report.post("lease", held=True, term=leader.term)
        report.outcome(Effect.ACQUIRE, ok=True, won=True, term=leader.term)
    else:
        report.outcome(Effect.ACQUIRE, ok=True, won=False)


async def release(state: NodeState, dcs: DCS, fence: FencePort, report: Report) -> None:
    """Not master (any more): give up the lease and delete a leader key that still names us
    (compare-and-delete on its term: a newer key, ours or anyone's, is never touched)."""
    s = state.snapshot
    leader = s.dcs.leader
    fence.disarm()
    released = None
    if leader is not None and leader.name == state.name:
        # a failed call raises here: the runner posts ``ok: false``, retried after back-off
        gone = await bounded(
            dcs.release_leader(state.name, leader.term), max(2.0, s.settings.ttl / 2)
        )
        log.info("released_leader_key", term=leader.term, released=gone)
        # deleted by us, or already not that key (deleted, lapsed or replaced): either way
        # a view showing this term is stale from now on
        released = leader.term
    if s.lease.held:
        report.post("lease", held=False, term=None)
    report.outcome(Effect.RELEASE, ok=True, released_term=released)


async def promote(
    state: NodeState,
    dcs: DCS,
    pg: PostgresPort,
    fence: FencePort,
    runner: PgRunner,
    config: PgConfig,
    sync: SyncManager,
    members: Membership,
    watch: PgWatch,
    report: Report,
    ttl: float,
    on_promoted: Callable[[], None],
) -> None:
    started = report.now()
    within = max(2.0, ttl / 2)

    async def give_lease_up(event: str, exc: BaseException) -> None:
        log.error(event, error=str(exc) or type(exc).__name__)
        fence.disarm()
        released = await release_own_key(state.name, dcs, state.snapshot.lease.term, within=within)
        report.post("lease", held=False, term=None)
        report.outcome(Effect.PROMOTE, ok=False, released_term=released)

    try:
        # synchronous mode: our own empty record before the first write is acknowledged
        await sync.prepare_promotion(state.snapshot.lease.term)
    except DCSError as exc:
        await give_lease_up("sync_record_failed_giving_up_lease", exc)
        return
    timeline: int | None = None
    if not pg.running:
        await runner.start("primary", None)
    else:
        facts = await pg.probe()
        if facts.in_recovery:
            current = facts.timeline or 1
            try:
                timeline = await reserve_timeline(dcs, pg, current, within)
            except (DCSError, TimeoutError) as exc:
                await give_lease_up("timeline_claim_failed_giving_up_lease", exc)
                return
            # the primary's settings are loaded while still a standby; then promote:
            # PostgreSQL removes standby.signal itself (and fails if it is gone)
            config.write_promoting()
            with contextlib.suppress(Exception):
                await pg.reload()
            await pg.promote()
            timeline = await record_named_timeline(dcs, pg, timeline, within)
        config.write_primary()
        with contextlib.suppress(Exception):
            await pg.reload()
    report.action("promote", "ok", started, timeline=timeline)
    # archiving: the stanza is created (or confirmed) in the background, never in the way
    on_promoted()
    try:
        await pg.ensure_roles()
    except Exception as exc:
        log.error("ensure_roles_failed", error=str(exc))
    await members.sync_slots()
    if state.snapshot.dcs.switchover is not None:
        with contextlib.suppress(DCSError):
            await dcs.delete_switchover()
    await watch.probe_now()
    report.outcome(Effect.PROMOTE, ok=True)


async def start_primary(fence: FencePort, runner: PgRunner, report: Report) -> None:
    if not fence.armed_and_valid():
        # the exit of a PostgreSQL the watchdog fenced can be seen before its lease input:
        # never start a primary without a lease valid on our own clock
        report.post("lease", held=False, term=None)
        report.outcome(Effect.START_PRIMARY, ok=False, error="lease not valid on our clock")
        return
    await runner.start("primary", None)
    report.outcome(Effect.START_PRIMARY, ok=True)


async def fence_pg(
    state: NodeState,
    pg: PostgresPort,
    fence: FencePort,
    runner: PgRunner,
    watch: PgWatch,
    report: Report,
) -> None:
    fence.disarm()
    pg.fence()
    await runner.stop("immediate")
    await watch.probe_now()
    if state.snapshot.lease.held:
        # the lease was lost by the key's view (gone, or someone else's), not by renewal: we
        # hold nothing any more, and must not re-arm the watchdog on the next renewal
        report.post("lease", held=False, term=None)
    report.outcome(Effect.FENCE, ok=True)


async def handoff(
    state: NodeState,
    dcs: DCS,
    pg: PostgresPort,
    fence: FencePort,
    runner: PgRunner,
    members: Membership,
    watch: PgWatch,
    report: Report,
) -> None:
    """Switchover or shutdown of the master: stop cleanly, publish the position we stopped at,
    then release the key; the target promotes once it has that position."""
    term = state.snapshot.lease.term
    if pg.running:
        # a checkpoint while still writable makes the shutdown checkpoint short
        with contextlib.suppress(Exception):
            await bounded(pg.checkpoint(), 5)
        await runner.stop("fast")
    fence.disarm()
    cd = await pg.controldata()
    final: dict[str, Any] = {"role": "demoted", "running": False, "state": "stopped"}
    if cd.checkpoint_lsn is not None:
        final.update(lsn=cd.checkpoint_lsn, timeline=cd.timeline)
    with contextlib.suppress(DCSError, asyncio.TimeoutError):
        await bounded(dcs.put_member(state.name, members.member_data(**final)), 2)
    released = await release_own_key(state.name, dcs, term, within=2.0)
    report.post("lease", held=False, term=None)
    await watch.probe_now()
    report.outcome(Effect.HANDOFF, ok=True, released_term=released)


async def give_up(
    state: NodeState, dcs: DCS, fence: FencePort, runner: PgRunner, report: Report, ttl: float
) -> None:
    """PostgreSQL did not come back, or the promotion failed: stop it and give the lease up."""
    await runner.stop("immediate")
    fence.disarm()
    released = await release_own_key(
        state.name, dcs, state.snapshot.lease.term, within=max(2.0, ttl / 2)
    )
    report.post("lease", held=False, term=None)
    report.outcome(Effect.GIVE_UP, ok=True, released_term=released)


async def rewind(
    state: NodeState, pg: PostgresPort, runner: PgRunner, watch: PgWatch, report: Report
) -> None:
    src = leader_conninfo(state, pg, replication=False)
    if src is None:
        report.outcome(Effect.REWIND, ok=False, error="master not reachable")
        return
    await runner.stop("fast")
    started = report.now()
    result = await pg.rewind(src[1])
    report.action("pg_rewind", result, started, source=src[0])
    await watch.probe_now()
    report.outcome(Effect.REWIND, ok=True, result=result)


async def restart_pg(
    state: NodeState, pg: PostgresPort, runner: PgRunner, config: PgConfig, report: Report
) -> None:
    """Operator restart: stop cleanly, start again in the same role (a master keeps its
    lease and its timeline; its watchdog keeps running)."""
    started = report.now()
    role: Literal["primary", "standby"] = "primary" if state.role is Role.MASTER else "standby"
    await runner.stop("fast")
    up = None if role == "primary" else leader_conninfo(state, pg, replication=True)
    await runner.start(role, up)
    state.pending_restart = await config.pending_restart()
    report.action("restart", "ok", started, as_role=role)
    report.outcome(Effect.RESTART_PG, ok=True)


async def wipe(pg: PostgresPort, runner: PgRunner, watch: PgWatch, report: Report) -> None:
    await runner.stop("immediate")
    started = report.now()
    await pg.wipe_data()
    report.action("wipe_data", "ok", started)
    await watch.probe_now()
    report.outcome(Effect.WIPE, ok=True)


# -- binding ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EffectContext:
    """Everything an effect may use; each effect is handed only its own part of it."""

    state: NodeState
    dcs: DCS
    pg: PostgresPort
    fence: FencePort
    report: Report
    watch: PgWatch
    runner: PgRunner
    config: PgConfig
    members: Membership
    sync: SyncManager
    fence_deadline: Callable[[float], float]
    ttl: float  # the local config's
    # renews the session first when a win's fence deadline would already be due (None: never)
    fresh_lease: Callable[[], Awaitable[None]] | None = None
    # called once PostgreSQL is writable after a promotion (the archiving's stanza)
    on_promoted: Callable[[], None] = lambda: None
    # a new replica's data from the backup repository (None: no repository configured)
    restore_replica: Callable[[], Awaitable[str | None]] | None = None
    # the cluster's first data from another cluster's repository (None: initdb)
    restore_bootstrap: BootstrapPort | None = None


EffectFn = Callable[[EffectContext], Awaitable[None]]

EFFECTS: dict[Effect, EffectFn] = {
    Effect.BOOTSTRAP: lambda c: bootstrap(
        c.state.name,
        c.dcs,
        c.pg,
        c.watch,
        c.report,
        c.restore_bootstrap,
        source_conninfo(c.state, c.pg, replication=True),
    ),
    Effect.CLONE: lambda c: clone(c.state, c.pg, c.watch, c.report, c.restore_replica),
    Effect.START_STANDBY: lambda c: start_standby(c.state, c.pg, c.runner, c.report),
    Effect.FOLLOW: lambda c: follow(c.state, c.pg, c.config, c.report),
    Effect.ANNOUNCE: lambda c: announce(c.state, c.dcs, c.members, c.watch, c.report),
    Effect.ACQUIRE: lambda c: acquire(
        c.state, c.dcs, c.fence, c.fence_deadline, c.report, fresh_lease=c.fresh_lease
    ),
    Effect.RELEASE: lambda c: release(c.state, c.dcs, c.fence, c.report),
    Effect.PROMOTE: lambda c: promote(
        c.state,
        c.dcs,
        c.pg,
        c.fence,
        c.runner,
        c.config,
        c.sync,
        c.members,
        c.watch,
        c.report,
        c.ttl,
        c.on_promoted,
    ),
    Effect.START_PRIMARY: lambda c: start_primary(c.fence, c.runner, c.report),
    Effect.FENCE: lambda c: fence_pg(c.state, c.pg, c.fence, c.runner, c.watch, c.report),
    Effect.HANDOFF: lambda c: handoff(
        c.state, c.dcs, c.pg, c.fence, c.runner, c.members, c.watch, c.report
    ),
    Effect.GIVE_UP: lambda c: give_up(c.state, c.dcs, c.fence, c.runner, c.report, c.ttl),
    Effect.REWIND: lambda c: rewind(c.state, c.pg, c.runner, c.watch, c.report),
    Effect.RESTART_PG: lambda c: restart_pg(c.state, c.pg, c.runner, c.config, c.report),
    Effect.WIPE: lambda c: wipe(c.pg, c.runner, c.watch, c.report),
}
