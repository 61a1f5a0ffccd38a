"""The agent runtime: one asyncio queue of inputs, the role machine, and the effects.

Sources of inputs (each a task that only *posts* to the queue, never decides):

    DCS watch         every change of the cluster's keys (event-driven: etcd watch / Consul
                      blocking query), as a ``dcs`` input
    lease renewal     a timer at ttl/4; success re-arms the watchdog, SessionLost or the watchdog
                      firing posts ``lease`` {held: false}
    PostgreSQL        a health probe every ``probe_interval`` (only changes are posted) and the
                      postmaster's exit (awaited, so a crash is seen at once)
    effects           each effect posts its outcome as an ``effect`` input
    timers            a Decision's ``wake_at``
    signals, API      SIGTERM -> ``stop``; switchover is a DCS key, so it arrives as a ``dcs`` input

The loop takes one input at a time: record it, ``fsm.inputs.step`` (fold + decide), fire the
transitions on the RoleMachine, record them, start the effect. Effects run one at a time as tasks
(``busy`` in the snapshot); the master's fencing effect cancels whatever else is running.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import structlog
from prometheus_client import CollectorRegistry

from events.dcs import DCS, AuthError, ClusterView, DCSError, DuplicateMember, SessionLost
from events.dcs.factory import create_dcs
from events.sinks import JournalSink, LogSink, Sink
from fsm.inputs import Input, pg_facts, pg_facts_to_dict, step
from fsm.machine import Decision, Effect, Role, RoleMachine
from fsm.records import Record
from fsm.snapshot import DataState, PgFacts, Settings, Snapshot
from pgsidecar.config import AgentConfig, slot_name
from pgsidecar.postgres.control import Conninfo, PostgresControl, PostgresError
from pgsidecar.watchdog import Watchdog

log = structlog.get_logger("pgsidecar.agent")

SEQ_BLOCK = 1000
# how long the master keeps the replication slot of a member whose key has vanished
SLOT_GRACE = 1800.0
# a replica that has not streamed from the master for this long checks whether its timeline forked
FORK_CHECK_AFTER = 5.0


class AgentExit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class SeqStore:
    """seq survives restarts: we reserve blocks of SEQ_BLOCK numbers in state.json (fsync'd), so a
    restart continues above anything already used (gaps allowed, never a repeat)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        state: dict[str, Any] = {}
        if path.exists():
            try:
                state = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                state = {}
        self.instance_id: str = state.get("instance_id") or uuid.uuid4().hex
        self._next = max(
            int(state.get("seq_reserved", 0)), _last_journal_seq(path.parent / "journal.jsonl")
        )
        self._reserved = self._next
        self._reserve()

    def _reserve(self) -> None:
        self._reserved = self._next + SEQ_BLOCK
        tmp = self.path.with_suffix(".tmp")
        try:
            with open(tmp, "w") as fh:
                json.dump({"instance_id": self.instance_id, "seq_reserved": self._reserved}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            # a full disk must not stop the machine: go on in memory; a restart continues above
            # the journal's last seq as well (see __init__)
            log.error("seq_reservation_failed", error=str(exc))

    def next(self) -> int:
        self._next += 1
        if self._next >= self._reserved:
            self._reserve()
        return self._next


def _last_journal_seq(path: Path) -> int:
    """The seq of the journal's last complete line (0 if none): seq must stay above it even if
    a block reservation could not be written."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            lines = fh.read().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            seq = json.loads(line).get("seq")
        except (ValueError, AttributeError):
            continue
        if isinstance(seq, int):
            return seq
    return 0


def _view_to_input(view: ClusterView) -> dict[str, Any]:
    sw = view.switchover
    if (
        isinstance(sw, dict)
        and isinstance(sw.get("at"), (int, float))
        and not isinstance(sw.get("at"), bool)
    ):
        # a scheduled switchover: the wall-clock time becomes our monotonic clock here, in the
        # recorded input, so the machine (and its replay) only ever compares monotonic times
        sw = {**sw, "at_monotonic": time.monotonic() + (float(sw["at"]) - time.time())}
    return {
        "leader": {"name": view.leader.name, "term": view.leader.term} if view.leader else None,
        "members": view.members,
        "initialize": view.initialize,
        "config": view.config,
        "switchover": sw,
        "sync": view.sync,
        "index": view.index,
    }


class Agent:
    def __init__(self, cfg: AgentConfig, extra_sinks: list[Sink] | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.state_dir = cfg.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.seqs = SeqStore(self.state_dir / "state.json")
        self.queue: asyncio.Queue[Input] = asyncio.Queue()
        self.machine = RoleMachine(cfg.cluster, cfg.name)
        cs = cfg.cluster_settings
        self.settings = Settings(
            ttl=cs.ttl,
            maximum_lag_on_failover=cs.maximum_lag_on_failover,
            election_timeout=cs.election_timeout,
            master_start_timeout=cfg.postgresql.master_start_timeout,
            rewind_attempts=cfg.postgresql.rewind_attempts,
            nofailover=cfg.tags.nofailover,
            failover_priority=cfg.tags.failover_priority,
            synchronous_mode=cs.synchronous_mode,
            synchronous_node_count=cs.synchronous_node_count,
        )
        self.snapshot = Snapshot(name=cfg.name, settings=self.settings)
        self.dcs: DCS = create_dcs(cfg.dcs, cfg.cluster)
        self.pg = PostgresControl(cfg.postgresql, self.state_dir, cfg.name, log)
        self.sinks: list[Sink] = [
            JournalSink(self.state_dir / "journal.jsonl"),
            LogSink(log),
            *(extra_sinks or []),
        ]
        self.kube: Any = None
        self.pod_watcher: Any = None
        self.labeler: Any = None
        self.pod_killer: Any = None
        self.kafka_sink: Any = None
        self.peer_consumer: Any = None
        # one registry for everything /metrics serves (the API's gauges and the Kafka sink's)
        self.metrics_registry = CollectorRegistry()
        if cfg.kafka.bootstrap_servers:
            from events.kafka import KafkaSink

            # the spool drop is itself recorded (an action with our own seq)
            self.kafka_sink = KafkaSink.from_settings(
                cfg.kafka,
                cfg.cluster,
                cfg.name,
                self.state_dir,
                on_drop=self._spool_dropped,
                registry=self.metrics_registry,
            )
            self.sinks.append(self.kafka_sink)
        self.watchdog = Watchdog(
            fence=self.pg.fence,
            on_fired=self._watchdog_fired,
            postmaster_pid=lambda: self.pg.postmaster_pid,
            state_dir=self.state_dir,
            device=cfg.fencing.device if cfg.fencing.mode != "off" else None,
            device_required=cfg.fencing.mode == "required",
            safety_margin=cfg.fencing.safety_margin,
        )
        from pgsidecar.syncrep import SyncManager

        self.sync = SyncManager(self)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._side_tasks: set[asyncio.Task[Any]] = set()
        # when the last successful grant or renewal of our session was *sent*: the session (and
        # a leader key bound to it) lives at least ttl after that on the DCS's clock. An acquire
        # does not extend it, so the fencing deadline after winning counts from here.
        self._lease_sent = 0.0
        self._effect_task: asyncio.Task[Any] | None = None
        self._exit_waiter: asyncio.Task[Any] | None = None
        self._expected_exit = False
        self._last_pg: dict[str, Any] | None = None
        self._last_member: dict[str, Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._leader_term: int | None = None
        self._stopping = False
        self._done = asyncio.Event()
        self.exit_code = 0
        self.start_time = time.time()
        self.api: Any = None
        self.counters: dict[str, int] = {"inputs": 0, "transitions": 0, "malformed_dcs_values": 0}
        self.dcs_view: ClusterView | None = None
        self.last_error: str | None = None
        self._member_last_seen: dict[str, float] = {}
        self._applied_params: dict[str, Any] | None = None
        self._not_streaming_since: float | None = None
        self._view_index = -1  # the store index of the newest view posted to the machine
        self._last_fork_check = 0.0
        self.pending_restart: list[str] = []
        self._slot_members: set[str] = set()

    # -- records ---------------------------------------------------------------------------------

    def _emit(self, rec: Record) -> None:
        for sink in self.sinks:
            try:
                sink.emit(rec)
            except Exception as exc:  # a sink must never stop the machine
                log.warning("sink_failed", sink=type(sink).__name__, error=str(exc))

    def _term(self) -> int | None:
        s = self.snapshot
        if s.lease.held and s.lease.term is not None:
            return s.lease.term
        return s.dcs.leader.term if s.dcs.leader else None

    def record_action(self, name: str, outcome: str, started: float, **detail: Any) -> None:
        body = {
            "name": name,
            "outcome": outcome,
            "duration": round(time.monotonic() - started, 3),
            **detail,
        }
        self._emit(
            Record(
                "action",
                self.cfg.cluster,
                self.name,
                self.seqs.next(),
                time.time(),
                self._term(),
                body,
            )
        )

    def _spool_dropped(self, body: dict[str, Any]) -> None:
        self.counters["spool_dropped"] = self.counters.get("spool_dropped", 0) + int(
            body.get("dropped", 0)
        )
        self._emit(
            Record(
                "action",
                self.cfg.cluster,
                self.name,
                self.seqs.next(),
                time.time(),
                self._term(),
                body,
            )
        )

    def _peer_record(self, rec: Record) -> None:
        """A peer's transition from Kafka: fed to the machine as an advisory ``peer`` input
        (recorded like any input). It never decides leadership: only the DCS does. Only
        transitions are fed, so our own input records of peers do not echo back."""
        if rec.kind != "transition" or rec.node == self.name or rec.cluster != self.cfg.cluster:
            return
        b = rec.body
        self.post(
            "peer",
            node=rec.node,
            seq=rec.seq,
            term=rec.term,
            source=b.get("from"),
            dest=b.get("to"),
            trigger=b.get("trigger"),
            lsn=b.get("lsn"),
            timeline=b.get("timeline"),
        )

    # -- the loop --------------------------------------------------------------------------------

    def post(self, type_: str, **data: Any) -> None:
        self.queue.put_nowait(Input(type_, time.monotonic(), data))

    def _post_threadsafe(self, type_: str, **data: Any) -> None:
        if self.loop is not None and not self.loop.is_closed():
            # call_soon_threadsafe takes no keyword arguments: bind them first (found by the
            # fault suite: the TypeError killed the watchdog thread right after it fenced)
            self.loop.call_soon_threadsafe(functools.partial(self.post, type_, **data))

    def handle(self, inp: Input) -> None:
        self.counters["inputs"] += 1
        self._emit(
            Record(
                "input",
                self.cfg.cluster,
                self.name,
                self.seqs.next(),
                time.time(),
                self._term(),
                inp.to_dict(),
            )
        )
        role = self.machine.role
        snapshot, taken, final = step(role, self.snapshot, inp)
        self.snapshot = snapshot
        for _source, decision, _dest in taken:
            tr = self.machine.fire(decision, snapshot, self.seqs.next(), time.time())
            self.counters["transitions"] += 1
            self._emit(tr.to_record())
            self._on_transition(decision, snapshot)
        self._schedule_wake(final)
        if taken:
            self._label_role()
            self._publish_member()
            self._register_service()
        if inp.type == "dcs":
            self._kubernetes_on_view()
            if self.cluster_parameters() != self._applied_params:
                self._side_task(self.apply_cluster_parameters(), "apply_parameters")
        if inp.type == "dcs" and self.machine.role is Role.MASTER and not snapshot.busy:
            names = set(snapshot.dcs.members) - {self.name}
            now = time.monotonic()
            for n in names:
                self._member_last_seen[n] = now
            if names != self._slot_members:
                self._slot_members = names
                self._side_task(self._sync_slots(), "sync_slots")

    def _side_task(self, coro: Any, what: str) -> None:
        """A task beside the machine (publishing, slots, parameters, service registration): kept
        referenced until it ends, its exception logged, never lost silently; cancelled at exit."""
        task = asyncio.ensure_future(coro)
        self._side_tasks.add(task)

        def finished(t: asyncio.Task[Any]) -> None:
            self._side_tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("side_task_failed", task=what, error=str(t.exception()))

        task.add_done_callback(finished)

    def _schedule_wake(self, d: Decision) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if d.wake_at is not None and self.loop is not None:
            delay = max(0.0, d.wake_at - time.monotonic()) + 0.001
            self._timer = self.loop.call_later(delay, self.post, "timer")

    def _on_transition(self, decision: Decision, s: Snapshot) -> None:
        trigger = decision.trigger
        assert trigger is not None
        effect = getattr(self, f"_fx_{trigger}", None)
        if (
            trigger == "lease_lost"
            and self._effect_task is not None
            and not self._effect_task.done()
        ):
            # nothing may keep a master writable without the lease: cancel whatever runs
            self._effect_task.cancel()
        if effect is None:
            return
        self._effect_task = asyncio.ensure_future(self._run_effect(trigger, effect))

    async def _run_effect(self, trigger: str, fn: Any) -> None:
        started = time.monotonic()
        try:
            await fn()
        except asyncio.CancelledError:
            self.record_action(trigger, "cancelled", started)
            raise
        except Exception as exc:
            self.last_error = f"{trigger}: {exc}"
            log.error("effect_failed", trigger=trigger, error=str(exc))
            self.record_action(trigger, "failed", started, error=str(exc)[:500])
            # a failed effect must still release ``busy``; each effect posts its own outcome on
            # success, so post a generic failure here
            from fsm.machine import EFFECT

            self.post("effect", name=EFFECT[trigger], ok=False, error=str(exc)[:200])

    # -- start-up --------------------------------------------------------------------------------

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.request_stop)
        # "start" is the first input of every run: replay resets its machine there
        self.post("start", settings=self._settings_dict())
        try:
            await self._startup()
        except AgentExit as exc:
            log.error("agent_exit", reason=str(exc))
            await self._teardown()
            return exc.code
        self._tasks += [
            asyncio.ensure_future(self._watch_dcs()),
            asyncio.ensure_future(self._renew_loop()),
            asyncio.ensure_future(self._probe_loop()),
        ]
        try:
            while not self._done.is_set():
                get = asyncio.ensure_future(self.queue.get())
                done_wait = asyncio.ensure_future(self._done.wait())
                await asyncio.wait({get, done_wait}, return_when=asyncio.FIRST_COMPLETED)
                done_wait.cancel()
                if not get.done():
                    get.cancel()
                    break
                try:
                    self.handle(get.result())
                except OSError as exc:
                    # a full disk (journal, state file) must not end the agent: the decision was
                    # taken, only its record failed; the next input goes on
                    self.counters["record_failures"] = self.counters.get("record_failures", 0) + 1
                    log.error("record_failed", error=str(exc))
                if self.snapshot.stop_requested and not self._stopping:
                    await self._maybe_finish_stop()
        finally:
            await self._teardown()
        return self.exit_code

    def _settings_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self.settings)

    async def _startup(self) -> None:
        log.info("agent_start", name=self.name, cluster=self.cfg.cluster, dcs=self.cfg.dcs.type)
        self.pg.write_passfile()
        # If a postmaster of ours survived (it should not: it dies with its agent), stop it before
        # anything else: we never resume with a PostgreSQL whose role we did not set.
        await self._connect_dcs()
        sent = time.monotonic()
        await self.dcs.open_session(self.settings.ttl)
        self._lease_sent = sent
        try:
            await self.dcs.register_member(self.name, self._member_data())
        except DuplicateMember as exc:
            raise AgentExit(
                1,
                f"another live agent already uses member name {self.name!r} in cluster {self.cfg.cluster!r}: "
                f"give this member a unique `name` ({exc})",
            ) from exc
        view = await self.dcs.read_cluster()
        if view.leader is not None and view.leader.name == self.name:
            # The key of our previous incarnation: its PostgreSQL died with it (pdeathsig), so
            # nothing is writable. Release it so the election starts now rather than after the TTL.
            released = await self.dcs.release_leader(self.name, view.leader.term)
            log.info("released_stale_leader_key", term=view.leader.term, released=released)
        facts = await self.pg.probe()
        self.post("pg", **pg_facts_to_dict(facts))
        if self.kafka_sink is not None:
            # never blocks: records wait in the spool until the broker answers
            await self.kafka_sink.start()
            from events.kafka import KafkaPeerConsumer, default_topic

            self.peer_consumer = KafkaPeerConsumer(
                self.cfg.kafka.bootstrap_servers,
                self.cfg.kafka.topic or default_topic(self.cfg.cluster),
                self.name,
                self._peer_record,
                cluster=self.cfg.cluster,
            )
            await self.peer_consumer.start()
        if self.cfg.kubernetes.enabled:
            self._start_kubernetes()
        if self.cfg.api.port:
            from pgsidecar.api import ApiServer

            self.api = ApiServer(self)
            await self.api.start()

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

    # -- Kubernetes ------------------------------------------------------------------------------

    def _start_kubernetes(self) -> None:
        """Pod events become inputs; our pod's role label follows the machine; the master may
        delete a long-unhealthy member's pod (off by default). Without a service-account token
        or API server the agent runs DCS-only: the watcher says so once and retries; nothing
        here ever blocks a failover."""
        from events.k8s import KubeApi, PodKiller, PodLabeler, PodWatcher

        k = self.cfg.kubernetes
        self.kube = KubeApi(k)
        self.labeler = PodLabeler(k, log, api=self.kube)
        self.pod_killer = PodKiller(k, log, own_member=self.name, api=self.kube)
        self.pod_watcher = PodWatcher(
            k, self._pod_event, log, api=self.kube, cluster=self.cfg.cluster
        )
        self.pod_watcher.start()
        self.labeler.start()
        self._label_role()

    def _pod_event(self, ev: Any) -> None:
        self.labeler.observe(ev)
        self.pod_killer.observe_pod(ev)
        self.post("pod", **ev.to_input()["data"])

    def _label_role(self) -> None:
        """The label follows the lease, never the other way round: master only while we are
        master; a demoting master loses its label as the transition's first step."""
        if self.labeler is None:
            return
        role = self.machine.role
        self.labeler.set_role(
            "master" if role is Role.MASTER else "replica" if role is Role.REPLICA else None
        )

    def _kubernetes_on_view(self) -> None:
        if self.pod_killer is None:
            return
        s = self.snapshot
        health = {
            n: m.running and (m.role == "master" or m.streaming or m.role in ("init", "rewinding"))
            for n, m in s.dcs.members.items()
        }
        self.pod_killer.observe_health(health)
        if self.machine.role is Role.MASTER and self.cfg.kubernetes.kill_unhealthy_pods:

            async def kill() -> None:
                body = await self.pod_killer.maybe_kill(is_master=True)
                if body is not None:
                    self._emit(
                        Record(
                            "action",
                            self.cfg.cluster,
                            self.name,
                            self.seqs.next(),
                            time.time(),
                            self._term(),
                            body,
                        )
                    )

            self._side_task(kill(), "pod_killer")

    # -- input sources ----------------------------------------------------------------------------

    async def _watch_dcs(self) -> None:
        async for view in self.dcs.watch():
            self._post_view(view, from_watch=True)

    def _post_view(self, view: ClusterView, from_watch: bool) -> None:
        """A view of the DCS for the machine, from the watch or from a read after an outage. A
        read never posts a view older than one the watch already posted (the two race); the
        watch's own views always go (its index may restart, e.g. Consul's index reset)."""
        if not from_watch and view.index < self._view_index:
            return
        self._view_index = view.index
        self.dcs_view = view
        if view.malformed:
            self.counters["malformed_dcs_values"] += len(view.malformed)
            for key, reason in view.malformed:
                log.warning("dcs_value_skipped", key=key, reason=reason)
        self.post("dcs", **_view_to_input(view))

    async def _post_fresh_view(self, within: float) -> None:
        """The DCS answers again (or our session was reopened): read the cluster and post it.
        The watch only reports *changes*; without this, a member that saw the DCS go away would
        wait for one (``reachable`` stays false) when nothing changed during the outage."""
        try:
            view = await asyncio.wait_for(self.dcs.read_cluster(), timeout=within)
        except (DCSError, TimeoutError) as exc:
            log.info("fresh_view_failed", error=str(exc) or type(exc).__name__)
            return
        self._post_view(view, from_watch=False)

    async def _renew_loop(self) -> None:
        # the granted session TTL, not the configured ttl: Consul is given ttl/2 (it may take up
        # to twice the session TTL to invalidate), etcd the ttl itself
        ttl = self.dcs.session_ttl or self.settings.ttl
        interval = max(0.25, ttl / 4)
        down = False
        while True:
            await asyncio.sleep(interval)
            sent = time.monotonic()
            try:
                await asyncio.wait_for(self.dcs.renew_session(), timeout=interval)
                self._lease_sent = sent
                if self.snapshot.lease.held:
                    self.watchdog.arm(self._fence_deadline(sent))
                if down:
                    down = False
                    log.info("dcs_reachable_again")
                    await self._post_fresh_view(within=interval)
            except SessionLost:
                log.warning("session_lost")
                if self.snapshot.lease.held:
                    self.pg.fence()
                    self.watchdog.disarm()
                    self.post("lease", held=False, term=None)
                if await self._reopen_session():
                    down = False
                    await self._post_fresh_view(within=interval)
            except (TimeoutError, DCSError) as exc:
                if not down:
                    down = True
                    log.warning("lease_renew_failed", error=str(exc) or type(exc).__name__)
                    self.post("dcs_down")

    async def _reopen_session(self) -> bool:
        """A new session after ours was lost; our member key goes with it (bound to the session).
        False if the store did not answer: the next renewal finds the old session lost again
        and comes back here, so this is retried every renewal interval."""
        self._last_member = None  # the key went with the session: publish it again, whatever
        try:
            sent = time.monotonic()
            await asyncio.wait_for(
                self.dcs.open_session(self.settings.ttl), timeout=self.settings.ttl / 2
            )
            self._lease_sent = sent
            data = self._member_data()
            await asyncio.wait_for(
                self.dcs.put_member(self.name, data), timeout=self.settings.ttl / 2
            )
            self._last_member = data
        except (DCSError, TimeoutError) as exc:
            log.warning("session_reopen_failed", error=str(exc) or type(exc).__name__)
            return False
        log.info("session_reopened")
        return True

    def _fence_deadline(self, sent: float) -> float:
        cs = self.cfg.cluster_settings
        ttl = self.dcs.session_ttl or self.settings.ttl
        margin = max(0.5, min(2.0, ttl * 0.15))
        return sent + ttl * (1 - cs.clock_drift) - margin

    def _watchdog_fired(self) -> None:
        log.error("fencing_deadline_passed")
        self._post_threadsafe("lease", held=False, term=None)

    async def _probe_loop(self) -> None:
        interval = 1.0
        while True:
            await self.probe_now()
            s = self.snapshot
            if self.machine.role is Role.REPLICA:
                await self._check_fork()
            if self.machine.role is Role.MASTER and s.lease.held and not s.busy and self.pg.running:
                try:
                    await asyncio.wait_for(self.sync.tick(), timeout=5)
                except Exception as exc:
                    log.warning("sync_tick_failed", error=str(exc) or type(exc).__name__)
            await asyncio.sleep(interval)

    async def _check_fork(self) -> None:
        """A replica that has not streamed from the master for a while: has our timeline forked
        from the master's (we have WAL past the point where the master's history left our
        timeline)? Then PostgreSQL can never follow it: report it, the machine rewinds."""
        s = self.snapshot
        leader = s.dcs.leader
        if (
            s.busy
            or s.needs_rewind
            or leader is None
            or not s.pg.running
            or s.pg.receiver_streaming
        ):
            self._not_streaming_since = None
            return
        now = time.monotonic()
        if self._not_streaming_since is None:
            self._not_streaming_since = now
            return
        if (
            now - self._not_streaming_since < FORK_CHECK_AFTER
            or now - self._last_fork_check < FORK_CHECK_AFTER
        ):
            return
        self._last_fork_check = now
        src = self._leader_conninfo(replication=False)
        mine_tl, mine_lsn = s.pg.timeline, s.pg.lsn
        if src is None or mine_tl is None or mine_lsn is None:
            return
        try:
            history = await asyncio.wait_for(self.pg.timeline_history(src[1]), timeout=10)
        except (PostgresError, TimeoutError) as exc:
            log.info("fork_check_failed", error=str(exc))
            return
        leader_tl = (s.dcs.members.get(leader.name) and s.dcs.members[leader.name].timeline) or None
        switch = next((lsn for parent, lsn in history if parent == mine_tl), None)
        forked = (switch is not None and mine_lsn > switch) or (
            switch is None and leader_tl is not None and mine_tl != leader_tl
        )
        self.record_action(
            "fork_check", "forked" if forked else "not_forked", now, timeline=mine_tl, lsn=mine_lsn
        )
        if forked:
            self.post("effect", name="diverged", done=False)

    async def probe_now(self) -> PgFacts:
        facts = await self.pg.probe()
        if self._exit_waiter is None and facts.running and self.pg.running:
            self._watch_exit()
        data = pg_facts_to_dict(facts)
        if data != self._last_pg:
            self._last_pg = data
            self.post("pg", **data)
        self._publish_member()
        return facts

    def _watch_exit(self) -> None:
        if self._exit_waiter is not None and not self._exit_waiter.done():
            return
        self._expected_exit = False
        self._exit_waiter = asyncio.ensure_future(self._await_exit())

    async def _await_exit(self) -> None:
        code = await self.pg.wait_exit()
        self._exit_waiter = None
        if not self._expected_exit:
            log.warning("postgres_exited", code=code)
            facts = await self.pg.probe()
            data = pg_facts_to_dict(facts)
            data["crashed"] = True
            self._last_pg = data
            self.post("pg", **data)

    # -- member key ------------------------------------------------------------------------------

    def _member_data(self, **override: Any) -> dict[str, Any]:
        s = self.snapshot
        pg = s.pg
        data = {
            "instance_id": self.seqs.instance_id,
            "role": self.machine.role.value,
            "state": "running" if pg.running else "stopped",
            "running": pg.running,
            "streaming": pg.receiver_streaming,
            "timeline": pg.timeline,
            "lsn": pg.lsn,
            "host": self.cfg.postgresql.host,
            "port": self.cfg.postgresql.port,
            "api_url": self.cfg.api.url,
            "nofailover": self.cfg.tags.nofailover,
            "failover_priority": self.cfg.tags.failover_priority,
            "tags": self.cfg.tags.model_dump(),
            "election": s.announced_term,
            "pending_restart": bool(self.pending_restart),
            "pending_restart_reason": self.pending_restart,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
        }
        data.update(override)
        return data

    def _publish_member(self, **override: Any) -> None:
        data = self._member_data(**override)
        if data == self._last_member:
            return
        self._last_member = data
        self._side_task(self._put_member(data), "put_member")

    async def _put_member(self, data: dict[str, Any]) -> None:
        try:
            await asyncio.wait_for(
                self.dcs.put_member(self.name, data), timeout=max(1.0, self.settings.ttl / 3)
            )
        except (TimeoutError, DCSError) as exc:
            self._last_member = None  # try again on the next probe
            log.debug("member_publish_failed", error=str(exc))

    def _register_service(self) -> None:
        """Consul: keep our PostgreSQL registered as service <cluster> tagged master or replica,
        with an HTTP check on /primary or /replica, so master.<cluster>.service.consul resolves
        to the master. Other backends have no such thing."""
        register = getattr(self.dcs, "register_service", None)
        if (
            register is None
            or self.cfg.dcs.type != "consul"
            or not self.cfg.dcs.consul.register_service
        ):
            return
        master = self.machine.role is Role.MASTER
        tag = "master" if master else "replica"
        check = f"{self.cfg.api.url}/{'primary' if master else 'replica'}"

        async def go() -> None:
            try:
                await asyncio.wait_for(
                    register(
                        self.cfg.cluster,
                        [tag],
                        self.cfg.postgresql.port,
                        check,
                        address=self.cfg.postgresql.host,
                    ),
                    timeout=5,
                )
            except Exception as exc:
                log.warning("service_registration_failed", error=str(exc))

        self._side_task(go(), "register_service")

    # -- helpers for effects ------------------------------------------------------------------------

    def _leader_conninfo(self, replication: bool) -> tuple[str, Conninfo] | None:
        s = self.snapshot
        leader = s.dcs.leader
        if leader is None or leader.name == self.name:
            return None
        m = s.dcs.members.get(leader.name)
        if m is None or m.conn_host is None or m.conn_port is None:
            return None
        if replication:
            return leader.name, self.pg.replication_conninfo(m.conn_host, m.conn_port)
        return leader.name, self.pg.superuser_conninfo(m.conn_host, m.conn_port)

    def cluster_parameters(self) -> dict[str, Any]:
        """PostgreSQL parameters from the DCS config key (`config set postgresql.parameters.X=Y`),
        over the local config's."""
        view = self.dcs_view
        cfg = view.config if view is not None and isinstance(view.config, dict) else {}
        pg = cfg.get("postgresql") if isinstance(cfg.get("postgresql"), dict) else {}
        params = pg.get("parameters") if isinstance(pg, dict) else None
        if not isinstance(params, dict):
            return {}
        return {str(k): v for k, v in params.items() if isinstance(v, (str, int, float, bool))}

    def write_primary_config(self) -> None:
        self.pg.write_config(
            "primary",
            None,
            None,
            parameters={**self.cluster_parameters(), **self.sync.parameters()},
        )

    def write_standby_config(self, upstream: tuple[str, Conninfo] | None) -> None:
        self.pg.write_config(
            "standby",
            upstream[1] if upstream else None,
            slot_name(self.name) if upstream else None,
            parameters=self.cluster_parameters(),
        )

    async def apply_cluster_parameters(self) -> None:
        """A change of the cluster's PostgreSQL parameters: rewrite the config and reload; what
        needs a restart is published as pending_restart (shown by `list`)."""
        params = self.cluster_parameters()
        if params == self._applied_params or not self.pg.running or self.snapshot.busy:
            return
        previous, self._applied_params = self._applied_params, params  # also: one at a time
        role = self.machine.role
        started = time.monotonic()
        try:
            if role is Role.MASTER:
                self.write_primary_config()
            elif role is Role.REPLICA:
                self.write_standby_config(self._leader_conninfo(replication=True))
            else:
                return
            await self.pg.reload()
        except BaseException:
            # not applied: the next view of the DCS tries again
            self._applied_params = previous
            raise
        await asyncio.sleep(0.2)  # the postmaster re-reads the files asynchronously
        pending = await self._pending_restart()
        self.pending_restart = pending
        self.record_action(
            "apply_parameters", "ok", started, parameters=sorted(params), pending_restart=pending
        )
        self._publish_member()

    async def _pending_restart(self) -> list[str]:
        try:
            dsn = self.pg.superuser_conninfo().dsn(self.pg.passfile, connect_timeout=3)
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                cur = await conn.execute(
                    "SELECT name FROM pg_settings WHERE pending_restart ORDER BY name"
                )
                return [str(r[0]) for r in await cur.fetchall()]
        except psycopg.Error:
            return []

    def _clone_source(self) -> tuple[str, Conninfo] | None:
        """Where to clone from: a streaming replica tagged ``clonefrom`` (to spare the master the
        copy) if there is one, else the master."""
        view = self.dcs_view
        for name, raw in sorted((view.members if view is not None else {}).items()):
            tags = raw.get("tags") if isinstance(raw, dict) else None
            m = self.snapshot.dcs.members.get(name)
            if (
                name != self.name
                and isinstance(tags, dict)
                and tags.get("clonefrom") is True
                and m is not None
                and m.running
                and m.streaming
                and m.conn_host
                and m.conn_port
            ):
                return name, self.pg.replication_conninfo(m.conn_host, m.conn_port)
        return self._leader_conninfo(replication=True)

    async def _start_pg(self, role: str, upstream: tuple[str, Conninfo] | None) -> None:
        failures = self.snapshot.pg.start_failures
        if failures:
            # back off before anything else: a full disk fails already at writing the config
            await asyncio.sleep(min(5.0, 0.5 * 2**failures))
        started = time.monotonic()
        timeout = self.cfg.postgresql.master_start_timeout
        try:
            if role == "primary":
                self.write_primary_config()
            else:
                self.write_standby_config(upstream)
            await self.pg.start(timeout=timeout)
            # the fence process learns the new postmaster's pid now, not at its next ping
            self.watchdog.postmaster_started()
        except (PostgresError, OSError):
            facts = await self.pg.probe()
            data = pg_facts_to_dict(facts)
            data["start_failures"] = failures + 1
            self._last_pg = data
            self.post("pg", **data)
            raise
        self.record_action(
            "start_postgres",
            "ok",
            started,
            as_role=role,
            upstream=upstream[0] if upstream else None,
        )
        self._watch_exit()
        await self.probe_now()

    async def _stop_pg(self, mode: str) -> None:
        if not self.pg.running:
            return
        self._expected_exit = True
        started = time.monotonic()
        await self.pg.stop(mode)  # type: ignore[arg-type]
        self.record_action("stop_postgres", "ok", started, mode=mode)

    # -- effects, one per trigger (the table's EFFECT column) ----------------------------------------

    async def _fx_bootstrap(self) -> None:
        won = await self.dcs.try_initialize(self.name)
        if not won:
            self.post("effect", name=Effect.BOOTSTRAP, ok=True, won=False)
            return
        started = time.monotonic()
        try:
            await self.pg.initdb()
        except Exception:
            await self.dcs.cancel_initialize(self.name)
            raise
        self.record_action("initdb", "ok", started)
        await self.probe_now()
        self.post("effect", name=Effect.BOOTSTRAP, ok=True, won=True)

    async def _fx_clone(self) -> None:
        failures = self.snapshot.clone_failures
        if failures:
            # back off: the master may not have created the replication role yet
            await asyncio.sleep(min(10.0, 0.25 * 2**failures))
        src = self._clone_source()
        if src is None:
            self.post(
                "effect", name=Effect.CLONE, ok=False, error="no reachable master to clone from"
            )
            return
        started = time.monotonic()
        await self.pg.wipe_data()
        await self.pg.basebackup(src[1])
        self.record_action("basebackup", "ok", started, source=src[0])
        await self.probe_now()
        self.post("effect", name=Effect.CLONE, ok=True, source=src[0])

    async def _fx_start_replica(self) -> None:
        up = self._leader_conninfo(replication=True)
        await self._start_pg("standby", up)
        self.post("effect", name=Effect.START_STANDBY, ok=True, upstream=up[0] if up else None)

    _fx_restart = _fx_start_replica
    _fx_rewound = _fx_start_replica

    async def _fx_follow(self) -> None:
        up = self._leader_conninfo(replication=True)
        if up is None:
            self.post(
                "effect",
                name=Effect.FOLLOW,
                ok=False,
                error="the master's address is not published yet",
            )
            return
        self.write_standby_config(up)
        await self.pg.reload()
        self.post("effect", name=Effect.FOLLOW, ok=True, upstream=up[0])

    async def _fx_leader_lost(self) -> None:
        # publish a fresh position: peers compare theirs with it before anyone races
        await self.probe_now()
        term = self.snapshot.dcs.lost_term or 0
        data = self._member_data(election=term)
        self._last_member = data
        await self.dcs.put_member(self.name, data)
        self.post("effect", name=Effect.ANNOUNCE, ok=True, term=term)

    _fx_announce = _fx_leader_lost

    async def _fx_race(self) -> None:
        # A call that fails (error, timeout) raises: _run_effect posts ``ok: false`` (outcome
        # unknown: the DCS may have committed it), the machine retries after a back-off, and the
        # retry confirms a key our session already holds (acquire is idempotent for its holder).
        if not self.watchdog.can_lead():
            # fencing.mode: required and the watchdog device cannot be used: stand aside (an
            # answer, not a failure: the others race; we try again after a TTL)
            log.error("cannot_lead_without_watchdog_device", device=self.watchdog.device_state)
            self.post(
                "effect", name=Effect.ACQUIRE, ok=True, won=False, reason="no watchdog device"
            )
            return
        leader = await self.dcs.acquire_leader(self.name)
        if leader is not None and leader.name == self.name:
            # from the last renewal, not from this request: creating a key bound to the session
            # does not extend the session (a renewal sent just before could be up to ttl/4 old)
            self.watchdog.arm(self._fence_deadline(self._lease_sent))
            self.post("lease", held=True, term=leader.term)
            self.post("effect", name=Effect.ACQUIRE, ok=True, won=True, term=leader.term)
        else:
            self.post("effect", name=Effect.ACQUIRE, ok=True, won=False)

    async def _fx_release_key(self) -> None:
        """Not master (any more): give up the lease and delete a leader key that still names us
        (compare-and-delete on its term: a newer key, ours or anyone's, is never touched)."""
        s = self.snapshot
        leader = s.dcs.leader
        self.watchdog.disarm()
        released = None
        if leader is not None and leader.name == self.name:
            # a failed call raises here: _run_effect posts ``ok: false``, retried after back-off
            gone = await asyncio.wait_for(
                self.dcs.release_leader(self.name, leader.term),
                timeout=max(2.0, s.settings.ttl / 2),
            )
            log.info("released_leader_key", term=leader.term, released=gone)
            # deleted by us, or already not that key (deleted, lapsed or replaced): either way
            # a view showing this term is stale from now on
            released = leader.term
        if s.lease.held:
            self.post("lease", held=False, term=None)
        self.post("effect", name=Effect.RELEASE, ok=True, released_term=released)

    async def _fx_won_lease(self) -> None:
        started = time.monotonic()
        try:
            # synchronous mode: our own empty record before the first write is acknowledged
            await self.sync.prepare_promotion(self.snapshot.lease.term)
        except DCSError as exc:
            log.error("sync_record_failed_giving_up_lease", error=str(exc))
            self.watchdog.disarm()
            released = await self._release_own_key(self.snapshot.lease.term)
            self.post("lease", held=False, term=None)
            self.post("effect", name=Effect.PROMOTE, ok=False, released_term=released)
            return
        if not self.pg.running:
            await self._start_pg("primary", None)
        else:
            facts = await self.pg.probe()
            if facts.in_recovery:
                # the primary's settings (synchronous_standby_names) are loaded while still a
                # standby, so the first commit after promotion already waits as it must; then
                # promote: PostgreSQL removes standby.signal itself (and fails if it is gone)
                self.pg.write_config(
                    "standby",
                    None,
                    None,
                    parameters={**self.cluster_parameters(), **self.sync.parameters()},
                )
                with contextlib.suppress(Exception):
                    await self.pg.reload()
                await self.pg.promote()
            self.write_primary_config()
            with contextlib.suppress(Exception):
                await self.pg.reload()
        self.record_action("promote", "ok", started)
        try:
            await self.pg.ensure_roles()
        except Exception as exc:
            log.error("ensure_roles_failed", error=str(exc))
        await self._sync_slots()
        sw = self.snapshot.dcs.switchover
        if sw is not None:
            with contextlib.suppress(DCSError):
                await self.dcs.delete_switchover()
        await self.probe_now()
        self.post("effect", name=Effect.PROMOTE, ok=True)

    async def _sync_slots(self) -> None:
        """Keep a physical slot for every member, and for a member that vanished for
        SLOT_GRACE seconds more (a restarting member must find its slot and the WAL it needs)."""
        now = time.monotonic()
        for n in self.snapshot.dcs.members:
            if n != self.name:
                self._member_last_seen[n] = now
        keep = {n for n, seen in self._member_last_seen.items() if now - seen < SLOT_GRACE}
        try:
            await self.pg.ensure_slots(keep)
        except Exception as exc:
            log.warning("slot_sync_failed", error=str(exc))

    async def _fx_restart_in_place(self) -> None:
        if not self.watchdog.armed_and_valid():
            # the exit of a PostgreSQL the watchdog fenced can be seen before its lease input:
            # never start a primary without a lease valid on our own clock
            self.post("lease", held=False, term=None)
            self.post(
                "effect", name=Effect.START_PRIMARY, ok=False, error="lease not valid on our clock"
            )
            return
        await self._start_pg("primary", None)
        self.post("effect", name=Effect.START_PRIMARY, ok=True)

    async def _fx_lease_lost(self) -> None:
        self.watchdog.disarm()
        self.pg.fence()
        await self._stop_pg("immediate")
        await self.probe_now()
        if self.snapshot.lease.held:
            # the lease was lost by the key's view (gone, or someone else's), not by renewal: we
            # hold nothing any more, and must not re-arm the watchdog on the next renewal
            self.post("lease", held=False, term=None)
        self.post("effect", name=Effect.FENCE, ok=True)

    _fx_fence = _fx_lease_lost

    async def _handoff(self, exiting: bool) -> None:
        s = self.snapshot
        term = s.lease.term
        if self.pg.running:
            # a checkpoint while still writable makes the shutdown checkpoint short
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pg.checkpoint(), timeout=5)
            await self._stop_pg("fast")
        self.watchdog.disarm()
        cd = await self.pg.controldata()
        final = {"role": "demoted", "running": False, "state": "stopped"}
        if cd.checkpoint_lsn is not None:
            final.update(lsn=cd.checkpoint_lsn, timeline=cd.timeline)
        # announce the position we stopped at, then release: the target promotes once it has it
        with contextlib.suppress(DCSError, asyncio.TimeoutError):
            await asyncio.wait_for(
                self.dcs.put_member(self.name, self._member_data(**final)), timeout=2
            )
        released = await self._release_own_key(term, within=2.0)
        self.post("lease", held=False, term=None)
        await self.probe_now()
        self.post("effect", name=Effect.HANDOFF, ok=True, released_term=released)

    async def _fx_shutdown(self) -> None:
        await self._handoff(exiting=True)

    async def _fx_switchover(self) -> None:
        await self._handoff(exiting=False)

    async def _fx_start_timeout(self) -> None:
        await self._stop_pg("immediate")
        self.watchdog.disarm()
        released = await self._release_own_key(self.snapshot.lease.term)
        self.post("lease", held=False, term=None)
        self.post("effect", name=Effect.GIVE_UP, ok=True, released_term=released)

    async def _release_own_key(self, term: int | None, within: float | None = None) -> int | None:
        """Delete the leader key if it still names us at ``term`` (compare-and-delete). Returns
        the term when it is gone by our hand, None when not (a failed release is not an error
        here: the machine's ``release_key`` retries while a view still shows the key)."""
        if term is None:
            return None
        try:
            released = await asyncio.wait_for(
                self.dcs.release_leader(self.name, term),
                timeout=within or max(2.0, self.settings.ttl / 2),
            )
        except (DCSError, TimeoutError) as exc:
            log.warning(
                "leader_key_release_failed", term=term, error=str(exc) or type(exc).__name__
            )
            return None
        log.info("released_leader_key", term=term, released=released)
        return term if released else None

    _fx_promote_failed = _fx_start_timeout

    async def _fx_rewind(self) -> None:
        src = self._leader_conninfo(replication=False)
        if src is None:
            self.post("effect", name=Effect.REWIND, ok=False, error="master not reachable")
            return
        await self._stop_pg("fast")
        started = time.monotonic()
        result = await self.pg.rewind(src[1])
        self.record_action("pg_rewind", result, started, source=src[0])
        await self.probe_now()
        self.post("effect", name=Effect.REWIND, ok=True, result=result)

    _fx_rejoin = _fx_rewind
    _fx_retry_rewind = _fx_rewind

    async def _fx_restart_pg(self) -> None:
        """Operator restart: stop cleanly, start again in the same role (a master keeps its
        lease and its timeline; its watchdog keeps running)."""
        started = time.monotonic()
        role = "primary" if self.machine.role is Role.MASTER else "standby"
        await self._stop_pg("fast")
        up = None if role == "primary" else self._leader_conninfo(replication=True)
        await self._start_pg(role, up)
        self.pending_restart = await self._pending_restart()
        self.record_action("restart", "ok", started, as_role=role)
        self.post("effect", name=Effect.RESTART_PG, ok=True)

    async def _fx_reinit(self) -> None:
        await self._fx_reclone()

    async def _fx_reclone(self) -> None:
        await self._stop_pg("immediate")
        started = time.monotonic()
        await self.pg.wipe_data()
        self.record_action("wipe_data", "ok", started)
        await self.probe_now()
        self.post("effect", name=Effect.WIPE, ok=True)

    # -- stopping --------------------------------------------------------------------------------

    def request_stop(self) -> None:
        if self.snapshot.stop_requested:
            return
        log.info("stop_requested")
        self.post("stop")

    async def _maybe_finish_stop(self) -> None:
        role = self.machine.role
        if role is Role.MASTER:
            return  # the shutdown transition runs the hand-off; we finish after it
        if role is Role.DEMOTED and self.snapshot.busy:
            return  # the hand-off is running
        self._stopping = True
        if self._effect_task is not None and not self._effect_task.done():
            self._effect_task.cancel()
            with contextlib.suppress(BaseException):
                await self._effect_task
        await self._stop_pg("fast")
        self._done.set()

    async def _teardown(self) -> None:
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
        for t in [*self._tasks, *self._side_tasks]:
            t.cancel()
        for t in [*self._tasks, *self._side_tasks]:
            with contextlib.suppress(BaseException):
                await t
        if self.pg.running:
            self._expected_exit = True
            with contextlib.suppress(Exception):
                await self.pg.stop("fast")
        self.watchdog.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.dcs.close_session(), timeout=2)
        with contextlib.suppress(Exception):
            await self.dcs.close()
        if self.api is not None:
            with contextlib.suppress(Exception):
                await self.api.stop()
        if self.peer_consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.peer_consumer.close(), timeout=2)
        for closer in (self.pod_watcher, self.labeler, self.kube):
            if closer is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(closer.close(), timeout=3)
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sink.close(), timeout=4)
        log.info("agent_stopped", code=self.exit_code)


__all__ = ["Agent", "AgentExit", "DataState", "pg_facts"]
