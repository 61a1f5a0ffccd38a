"""The agent: one asyncio queue of inputs, the role machine, and the effects it starts.

The loop takes one input at a time: record it, ``fsm.inputs.step`` (fold + decide), fire the
transitions on the RoleMachine, record them, start the effect (effects.py). Effects run one at a
time as tasks (``busy`` in the snapshot); the master's fencing effect cancels whatever else is
running. The inputs come from the sources (sources.py), the effects' outcomes, the timers a
decision asks for, and SIGTERM (``stop``); the world comes in through the ports (ports.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from events.dcs import AuthError, DCSError, DuplicateMember
from events.privatefiles import make_private_dir
from events.tasks import bounded
from fsm.inputs import Input, pg_facts_to_dict, step
from fsm.machine import EFFECT, Decision, Effect, Role, RoleMachine
from fsm.snapshot import Settings, Snapshot
from pgsidecar.agent.archiving import (
    ArchivePort,
    ArchiverStats,
    Archiving,
    ArchivingMetrics,
    BootstrapPort,
)
from pgsidecar.agent.backups import BackupRun, BackupScheduleMetrics, BackupScheduler, eligible
from pgsidecar.agent.effects import EFFECTS, EffectContext, PgRunner, Report
from pgsidecar.agent.membership import KubernetesGlue, Membership
from pgsidecar.agent.pgconfig import PgConfig
from pgsidecar.agent.ports import Clock, Ports
from pgsidecar.agent.recorder import Recorder, SeqStore
from pgsidecar.agent.sources import (
    DcsViews,
    ForkCheck,
    LeaseRenewal,
    PeerFeed,
    PgWatch,
    probe_loop,
    renewal_latency_histogram,
)
from pgsidecar.agent.state import NodeState, TaskSet
from pgsidecar.backup import BackupError, BackupSettingsError
from pgsidecar.config import AgentConfig

log = structlog.get_logger("pgsidecar.agent")


def _nothing() -> None:
    return None


def _holds_data(data_dir: Path) -> bool:
    """Whether the data directory has anything in it (a volume's lost+found aside)."""
    try:
        return any(entry.name != "lost+found" for entry in data_dir.iterdir())
    except OSError:
        return False


class AgentExit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Inbox:
    """The agent's queue of inputs. Sources post on the loop's thread; the fence's watchdog
    thread posts through ``post_threadsafe``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.queue: asyncio.Queue[Input] = asyncio.Queue()
        self.loop: asyncio.AbstractEventLoop | None = None

    def post(self, type_: str, /, **data: Any) -> None:
        self.queue.put_nowait(Input(type_, self.clock.monotonic(), data))

    def post_threadsafe(self, type_: str, /, **data: Any) -> None:
        if self.loop is not None and not self.loop.is_closed():
            # call_soon_threadsafe takes no keyword arguments: bind them first (found by the
            # fault suite: the TypeError killed the watchdog thread right after it fenced)
            self.loop.call_soon_threadsafe(functools.partial(self.post, type_, **data))


def local_settings(cfg: AgentConfig) -> Settings:
    """The machine's settings from the local config (the DCS config key may override them)."""
    cs = cfg.cluster_settings
    return Settings(
        ttl=cs.ttl,
        maximum_lag_on_failover=cs.maximum_lag_on_failover,
        election_timeout=cs.election_timeout,
        master_start_timeout=cfg.postgresql.master_start_timeout,
        rewind_attempts=cfg.postgresql.rewind_attempts,
        nofailover=cfg.tags.nofailover,
        failover_priority=cfg.tags.failover_priority,
        synchronous_mode=cs.synchronous_mode,
        synchronous_node_count=cs.synchronous_node_count,
        standby_cluster=cfg.standby_cluster is not None,
    )


@dataclass
class Services:
    """The real agent's services around the machine, none of which it needs to decide: the
    REST API (and the registry its /metrics serves), Kafka peers' transitions, Kubernetes pods,
    pgBackRest (continuous archiving, when the config has a backup section)."""

    serve_api: bool = False
    metrics_registry: Any = None
    peer_feed: PeerFeed | None = None
    kubernetes: KubernetesGlue | None = None
    pgbackrest: ArchivePort | None = None
    # pg_stat_archiver for the archiving's /metrics (None: not watched)
    archiver_stats: Callable[[], Awaitable[ArchiverStats]] | None = None
    # the backup a slot of the schedule runs (None: no schedule is run here)
    scheduled_backup: BackupRun | None = None
    # the restore from another cluster's repository that replaces initdb when this member
    # initialises the cluster (None: initdb; the bootstrap section)
    bootstrap: BootstrapPort | None = None


class Agent:
    """Built by factory.build_agent from the config, or by a test from in-memory ports."""

    def __init__(
        self,
        cfg: AgentConfig,
        ports: Ports,
        *,
        inbox: Inbox | None = None,
        recorder: Recorder | None = None,
        services: Services | None = None,
        handle_signals: bool = True,
    ) -> None:
        from pgsidecar.syncrep import SyncManager

        self.cfg = cfg
        self.name = cfg.name
        self.ports = ports
        self.clock = ports.clock
        self.dcs = ports.dcs
        self.pg = ports.pg
        self.fence = ports.fence
        self.services = services or Services()
        # SIGTERM / SIGINT hand off and stop; off for agents that share a process (tests)
        self.handle_signals = handle_signals
        self.settings = local_settings(cfg)
        self.inbox = inbox or Inbox(self.clock)
        if recorder is None:
            # the state dir holds state.json (seq, instance id); a caller that brings its own
            # Recorder (the factory, the simulator) owns its files, or keeps none
            make_private_dir(cfg.state_dir)
            recorder = Recorder(
                cfg.cluster,
                cfg.name,
                SeqStore(cfg.state_dir / "state.json"),
                ports.sinks,
                self.clock,
            )
        self.recorder = recorder
        self.state = NodeState(
            name=cfg.name,
            machine=RoleMachine(cfg.cluster, cfg.name),
            snapshot=Snapshot(name=cfg.name, settings=self.settings),
        )
        if cfg.standby_cluster is not None:
            self.state.standby_source = tuple(cfg.standby_cluster.endpoints())
            self.state.standby_slot = cfg.standby_cluster.primary_slot_name
            self.state.standby_restore_command = cfg.standby_cluster.restore_command
        self.recorder.term = self.state.term
        self.tasks = TaskSet()  # effects and everything else beside the loop
        self._sources: list[asyncio.Task[Any]] = []
        post = self.inbox.post
        self.members = Membership(
            cfg,
            self.state,
            self.dcs,
            self.pg,
            self.tasks,
            self.clock,
            self.recorder.seqs.instance_id,
            ttl=self.settings.ttl,
        )
        self.sync = SyncManager(
            cfg.name,
            self.dcs,
            snapshot=lambda: self.state.snapshot,
            still_master=self._still_master,
            member_tags=self._member_tags,
            read_replication=ports.replication_stats,
            reconfigure=self._reconfigure_primary,
            record=self.recorder.action,
            monotonic=self.clock.monotonic,
        )
        self.archiving: Archiving | None = None
        if self.services.pgbackrest is not None:
            self.archiving = Archiving(
                self.services.pgbackrest,
                self.state,
                self.tasks,
                self.recorder.action,
                self.clock,
                cfg.postgresql.data_dir,
            )
            if self.services.metrics_registry is not None:
                self.services.metrics_registry.register(
                    ArchivingMetrics(self.archiving, self.clock)
                )
        self.scheduler: BackupScheduler | None = None
        schedule = cfg.backup.schedule if cfg.backup is not None else None
        run_backup = self.services.scheduled_backup
        if schedule is not None and run_backup is not None:
            self.scheduler = BackupScheduler(
                schedule,
                dcs=self.dcs,
                state=self.state,
                clock=self.clock,
                tasks=self.tasks,
                record=self.recorder.action,
                run_backup=run_backup,
                eligible=lambda: eligible(self.state, self.pg, run_backup),
            )
            if self.services.metrics_registry is not None:
                self.services.metrics_registry.register(BackupScheduleMetrics(self.scheduler))
        self.config = PgConfig(
            self.state,
            self.pg,
            self.clock,
            self.sync.parameters,
            self.recorder.action,
            self.members.publish,
            allowed_from_dcs=cfg.postgresql.parameters_allowed_from_dcs,
            local_parameters=cfg.postgresql.parameters,
            primary_archiving=self.archiving.primary_parameters() if self.archiving else None,
            standby_archiving=self.archiving.standby_parameters() if self.archiving else None,
        )
        self.watch = PgWatch(self.pg, post, self.tasks, self.members.publish)
        self.views = DcsViews(self.dcs, self.state, post, self.recorder, self.clock)
        self.renewal = LeaseRenewal(
            dcs=self.dcs,
            pg=self.pg,
            fence=self.fence,
            state=self.state,
            post=post,
            clock=self.clock,
            views=self.views,
            members=self.members,
            ttl=self.settings.ttl,
            clock_drift=cfg.cluster_settings.clock_drift,
            count=self.recorder.count,
            observe_latency=renewal_latency_histogram(self.services.metrics_registry),
        )
        self.fork = ForkCheck(self.state, self.pg, post, self.recorder.action, self.clock)
        report = Report(post, self.recorder.action, self.clock)
        runner = PgRunner(
            state=self.state,
            pg=self.pg,
            fence=self.fence,
            config=self.config,
            watch=self.watch,
            report=report,
            start_timeout=cfg.postgresql.master_start_timeout,
        )
        self.effect_context = EffectContext(
            state=self.state,
            dcs=self.dcs,
            pg=self.pg,
            fence=self.fence,
            report=report,
            watch=self.watch,
            runner=runner,
            config=self.config,
            members=self.members,
            sync=self.sync,
            fence_deadline=self.renewal.fence_deadline,
            fresh_lease=self.renewal.fresh_for_race,
            ttl=self.settings.ttl,
            on_promoted=self.archiving.on_promoted if self.archiving else _nothing,
            restore_replica=self.archiving.restore_replica if self.archiving else None,
            restore_bootstrap=self.services.bootstrap,
        )
        self._effect_task: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stopping = False
        self._done = asyncio.Event()
        self.exit_code = 0
        self.start_time = 0.0  # wall clock, set when run() starts
        self.api: Any = None

    # -- what the parts and the API read ------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self.state.snapshot

    @property
    def machine(self) -> RoleMachine:
        return self.state.machine

    @property
    def counters(self) -> dict[str, int]:
        return self.recorder.counters

    def post(self, type_: str, /, **data: Any) -> None:
        self.inbox.post(type_, **data)

    def _still_master(self) -> bool:
        s = self.state.snapshot
        return self.state.role is Role.MASTER and s.lease.held and self.fence.armed_and_valid()

    def _member_tags(self, name: str) -> dict[str, Any]:
        view = self.state.dcs_view
        m = view.members.get(name) if view is not None else None
        tags = m.get("tags") if isinstance(m, dict) else None
        return tags if isinstance(tags, dict) else {}

    async def _reconfigure_primary(self) -> None:
        self.config.write_primary()
        await self.pg.reload()

    # -- the loop --------------------------------------------------------------------------------

    def handle(self, inp: Input) -> None:
        self.recorder.input(inp)
        snapshot, taken, final = step(self.state.role, self.state.snapshot, inp)
        self.state.snapshot = snapshot
        for _source, decision, _dest in taken:
            tr = self.state.machine.fire(
                decision, snapshot, self.recorder.next_seq(), self.clock.wall()
            )
            self.recorder.transition(tr)
            self._on_transition(decision)
        self._schedule_wake(final)
        role = self.state.role
        kube = self.services.kubernetes
        if taken:
            if kube is not None:
                kube.label_role(role)
            self.members.publish()
            self.members.register_service()
            self.renewal.cadence_changed()
        elif inp.type == "pg":
            # the member key is built from the snapshot, so it can only tell what the probe saw
            # once this input is in it: publishing from the probe itself (before the queue got
            # here) left the key one probe behind, e.g. a replica that streams shown as not
            # streaming for a second, and `switchover` refused for lack of a streaming replica
            self.members.publish()
        if inp.type == "dcs":
            if kube is not None:
                kube.on_view(snapshot, role)
            if self.config.parameters_changed():
                self.tasks.spawn(self.config.apply_cluster_parameters(), "apply_parameters")
            if role in (Role.MASTER, Role.STANDBY_LEADER) and not snapshot.busy:
                # a standby leader serves its replicas as a master does: a slot for each
                self.members.on_master_view(snapshot)

    def _schedule_wake(self, d: Decision) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if d.wake_at is not None and self.inbox.loop is not None:
            delay = max(0.0, d.wake_at - self.clock.monotonic()) + 0.001
            self._timer = self.inbox.loop.call_later(delay, self.post, "timer")

    def _on_transition(self, decision: Decision) -> None:
        trigger = decision.trigger
        assert trigger is not None
        if (
            trigger == "lease_lost"
            and self._effect_task is not None
            and not self._effect_task.done()
        ):
            # nothing may keep a master writable without the lease: cancel whatever runs
            self._effect_task.cancel()
        effect = EFFECT[trigger]
        if effect is Effect.NONE:
            return
        self._effect_task = self.tasks.spawn(self.run_effect(trigger, effect), trigger)

    async def run_effect(self, trigger: str, effect: Effect) -> None:
        """Run the effect a transition asked for; whatever happens, its outcome is posted."""
        started = self.clock.monotonic()
        try:
            await EFFECTS[effect](self.effect_context)
        except asyncio.CancelledError:
            self.recorder.action(trigger, "cancelled", started)
            raise
        except Exception as exc:
            self.state.last_error = f"{trigger}: {exc}"
            log.error("effect_failed", trigger=trigger, error=str(exc))
            self.recorder.action(trigger, "failed", started, error=str(exc)[:500])
            # a failed effect must still release ``busy``: the call failed, outcome unknown
            self.post("effect", name=effect, ok=False, error=str(exc)[:200])

    # -- start-up --------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.inbox.loop = loop
        self.start_time = self.clock.wall()
        if self.handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        # "start" is the first input of every run: replay resets its machine there
        self.post("start", settings=asdict(self.settings))
        try:
            await self._startup()
        except AgentExit as exc:
            log.error("agent_exit", reason=str(exc))
            await self._teardown()
            return exc.code
        self._sources += [
            asyncio.ensure_future(self.views.watch()),
            asyncio.ensure_future(self.renewal.run()),
            asyncio.ensure_future(
                probe_loop(self.state, self.pg, self.watch, self.fork, self.sync.tick)
            ),
        ]
        if self.archiving is not None and self.services.archiver_stats is not None:
            self.tasks.spawn(
                self.archiving.watch_archiver(
                    self.services.archiver_stats, lambda: self.pg.running
                ),
                "watch_archiver",
            )
        if self.archiving is not None:
            self.tasks.spawn(self.archiving.watch_backups(), "watch_backups")
        if self.scheduler is not None:
            self.tasks.spawn(self.scheduler.run(), "backup_schedule")
        try:
            # ``_done`` is set only by this loop (``_maybe_finish_stop`` below), so waiting on
            # the queue alone is enough: no task per input to watch it too
            while not self._done.is_set():
                inp = await self.inbox.queue.get()
                try:
                    self.handle(inp)
                except OSError as exc:
                    # a full disk (journal, state file) must not end the agent: the decision was
                    # taken, only its record failed; the next input goes on
                    self.recorder.count("record_failures")
                    log.error("record_failed", error=str(exc))
                if self.state.snapshot.stop_requested and not self._stopping:
                    await self._maybe_finish_stop()
        finally:
            await self._teardown()
        return self.exit_code

    async def _startup(self) -> None:
        log.info("agent_start", name=self.name, cluster=self.cfg.cluster, dcs=self.cfg.dcs.type)
        self.pg.write_passfile()
        if self.archiving is not None:
            try:
                # before PostgreSQL starts: its archive_command reads this file
                self.archiving.write_config()
            except (BackupError, BackupSettingsError, OSError) as exc:
                raise AgentExit(2, f"backup: cannot write pgbackrest.conf: {exc}") from exc
        if self.services.bootstrap is not None and not _holds_data(self.cfg.postgresql.data_dir):
            try:
                # a member with no data yet may be the one that initialises the cluster: its
                # restore must not fail on what a look at the config could have told
                self.services.bootstrap.check()
            except (BackupError, BackupSettingsError, OSError) as exc:
                raise AgentExit(2, f"bootstrap: {exc}") from exc
        await self._connect_dcs()
        await self._join_cluster()
        await self._abandon_interrupted_restore()
        facts = await self.pg.probe()
        self.post("pg", **pg_facts_to_dict(facts))
        for sink in self.recorder.sinks:
            # never blocks: the Kafka sink's records wait in its spool until the broker answers
            await sink.start()
        if self.services.peer_feed is not None:
            await self.services.peer_feed.start()
        if self.services.kubernetes is not None:
            self.services.kubernetes.start(self.state.role)
        if self.services.serve_api:
            from pgsidecar.api import ApiServer

            self.api = ApiServer(
                AgentApi(self), self.cfg.api, registry=self.services.metrics_registry
            )
            await self.api.start()

    async def _abandon_interrupted_restore(self) -> None:
        """A restore from another cluster's repository that this member's previous run began and
        never completed (it was killed): its data directory is partial, and its
        postgresql.auto.conf holds the source's recovery target (a standby started on it would
        replay to the target and promote on its own). Wipe it and give the initialize key back
        if it names us, so the race runs again."""
        boot = self.services.bootstrap
        if boot is None or not boot.interrupted():
            return
        started = self.clock.monotonic()
        log.warning("restore_interrupted", data_dir=str(self.cfg.postgresql.data_dir))
        await self.pg.wipe_data()
        delay = 0.2
        while True:
            try:
                await self.dcs.cancel_initialize(self.name)
                break
            except DCSError as exc:
                log.warning("cancel_initialize_failed", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        # only now: killed before this, the next start wipes and gives the key back again
        boot.settle()
        self.recorder.action("restore_from_repository", "abandoned", started)

    async def _join_cluster(self) -> None:
        """Open our session, register our member key, release a key our previous incarnation
        left. A transient DCS error (a timeout, a lost answer) retries the whole step with a
        back-off, as connecting does: it must not end the agent (the simulator found an agent
        killed by one timed-out register_member at start-up)."""
        delay = 0.2
        while True:
            try:
                await self.renewal.open_session()
                try:
                    await self.dcs.register_member(self.name, self.members.member_data())
                except DuplicateMember as exc:
                    raise AgentExit(
                        1,
                        f"another live agent already uses member name {self.name!r} in cluster "
                        f"{self.cfg.cluster!r}: give this member a unique `name` ({exc})",
                    ) from exc
                view = await self.dcs.read_cluster()
                if view.leader is not None and view.leader.name == self.name:
                    # The key of our previous incarnation: its PostgreSQL died with it
                    # (pdeathsig), so nothing is writable. Release it so the election starts now
                    # rather than after the TTL.
                    released = await self.dcs.release_leader(self.name, view.leader.term)
                    log.info("released_stale_leader_key", term=view.leader.term, released=released)
                return
            except AuthError as exc:
                raise AgentExit(2, str(exc)) from exc
            except (DCSError, TimeoutError) as exc:
                log.warning("dcs_join_failed_retrying", error=str(exc) or type(exc).__name__)
                if self._stopping:
                    raise AgentExit(0, "stopped while joining the cluster") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _connect_dcs(self) -> None:
        delay = 0.2
        logged = False
        while True:
            try:
                await self.dcs.connect()
                return
            except AuthError as exc:
                raise AgentExit(2, str(exc)) from exc
            except DCSError as exc:
                if not logged:
                    log.warning("dcs_unreachable_waiting", error=str(exc))
                    logged = True
                if self._stopping:
                    raise AgentExit(0, "stopped while waiting for the DCS") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- stopping --------------------------------------------------------------------------------

    def request_stop(self) -> None:
        if self.state.snapshot.stop_requested:
            return
        log.info("stop_requested")
        self.post("stop")

    async def _maybe_finish_stop(self) -> None:
        role = self.state.role
        if role is Role.MASTER:
            return  # the shutdown transition runs the hand-off; we finish after it
        if role is Role.DEMOTED and self.state.snapshot.busy:
            return  # the hand-off is running
        self._stopping = True
        if self._effect_task is not None and not self._effect_task.done():
            self._effect_task.cancel()
            with contextlib.suppress(BaseException):
                await self._effect_task
        await self.effect_context.runner.stop("fast")
        self._done.set()

    async def _teardown(self) -> None:
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
        for t in self._sources:
            t.cancel()
        for t in self._sources:
            with contextlib.suppress(BaseException):
                await t
        await self.tasks.cancel_all()
        if self.pg.running:
            self.watch.expect_exit()
            with contextlib.suppress(Exception):
                await self.pg.stop("fast")
        self.fence.stop()
        with contextlib.suppress(Exception):
            await bounded(self.dcs.close_session(), 2)
        with contextlib.suppress(Exception):
            await self.dcs.close()
        if self.api is not None:
            with contextlib.suppress(Exception):
                await self.api.stop()
        if self.services.peer_feed is not None:
            with contextlib.suppress(Exception):
                await self.services.peer_feed.close()
        if self.services.kubernetes is not None:
            await self.services.kubernetes.close()
        for sink in self.recorder.sinks:
            with contextlib.suppress(Exception):
                await bounded(sink.close(), 4)
        log.info("agent_stopped", code=self.exit_code)


class AgentApi:
    """The agent as the REST API sees it (pgsidecar.api.AgentStatus): a read-only status view
    and the commands an operator may send."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    @property
    def name(self) -> str:
        return self._agent.name

    @property
    def cluster(self) -> str:
        return self._agent.cfg.cluster

    def role(self) -> Role:
        return self._agent.state.role

    def snapshot(self) -> Snapshot:
        return self._agent.state.snapshot

    def lease_valid(self) -> bool:
        """The fence is armed and its deadline has not passed (our own clock)."""
        return self._agent.fence.armed_and_valid()

    def fencing_margin(self) -> float | None:
        """Seconds left before the fencing deadline of the lease we hold (None: no lease). Each
        renewal moves the deadline; a margin that shrinks towards 0 is a renewal running late."""
        a = self._agent
        if not a.state.snapshot.lease.held or not a.fence.armed_and_valid():
            return None
        return a.renewal.fence_deadline(a.state.lease_sent) - a.clock.monotonic()

    def pg_running(self) -> bool:
        return self._agent.pg.running

    def term(self) -> int | None:
        return self._agent.state.term()

    def last_error(self) -> str | None:
        return self._agent.state.last_error

    def uptime(self) -> float:
        return self._agent.clock.wall() - self._agent.start_time

    def counters(self) -> Mapping[str, int]:
        return self._agent.recorder.counters

    def tags(self) -> dict[str, Any]:
        return self._agent.cfg.tags.model_dump()

    def own_member_key(self) -> Mapping[str, Any]:
        view = self._agent.state.dcs_view
        data = view.members.get(self.name) if view is not None else None
        return data if isinstance(data, dict) else {}

    def backup_health(self) -> dict[str, Any] | None:
        archiving = self._agent.archiving
        return archiving.health() if archiving is not None else None

    def alive(self) -> tuple[bool, str]:
        """The loop runs and none of its input sources (DCS watch, lease renewal, probe) has
        died. A hung event loop needs no check: it would not answer the request at all."""
        a = self._agent
        if a._done.is_set():
            return False, "the agent loop has finished"
        for task in a._sources:
            if task.done():
                return False, f"an input source of the agent ended ({task.get_name()})"
        return True, ""

    def command(self, name: str) -> None:
        """An operator's restart / reinit of this member: an input, recorded like any other."""
        self._agent.post("command", name=name)

    async def request_switchover(self, target: str | None) -> dict[str, Any]:
        from pgsidecar.ops import request_switchover

        return await request_switchover(self._agent.dcs, target)
