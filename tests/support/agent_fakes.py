"""In-memory ports for the agent (pgsidecar.agent.ports): a DCS, a PostgreSQL, a fence, a sink,
a clock on the event loop's time. No process, no network. Each records the calls it got and can
be told to fail a call (``fail["method"] = exception``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from events.dcs import DCS, ClusterView, Leader, TimelineCounter
from events.sinks import Sink
from fsm.inputs import Input, apply
from fsm.machine import Role, RoleMachine
from fsm.records import Record
from fsm.snapshot import DataState, PgFacts
from pgsidecar.agent.loop import Agent, Inbox, Services
from pgsidecar.agent.ports import Ports
from pgsidecar.agent.sources import view_to_input
from pgsidecar.config import AgentConfig
from pgsidecar.postgres.control import Conninfo, ControlData, PostgresError
from pgsidecar.syncrep import ReplicationStats

WALL_OFFSET = 1_700_000_000.0


class ManualClock:
    """A clock a test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL_OFFSET + self.now


class LoopClock:
    """The agent's clock as the simulator gives it: monotonic is the event loop's time."""

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    def wall(self) -> float:
        return WALL_OFFSET + self.monotonic()


class Failing:
    """``fail[name]``: the exception the next calls of ``name`` raise (until removed)."""

    def __init__(self) -> None:
        self.fail: dict[str, BaseException] = {}
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def _call(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        exc = self.fail.get(name)
        if exc is not None:
            raise exc

    def called(self, name: str) -> list[tuple[Any, ...]]:
        return [args for n, args in self.calls if n == name]


class FakeDCS(DCS, Failing):
    """One cluster's keys in memory, with a single session for the agent under test."""

    def __init__(self, cluster: str = "c1") -> None:
        DCS.__init__(self, cluster)
        Failing.__init__(self)
        self.index = 0
        self.leader: Leader | None = None
        self.members: dict[str, dict[str, Any]] = {}
        self.initialize: str | None = None
        self.config: dict[str, Any] | None = None
        self.switchover: dict[str, Any] | None = None
        self.sync: dict[str, Any] | None = None
        self.sync_index = 0  # the sync key's modify index (0 while never written)
        self.standby_promoted: dict[str, Any] | None = None
        # backup/<type>: (value, modify index)
        self.backup_slots: dict[str, tuple[dict[str, Any], int]] = {}
        self.timeline = TimelineCounter()
        self.ttl = 0.0
        self.sessions = 0
        self._changed = asyncio.Event()

    def _bump(self) -> None:
        self.index += 1
        self._changed.set()

    async def connect(self) -> None:
        self._call("connect")

    async def close(self) -> None:
        self._call("close")

    @property
    def session_ttl(self) -> float:
        return self.ttl

    async def open_session(self, ttl: float) -> None:
        self._call("open_session", ttl)
        self.ttl = ttl
        self.sessions += 1

    async def renew_session(self) -> None:
        self._call("renew_session")

    async def close_session(self) -> None:
        self._call("close_session")

    async def acquire_leader(self, name: str) -> Leader | None:
        self._call("acquire_leader", name)
        if self.leader is None:
            self._bump()
            self.leader = Leader(name, self.index)
        return self.leader if self.leader.name == name else None

    async def release_leader(self, name: str, term: int) -> bool:
        self._call("release_leader", name, term)
        if self.leader == Leader(name, term):
            self.leader = None
            self._bump()
            return True
        return False

    async def register_member(self, name: str, data: dict[str, Any]) -> None:
        self._call("register_member", name, data)
        self.members[name] = data
        self._bump()

    async def put_member(self, name: str, data: dict[str, Any]) -> None:
        self._call("put_member", name, data)
        self.members[name] = data
        self._bump()

    async def read_backup_slot(self, kind: str) -> tuple[dict[str, Any] | None, int]:
        self._call("read_backup_slot", kind)
        await asyncio.sleep(0)  # a round trip: racing members interleave here
        value, index = self.backup_slots.get(kind, (None, 0))
        return (dict(value) if value is not None else None), index

    async def swap_backup_slot(self, kind: str, value: dict[str, Any], index: int) -> bool:
        self._call("swap_backup_slot", kind, value, index)
        await asyncio.sleep(0)
        if self.backup_slots.get(kind, (None, 0))[1] != index:
            return False
        self.index += 1
        self.backup_slots[kind] = (dict(value), self.index)
        return True

    async def try_initialize(self, name: str) -> bool:
        self._call("try_initialize", name)
        if self.initialize is None:
            self.initialize = name
            self._bump()
            return True
        return False

    async def cancel_initialize(self, name: str) -> bool:
        self._call("cancel_initialize", name)
        if self.initialize == name:
            self.initialize = None
            self._bump()
            return True
        return False

    async def put_config(self, config: dict[str, Any]) -> None:
        self._call("put_config", config)
        self.config = config
        self._bump()

    async def put_switchover(self, command: dict[str, Any]) -> None:
        self._call("put_switchover", command)
        self.switchover = command
        self._bump()

    async def delete_switchover(self) -> None:
        self._call("delete_switchover")
        self.switchover = None
        self._bump()

    async def put_standby_promoted(self, record: dict[str, Any]) -> None:
        self._call("put_standby_promoted", record)
        self.standby_promoted = record
        self._bump()

    async def put_sync(self, state: dict[str, Any]) -> None:
        self._call("put_sync", state)
        self.sync = state
        self._bump()
        self.sync_index = self.index

    async def read_sync(self) -> tuple[dict[str, Any] | None, int]:
        self._call("read_sync")
        return (dict(self.sync) if self.sync is not None else None), self.sync_index

    async def swap_sync(self, state: dict[str, Any], index: int) -> bool:
        self._call("swap_sync", state, index)
        if index != self.sync_index:
            return False
        self.sync = state
        self._bump()
        self.sync_index = self.index
        return True

    async def read_timeline(self) -> TimelineCounter:
        self._call("read_timeline")
        return self.timeline

    async def put_timeline(self, value: int, index: int) -> bool:
        self._call("put_timeline", value, index)
        if index != self.timeline.index:
            return False
        self._bump()
        self.timeline = TimelineCounter(value, self.index)
        return True

    def view(self) -> ClusterView:
        return ClusterView(
            leader=self.leader,
            members={k: dict(v) for k, v in self.members.items()},
            initialize=self.initialize,
            config=self.config,
            switchover=self.switchover,
            sync=self.sync,
            standby_promoted=self.standby_promoted,
            index=self.index,
        )

    async def read_cluster(self) -> ClusterView:
        self._call("read_cluster")
        return self.view()

    async def watch(self) -> AsyncIterator[ClusterView]:
        while True:
            self._changed.clear()
            yield self.view()
            await self._changed.wait()


class FakePostgres(Failing):
    """A PostgreSQL that starts, stops, promotes and probes in memory."""

    def __init__(self, data: DataState = DataState.MISSING) -> None:
        super().__init__()
        self.data = data
        self._running = False
        self.in_recovery = False
        self.receiver_streaming = False  # a standby's WAL receiver: what the probe reports
        self.timeline = 1 if data is not DataState.MISSING else None
        self.lsn = 100 if data is not DataState.MISSING else None
        self.configs: list[tuple[str, Conninfo | None, str | None, dict[str, Any]]] = []
        self.pending: list[str] = []
        self.rewind_result = "rewound"
        self.history: list[tuple[int, int]] = []
        # timelines with a history file in pg_wal (a promotion names one above them, as
        # PostgreSQL does)
        self.history_files: set[int] = set()
        # per server (host, port), where it differs from ``history``
        self.histories: dict[tuple[str, int], list[tuple[int, int]]] = {}
        self._exit: asyncio.Future[int] | None = None
        self.fenced = 0
        # start() waits for this event when set (a slow start an effect is cancelled in)
        self.start_gate: asyncio.Event | None = None

    @property
    def running(self) -> bool:
        return self._running

    def write_passfile(self) -> None:
        self._call("write_passfile")

    async def probe(self) -> PgFacts:
        if not self._running:
            return PgFacts(data=self.data, running=False, timeline=self.timeline)
        return PgFacts(
            data=DataState.STANDBY if self.in_recovery else DataState.PRIMARY_CRASHED,
            running=True,
            accepting=True,
            in_recovery=self.in_recovery,
            receiver_streaming=self.in_recovery and self.receiver_streaming,
            timeline=self.timeline,
            lsn=self.lsn,
        )

    async def wait_exit(self) -> int:
        if self._exit is None:
            raise PostgresError("not started")
        return await asyncio.shield(self._exit)

    def _exited(self, code: int) -> None:
        self._running = False
        if self._exit is not None and not self._exit.done():
            self._exit.set_result(code)

    def crash(self) -> None:
        self.data = DataState.PRIMARY_CRASHED if not self.in_recovery else DataState.STANDBY
        self._exited(-9)

    def fence(self) -> bool:
        self.calls.append(("fence", ()))
        self.fenced += 1
        was = self._running
        if was:
            self.crash()
        return was

    async def start(self, timeout: float) -> None:  # noqa: ASYNC109 - the port's signature
        self._call("start", timeout)
        if self.start_gate is not None:
            await self.start_gate.wait()
        if self.data is DataState.MISSING:
            raise PostgresError("no data directory")
        self.in_recovery = self.configs[-1][0] == "standby" if self.configs else False
        self._running = True
        self._exit = asyncio.get_running_loop().create_future()

    async def stop(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        self._call("stop", mode)
        if self._running:
            clean = mode == "fast"
            if self.in_recovery:
                self.data = DataState.STANDBY
            else:
                self.data = DataState.PRIMARY_CLEAN if clean else DataState.PRIMARY_CRASHED
            self._exited(0)

    async def promote(self) -> None:
        self._call("promote")
        self.in_recovery = False
        self.timeline = self.next_timeline(self.timeline or 1)
        self.history_files.add(self.timeline)

    async def reload(self) -> None:
        self._call("reload")

    async def checkpoint(self) -> None:
        self._call("checkpoint")

    async def ensure_roles(self) -> None:
        self._call("ensure_roles")

    async def ensure_slots(self, members: set[str]) -> None:
        self._call("ensure_slots", members)

    async def initdb(self) -> None:
        self._call("initdb")
        self.data = DataState.PRIMARY_CLEAN
        self.timeline, self.lsn = 1, 100

    async def basebackup(self, source: Conninfo) -> None:
        self._call("basebackup", source)
        self.data = DataState.STANDBY
        self.timeline, self.lsn = 1, 100

    async def wipe_data(self) -> None:
        self._call("wipe_data")
        self.data = DataState.MISSING
        self.timeline = self.lsn = None

    async def rewind(self, source: Conninfo) -> str:
        self._call("rewind", source)
        self.data = DataState.STANDBY
        return self.rewind_result

    async def controldata(self) -> ControlData:
        self._call("controldata")
        return ControlData(self.data, timeline=self.timeline, checkpoint_lsn=self.lsn)

    def write_config(
        self,
        role: Literal["primary", "standby"],
        upstream: Conninfo | None,
        slot: str | None,
        parameters: dict[str, Any] | None = None,
    ) -> None:
        self._call("write_config", role, upstream, slot, parameters)
        self.configs.append((role, upstream, slot, dict(parameters or {})))

    def superuser_conninfo(self, host: str | None = None, port: int | None = None) -> Conninfo:
        return Conninfo(host or "127.0.0.1", port or 5432, "postgres")

    def replication_conninfo(self, host: str, port: int) -> Conninfo:
        return Conninfo(host, port, "replicator")

    async def timeline_history(self, source: Conninfo) -> list[tuple[int, int]]:
        self._call("timeline_history", source)
        return self.histories.get((source.host, source.port), self.history)

    async def pending_restart_settings(self) -> list[str]:
        self._call("pending_restart_settings")
        return list(self.pending)

    def next_timeline(self, current: int) -> int:
        newest = current
        while newest + 1 in self.history_files:
            newest += 1
        return newest + 1

    def reserve_timelines(self, current: int, new: int) -> list[int]:
        self._call("reserve_timelines", current, new)
        written = [t for t in range(current + 1, new) if t not in self.history_files]
        self.history_files.update(written)
        return written


class FakeFence:
    """The watchdog's interface; ``fire()`` plays the deadline passing (as the thread would)."""

    def __init__(self, can_lead: bool = True) -> None:
        self.deadline: float | None = None
        self.lead = can_lead
        self.device_state: str | None = None
        self.started = 0
        self.stopped = False
        self.on_fired: Any = None

    def arm(self, deadline: float) -> None:
        self.deadline = deadline

    def disarm(self) -> None:
        self.deadline = None

    def can_lead(self) -> bool:
        return self.lead

    def armed_and_valid(self) -> bool:
        return self.deadline is not None and asyncio.get_running_loop().time() < self.deadline

    def postmaster_started(self) -> None:
        self.started += 1

    def stop(self) -> None:
        self.stopped = True


class ListSink(Sink):
    def __init__(self) -> None:
        self.records: list[Record] = []

    def emit(self, record: Record) -> None:
        self.records.append(record)

    def of(self, kind: str) -> list[Record]:
        return [r for r in self.records if r.kind == kind]


def agent_config(
    tmp: Path, name: str = "pg1", standby: dict[str, Any] | None = None, **cluster: Any
) -> AgentConfig:
    """``standby``: a standby_cluster section (the member of a standby cluster)."""
    return AgentConfig.model_validate(
        {
            "name": name,
            "cluster": "c1",
            "state_dir": str(tmp / name),
            "postgresql": {"data_dir": str(tmp / name / "data")},
            "cluster_settings": {"ttl": 4, **cluster},
            **({"standby_cluster": standby} if standby is not None else {}),
        }
    )


class Rig:
    """An Agent built from in-memory ports."""

    def __init__(
        self,
        tmp: Path,
        *,
        name: str = "pg1",
        data: DataState = DataState.MISSING,
        dcs: FakeDCS | None = None,
        pgbackrest: Any = None,
        bootstrap: Any = None,
        standby: dict[str, Any] | None = None,
        **cluster: Any,
    ) -> None:
        self.cfg = agent_config(tmp, name, standby, **cluster)
        self.clock = LoopClock()
        self.dcs = dcs or FakeDCS()
        self.pg = FakePostgres(data)
        self.fence = FakeFence()
        self.sink = ListSink()
        self.stats: ReplicationStats = ({}, 0)
        self.inbox = Inbox(self.clock)

        async def replication_stats() -> ReplicationStats:
            return self.stats

        self.ports = Ports(
            clock=self.clock,
            dcs=self.dcs,
            pg=self.pg,
            fence=self.fence,
            sinks=[self.sink],
            replication_stats=replication_stats,
        )
        self.agent = Agent(
            self.cfg,
            self.ports,
            inbox=self.inbox,
            services=Services(pgbackrest=pgbackrest, bootstrap=bootstrap),
            handle_signals=False,
        )

    def posted(self) -> list[tuple[str, dict[str, Any]]]:
        """Drain what was posted to the queue (not handled)."""
        out = []
        while not self.inbox.queue.empty():
            inp = self.inbox.queue.get_nowait()
            out.append((inp.type, inp.data))
        return out

    def effects_posted(self) -> list[dict[str, Any]]:
        return [d for t, d in self.posted() if t == "effect"]


def put(rig: Rig, role: Role, **snapshot: Any) -> None:
    """Put the agent in ``role`` with these snapshot fields (no transition, no record)."""
    st = rig.agent.state
    st.machine = RoleMachine("c1", rig.cfg.name, initial=role)
    st.snapshot = replace(st.snapshot, **snapshot)


def see(rig: Rig, view: ClusterView | None = None) -> None:
    """Fold a view of the DCS (default: the fake DCS's own) into the agent's knowledge."""
    view = view or rig.dcs.view()
    st = rig.agent.state
    st.dcs_view = view
    inp = Input("dcs", rig.clock.monotonic(), view_to_input(view, rig.clock))
    st.snapshot = apply(st.role, st.snapshot, inp)


def peer(name: str, role: str = "master", **data: Any) -> dict[str, Any]:
    """A peer's member key as it publishes it."""
    return {"role": role, "running": True, "host": f"{name}.local", "port": 5432, **data}
