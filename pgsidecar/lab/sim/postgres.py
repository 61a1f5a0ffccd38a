"""A model of PostgreSQL members for the simulator, behind the methods the agent calls on
``pgsidecar.postgres.control.PostgresControl`` (same names, signatures and return types).

What is modelled, and how:

* **WAL** as a lineage of timeline segments (:class:`Wal`): each segment is a timeline number
  (what PostgreSQL shows), a unique id (two promotions that happen to pick the same number are
  different timelines, as in a split brain) and the position it starts at; plus the flush
  position. A member *has* a commit when its WAL reaches the commit's LSN on the commit's
  timeline id. Two members' WAL agree up to their common prefix: a standby can stream from an
  upstream whose WAL contains all of its own, and must be rewound when it does not.
* **The data directory** (:class:`DataDir`): absent, or a system id, the WAL, the control file's
  cluster state ("shut down", "in production", ...), the last checkpoint, a backup label (a fresh
  clone), the replication slots and roles; it can be left unreadable by a failed pg_rewind.
* **Timeline history files** in pg_wal: those of the WAL's own timelines, plus any other timeline
  numbers written there (the agent's placeholders, files copied by pg_basebackup and pg_rewind,
  files a walreceiver fetched from its upstream when it followed a timeline switch). A promotion
  names its timeline as PostgreSQL does (``findNewestTimeLine(recoveryTargetTLI) + 1``): one
  above the newest timeline reached from the current one through history files without a gap.
* **The postmaster**: started, accepting, in recovery or not, stopping, fenced, crashed; an exit
  future for ``wait_exit``. Start, stop, promote, initdb, basebackup and rewind take virtual time
  drawn from the seed (sometimes from a slow range), and can fail where the real ones can.
* **Streaming**: a running standby whose written config names an upstream streams from it when
  the :class:`SimNetwork` lets them talk, the upstream runs, holds the slot the standby names,
  and its WAL contains the standby's; it receives the upstream's WAL after a drawn lag and
  follows a promotion onto the new timeline when it had not received past the switch point.
  A standby cut off from a running upstream hears nothing more, and its probe goes on reporting
  the stream, as the real probe does, until the silence limit has passed
  (``wal_receiver_timeout`` / 2 + ``STREAM_SILENCE_SLACK``, from the last message: the moment of
  the cut); an upstream that stops or crashes closes the connection, which ends the stream at once.
* **Synchronous replication**: a commit on a primary with ``synchronous_standby_names`` set is
  acknowledged only once enough of the named standbys (``FIRST k (...)``, or any one for ``*``)
  have received it; a commit waiting for them is already in the primary's WAL (as in PostgreSQL).

:class:`SimClient` writes through whichever member accepts writes and records every acknowledged
commit with its LSN and timeline id, so that durability can be checked against any member.

Not modelled: WAL recycling (a standby never falls off the upstream's retained WAL), query load,
disk space, archive recovery, replication of individual rows (only positions are tracked).
"""

# The timeouts are part of the mirrored API; they are enforced with asyncio primitives.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import dataclasses
import functools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from events.tasks import bounded
from fsm.snapshot import DataState, PgFacts
from pgsidecar.config import slot_name
from pgsidecar.lab.sim.clock import derive_rng
from pgsidecar.postgres.config import DEFAULT_PARAMETERS
from pgsidecar.postgres.control import Conninfo, ControlData, PostgresError
from pgsidecar.postgres.sql import STREAM_SILENCE_SLACK

PORT = 5432
SUPERUSER = "postgres"
REPLICATION_USER = "replicator"
INITIAL_LSN = 0x1000000  # where initdb leaves a fresh cluster's WAL (0/1000000)
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def duration_setting(value: object) -> float:
    """A time parameter in seconds: a bare number is milliseconds (wal_receiver_timeout's unit),
    else a number with one of PostgreSQL's time units ('2500ms', '10s', '1min')."""
    text = str(value).strip()
    for unit in sorted(_TIME_UNITS, key=len, reverse=True):
        if text.endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return float(text[: -len(unit)]) * _TIME_UNITS[unit]
    return float(text) / 1000


_CLEAN_STATES = frozenset({"shut down", "shut down in recovery"})
_STANDBY_STATES = frozenset({"shut down in recovery", "in archive recovery"})


# -- WAL ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    tli: int  # the timeline number PostgreSQL shows
    uid: int  # which timeline this is, globally
    start: int  # the first position on it (its switch point from the parent)


@dataclass(frozen=True)
class Wal:
    """Immutable: every change makes a new one (cheap to snapshot for a lagging copy)."""

    segments: tuple[Segment, ...]
    lsn: int

    @property
    def tli(self) -> int:
        return self.segments[-1].tli

    @property
    def uid(self) -> int:
        return self.segments[-1].uid

    def uid_at(self, position: int) -> int | None:
        """The timeline id of the WAL byte at ``position`` (None beyond our end)."""
        if position >= self.lsn or position < 0:
            return None
        found = None
        for seg in self.segments:
            if seg.start <= position:
                found = seg.uid
            else:
                break
        return found

    def has(self, lsn: int, uid: int) -> bool:
        """Do we hold the commit that ended at ``lsn`` on timeline id ``uid``?"""
        return self.uid_at(lsn - 1) == uid

    def append(self, size: int) -> Wal:
        return Wal(self.segments, self.lsn + size)

    def switch(self, tli: int, uid: int) -> Wal:
        """A promotion: a new timeline from our current position."""
        return Wal((*self.segments, Segment(tli, uid, self.lsn)), self.lsn)

    def history(self) -> list[tuple[int, int]]:
        """PostgreSQL's timeline history: (parent timeline, switch point), oldest first."""
        return [
            (seg.tli, nxt.start) for seg, nxt in zip(self.segments, self.segments[1:], strict=False)
        ]

    def timelines(self) -> frozenset[int]:
        """The timelines of this WAL's lineage (each but timeline 1 has a history file)."""
        return frozenset(seg.tli for seg in self.segments)


def common_prefix(a: Wal, b: Wal) -> int:
    """The first position at which ``a`` and ``b`` differ, or the end of the shorter one."""
    limit = min(a.lsn, b.lsn)
    points = sorted({s.start for s in a.segments} | {s.start for s in b.segments})
    for p in points:
        if p >= limit:
            break
        if a.uid_at(p) != b.uid_at(p):
            return p
    return limit


def contains(upstream: Wal, wal: Wal) -> bool:
    """Does ``upstream`` hold every byte of ``wal``?"""
    return wal.lsn <= upstream.lsn and common_prefix(upstream, wal) == wal.lsn


# -- the world around the members ----------------------------------------------------------------


class SimNetwork:
    """Which hosts can talk: every pair unless cut, every host unless isolated."""

    def __init__(self, world: PgWorld) -> None:
        self._world = world
        self._cuts: set[tuple[str, str]] = set()
        self._isolated: set[str] = set()

    def can_talk(self, a: str, b: str) -> bool:
        if a == b:
            return True
        if a in self._isolated or b in self._isolated:
            return False
        return (min(a, b), max(a, b)) not in self._cuts

    def cut(self, a: str, b: str) -> None:
        self._cuts.add((min(a, b), max(a, b)))
        self._world.changed(f"network cut {a}-{b}")

    def isolate(self, host: str) -> None:
        self._isolated.add(host)
        self._world.changed(f"network isolate {host}")

    def heal(self, a: str, b: str | None = None) -> None:
        if b is None:
            self._isolated.discard(a)
            self._world.changed(f"network heal {a}")
        else:
            self._cuts.discard((min(a, b), max(a, b)))
            self._world.changed(f"network heal {a}-{b}")

    def heal_all(self) -> None:
        self._cuts.clear()
        self._isolated.clear()
        self._world.changed("network heal all")


@dataclass(frozen=True)
class PgTimings:
    """Virtual-time costs, drawn uniformly from each range; ``slow`` is the chance that an
    operation takes its ``slow_*`` range instead (a cold cache, a long checkpoint, a busy disk)."""

    start: tuple[float, float] = (0.05, 0.5)
    slow_start: tuple[float, float] = (2.0, 30.0)
    stop: tuple[float, float] = (0.02, 0.3)
    slow_stop: tuple[float, float] = (2.0, 20.0)
    promote: tuple[float, float] = (0.01, 0.2)
    slow_promote: tuple[float, float] = (1.0, 10.0)
    initdb: tuple[float, float] = (0.5, 2.0)
    basebackup: tuple[float, float] = (0.5, 5.0)
    rewind: tuple[float, float] = (0.2, 2.0)
    checkpoint: tuple[float, float] = (0.01, 0.5)
    replication_lag: tuple[float, float] = (0.001, 0.05)
    fence_exit: tuple[float, float] = (0.001, 0.02)  # SIGQUIT to exit
    slow: float = 0.0


@dataclass(frozen=True)
class PgFaultPlan:
    """PostgreSQL faults, all off by default: probabilities per operation, crashes per virtual
    second of each running member."""

    start_failure: float = 0.0
    promote_failure: float = 0.0
    rewind_failure: float = 0.0
    rewind_corrupts: float = 0.0  # of the failed rewinds: the data directory left unusable
    basebackup_failure: float = 0.0
    crash_rate: float = 0.0


@dataclass(frozen=True)
class Commit:
    """A commit the client saw acknowledged."""

    seq: int
    member: str
    lsn: int
    tli: int
    uid: int
    at: float


class WorldObserver(Protocol):
    """What the invariant checkers are told, synchronously, at the instant it happens."""

    def writable_changed(self, now: float, writable: tuple[str, ...]) -> None:
        """The set of members accepting writes changed (sorted names)."""

    def write_accepted(self, now: float, member: str, lsn: int, tli: int) -> None:
        """``member`` put a commit into its WAL (before any synchronous wait)."""

    def timeline_named(self, now: float, member: str, system_id: str, tli: int, uid: int) -> None:
        """A promotion of ``member`` made timeline ``uid`` and named it ``tli``."""


class PgWorld:
    """Every simulated PostgreSQL of one cluster, the network between them (and the client),
    the seed's generator, and a change signal for outside waiters. ``trace`` records (virtual
    time, what) of every state change; ``observers`` are told of every change of who accepts
    writes and of every write accepted.

    Replication costs no task and no wake-up per standby: a topology change (``changed()``:
    a start, an exit, a promotion, a network cut, a reload, new slots) re-evaluates once, at the
    end of the current instant, which upstream every standby streams from; new WAL on a member is
    delivered to each of its streaming standbys by one timer per standby, which carries whatever
    the upstream holds when it was armed (writes arriving meanwhile ride on the next one), so a
    burst of writes costs one delivery per standby and lag interval."""

    def __init__(
        self,
        rng: random.Random | None = None,
        *,
        timings: PgTimings | None = None,
        faults: PgFaultPlan | None = None,
    ) -> None:
        self.rng = rng if rng is not None else random.Random(0)
        self.timings = timings or PgTimings()
        self.faults = faults or PgFaultPlan()
        self.network = SimNetwork(self)
        self.members: dict[str, SimPostgres] = {}
        self.trace: list[tuple[float, str]] = []
        self._next_uid = 1
        self._next_pid = 1000
        self._next_system = 7_000_000_000_000_000_000
        self._signal: asyncio.Future[None] | None = None
        self._crashes: asyncio.Task[None] | None = None
        self._reevaluate_pending = False
        self._writable: tuple[str, ...] = ()
        self.observers: list[WorldObserver] = []
        # every timeline ever made: its id -> the lineage of segments it ends (for durability
        # accounting: where a lost commit's timeline left the surviving one)
        self.lineages: dict[int, tuple[Segment, ...]] = {}

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    def record(self, what: str) -> None:
        self.trace.append((round(self.now(), 6), what))

    def member(self, name: str) -> SimPostgres:
        pg = SimPostgres(self, name)
        self.members[name] = pg
        return pg

    def new_uid(self) -> int:
        self._next_uid += 1
        return self._next_uid

    def new_pid(self) -> int:
        self._next_pid += 1
        return self._next_pid

    def new_system_id(self) -> str:
        self._next_system += 1 + self.rng.randrange(1000)
        return str(self._next_system)

    def changed(self, what: str | None = None) -> None:
        """Something that decides who streams from whom or who accepts writes changed: tell the
        observers now if the writable set changed, re-evaluate streaming at the end of this
        instant (once, however many changes it holds), wake outside waiters."""
        if what:
            self.record(what)
        writable = tuple(self.writable_members())
        if writable != self._writable:
            self._writable = writable
            now = self.now()
            for observer in self.observers:
                observer.writable_changed(now, writable)
        if not self._reevaluate_pending:
            self._reevaluate_pending = True
            asyncio.get_running_loop().call_soon(self._reevaluate)
        sig, self._signal = self._signal, None
        if sig is not None and not sig.done():
            sig.set_result(None)

    def _reevaluate(self) -> None:
        self._reevaluate_pending = False
        members = [pg for _name, pg in sorted(self.members.items())]
        for pg in members:
            pg._update_receiver()
        for pg in members:
            pg._check_sync_waiters()

    def wait_change(self) -> asyncio.Future[None]:
        """A future resolved at the next change; shielded, so that cancelling one waiter (a
        stopped standby's receiver) does not cancel the signal every other waiter shares."""
        if self._signal is None:
            self._signal = asyncio.get_running_loop().create_future()
        return asyncio.shield(self._signal)

    def writable_members(self) -> list[str]:
        return sorted(name for name, pg in self.members.items() if pg.writable)

    def lineage_wal(self, uid: int, lsn: int) -> Wal | None:
        """The WAL of timeline ``uid`` up to ``lsn`` (None for a timeline never recorded)."""
        segments = self.lineages.get(uid)
        return Wal(segments, lsn) if segments is not None else None

    def reach(self, source: str, ci: Conninfo, *, replication: bool = False) -> SimPostgres:
        """The member ``source`` reaches at ``ci``, accepting connections; else PostgresError."""
        target = self.members.get(ci.host)
        if target is None or ci.port != PORT:
            raise PostgresError(f"cannot connect to {ci.host}:{ci.port}: no such host")
        if not self.network.can_talk(source, target.name):
            raise PostgresError(f"cannot connect to {ci.host}:{ci.port}: timeout expired")
        if not target.accepting:
            raise PostgresError(f"cannot connect to {ci.host}:{ci.port}: connection refused")
        if replication and (target.data is None or REPLICATION_USER not in target.data.roles):
            raise PostgresError(
                f"cannot connect to {ci.host}:{ci.port}: role {REPLICATION_USER!r} does not exist"
            )
        return target

    def start_crashes(self) -> None:
        """Crash running members at the fault plan's rate until stop_crashes()."""
        if self._crashes is None and self.faults.crash_rate > 0:
            self._crashes = asyncio.create_task(self._run_crashes(derive_rng(self.rng)))

    async def stop_crashes(self) -> None:
        task, self._crashes = self._crashes, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run_crashes(self, rng: random.Random) -> None:
        while True:
            running = [pg for _name, pg in sorted(self.members.items()) if pg.running]
            rate = self.faults.crash_rate * max(1, len(running))
            await asyncio.sleep(rng.expovariate(rate))
            running = [pg for _name, pg in sorted(self.members.items()) if pg.running]
            if running:
                rng.choice(running).crash()


# -- one member --------------------------------------------------------------------------------


@dataclass
class DataDir:
    system_id: str
    wal: Wal
    state: str  # pg_controldata's "Database cluster state"
    checkpoint_lsn: int
    checkpoint_tli: int
    roles: set[str] = field(default_factory=lambda: {SUPERUSER})
    slots: set[str] = field(default_factory=set)
    backup_label: bool = False
    invalid: bool = False
    # pg_wal's timeline history files beyond those of the WAL's own lineage (timeline numbers)
    extra_history: frozenset[int] = frozenset()

    def has_history_file(self, tli: int) -> bool:
        """existsTimeLineHistory: timeline 1 never has one."""
        return tli != 1 and (tli in self.extra_history or tli in self.wal.timelines())

    def history_files(self) -> frozenset[int]:
        return frozenset(t for t in self.wal.timelines() | self.extra_history if t != 1)

    def newest_timeline(self, start: int) -> int:
        """findNewestTimeLine: the last of start, start + 1, ... with a history file, no gap."""
        newest = start
        while self.has_history_file(newest + 1):
            newest += 1
        return newest


@dataclass
class _Config:
    """What write_config() left in the data directory."""

    standby: bool = False
    upstream: Conninfo | None = None
    slot: str | None = None
    parameters: dict[str, object] = field(default_factory=dict)


@dataclass
class _Postmaster:
    pid: int
    exit: asyncio.Future[int]
    in_recovery: bool
    accepting: bool = False
    stopping: bool = False
    fenced: bool = False
    upstream: Conninfo | None = None
    slot: str | None = None
    sync_names: str = ""
    receiver: str | None = None  # the upstream member we stream from right now
    receiver_timeout: float = 10.0  # wal_receiver_timeout in seconds (0: disabled)
    # the upstream we were cut off from while it ran, and when: its stream has gone silent
    silent_from: str | None = None
    silent_since: float = 0.0
    promoting: bool = False
    delivery: asyncio.TimerHandle | None = None  # the next batch of WAL from the upstream
    # commits waiting for synchronous standbys: (lsn, timeline id, acknowledgement)
    sync_waiters: list[tuple[int, int, asyncio.Future[None]]] = field(default_factory=list)


class SimPostgres:
    """One simulated member, with PostgresControl's interface (see the module docstring)."""

    def __init__(self, world: PgWorld, name: str) -> None:
        self.world = world
        self.name = name
        self.rng = derive_rng(world.rng)
        self.data: DataDir | None = None
        self.conf = _Config()
        self.passfile = Path(f"/sim/{name}/pgpass")
        self.stop_timeout = 30.0
        self._pm: _Postmaster | None = None
        self._ever_started = False
        self._last_exit: asyncio.Future[int] | None = None

    def __repr__(self) -> str:
        return f"SimPostgres({self.name!r})"

    # -- helpers ---------------------------------------------------------------------------------
    def _delay(self, normal: tuple[float, float], slow: tuple[float, float] | None = None) -> float:
        if (
            slow is not None
            and self.world.timings.slow
            and self.rng.random() < self.world.timings.slow
        ):
            return self.rng.uniform(*slow)
        return self.rng.uniform(*normal)

    def _fails(self, probability: float) -> bool:
        return probability > 0 and self.rng.random() < probability

    def _record(self, what: str) -> None:
        self.world.record(f"{self.name} {what}")

    def _require_data(self, what: str) -> DataDir:
        if self.data is None:
            raise PostgresError(f"{what}: /sim/{self.name}/data holds no PostgreSQL data directory")
        return self.data

    # -- what the checkers read ------------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        pm = self._pm
        return pm is not None and pm.accepting and not pm.stopping and not pm.exit.done()

    @property
    def writable(self) -> bool:
        """Accepts a write right now: running, accepting, not in recovery."""
        pm = self._pm
        return self.accepting and pm is not None and not pm.in_recovery

    @property
    def wal(self) -> Wal | None:
        return self.data.wal if self.data is not None else None

    def has(self, commit: Commit) -> bool:
        return self.data is not None and self.data.wal.has(commit.lsn, commit.uid)

    # -- identities and files -------------------------------------------------------------------
    def superuser_conninfo(self, host: str | None = None, port: int | None = None) -> Conninfo:
        return Conninfo(host=host or self.name, port=port or PORT, user=SUPERUSER)

    def replication_conninfo(self, host: str, port: int) -> Conninfo:
        return Conninfo(host=host, port=port, user=REPLICATION_USER)

    def write_passfile(self) -> None:
        """Nothing to write: simulated connections carry no password."""

    def write_config(
        self,
        role: Literal["primary", "standby"],
        upstream: Conninfo | None,
        slot: str | None,
        parameters: dict[str, object] | None = None,
    ) -> None:
        if role not in ("primary", "standby"):
            raise ValueError(f"role must be primary or standby, not {role!r}")
        self._require_data("write_config")
        standby = role == "standby"
        self.conf = _Config(
            standby=standby,
            upstream=upstream if standby else None,
            slot=slot if standby and upstream is not None else None,
            parameters=dict(parameters or {}),
        )

    # -- the postmaster -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._pm is not None and not self._pm.exit.done()

    @property
    def postmaster_pid(self) -> int | None:
        return self._pm.pid if self._pm is not None and self.running else None

    async def start(self, timeout: float) -> None:
        if self.running:
            return
        data = self._require_data("start")
        loop = asyncio.get_running_loop()
        exit_fut: asyncio.Future[int] = loop.create_future()
        pm = _Postmaster(self.world.new_pid(), exit_fut, in_recovery=self.conf.standby)
        self._pm, self._ever_started, self._last_exit = pm, True, exit_fut
        self._apply_config(pm)
        self._record(f"start pid={pm.pid} {'standby' if pm.in_recovery else 'primary'}")
        delay = self._delay(self.world.timings.start, self.world.timings.slow_start)
        failed = data.invalid or self._fails(self.world.faults.start_failure)
        await asyncio.wait([exit_fut], timeout=min(delay, timeout))
        if exit_fut.done():
            raise PostgresError(f"postgres exited with {exit_fut.result()} during startup")
        if failed:
            self._exit(pm, 1, "start failed")
            raise PostgresError("postgres exited with 1 during startup: FATAL: simulated failure")
        if delay > timeout:
            self._exit(pm, 0, "start timed out, stopped")
            raise PostgresError(f"postgres did not accept connections within {timeout:.0f}s")
        data.backup_label = False
        data.state = "in archive recovery" if pm.in_recovery else "in production"
        pm.accepting = True
        self._record("accepting")
        self.world.changed()

    def _apply_config(self, pm: _Postmaster) -> None:
        conf = self.conf
        if conf.upstream != pm.upstream:
            pm.silent_from = None  # a new primary_conninfo restarts the walreceiver
        pm.upstream, pm.slot = conf.upstream, conf.slot
        names = conf.parameters.get("synchronous_standby_names", "")
        pm.sync_names = str(names) if names else ""
        pm.receiver_timeout = duration_setting(
            conf.parameters.get("wal_receiver_timeout", DEFAULT_PARAMETERS["wal_receiver_timeout"])
        )

    def _exit(self, pm: _Postmaster, code: int, why: str, *, clean: bool = False) -> None:
        if pm.exit.done():
            return
        pm.accepting = False
        if self.data is not None:
            if clean:
                self.data.state = "shut down in recovery" if pm.in_recovery else "shut down"
                self.data.checkpoint_lsn = self.data.wal.lsn
                self.data.checkpoint_tli = self.data.wal.tli
            # else: the control file keeps "in production" / "in archive recovery" (crashed)
        if pm.delivery is not None:
            pm.delivery.cancel()
            pm.delivery = None
        pm.receiver = None
        pm.exit.set_result(code)
        waiters, pm.sync_waiters = pm.sync_waiters, []
        for _lsn, _uid, fut in waiters:
            if not fut.done():
                fut.set_exception(
                    PostgresError(f"{self.name}: server closed the connection unexpectedly")
                )
        self._record(f"exit pid={pm.pid} code={code} ({why})")
        self.world.changed()

    async def wait_exit(self) -> int:
        if self._last_exit is None:
            raise PostgresError("wait_exit: PostgreSQL was not started by this agent")
        return await asyncio.shield(self._last_exit)

    def fence(self) -> bool:
        """Immediate shutdown: no write is accepted from this instant; the postmaster is gone a
        moment later. Synchronous, like the real one."""
        pm = self._pm
        if pm is None or pm.exit.done():
            return False
        pm.fenced = True
        pm.stopping = True
        pm.accepting = False
        self._record("fenced")
        self.world.changed()
        asyncio.get_running_loop().call_later(
            self.rng.uniform(*self.world.timings.fence_exit), self._exit, pm, -3, "fenced"
        )
        return True

    def crash(self) -> None:
        """The postmaster dies at once (OOM killer, a segfault): the data is left crashed."""
        pm = self._pm
        if pm is not None and not pm.exit.done():
            self._exit(pm, -9, "crashed")

    async def stop(
        self, mode: Literal["fast", "immediate"] = "fast", timeout: float | None = None
    ) -> None:
        pm = self._pm
        if pm is None or pm.exit.done():
            return
        pm.stopping = True
        pm.accepting = False
        self.world.changed()
        limit = self.stop_timeout if timeout is None else timeout
        if mode == "immediate":
            delay = self.rng.uniform(*self.world.timings.fence_exit)
        else:
            delay = self._delay(self.world.timings.stop, self.world.timings.slow_stop)
        await asyncio.wait([pm.exit], timeout=min(delay, limit))
        if pm.exit.done():
            return
        if mode == "fast" and delay <= limit:
            self._exit(pm, 0, "fast shutdown", clean=True)
        else:  # immediate, or a fast shutdown that did not finish in time: SIGQUIT
            self._exit(pm, 0, "immediate shutdown")

    # -- SQL on the local server ----------------------------------------------------------------
    def _local(self, what: str) -> _Postmaster:
        pm = self._pm
        if pm is None or not self.accepting:
            raise PostgresError(f"{what}: cannot connect to {self.name}:{PORT}: connection refused")
        return pm

    async def promote(self, timeout: float = 30) -> None:
        pm = self._local("pg_promote")
        if not pm.in_recovery:
            return
        if pm.promoting:
            raise PostgresError("pg_promote: a promotion is already in progress")
        if self._fails(self.world.faults.promote_failure):
            raise PostgresError("pg_promote refused to signal the promotion")
        delay = self._delay(self.world.timings.promote, self.world.timings.slow_promote)
        pm.promoting = True
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def finish() -> None:
            if pm.exit.done() or pm.stopping or self.data is None:
                return
            data = self.data
            tli = data.newest_timeline(data.wal.tli) + 1
            data.wal = data.wal.switch(tli, self.world.new_uid())
            self.world.lineages[data.wal.uid] = data.wal.segments
            pm.in_recovery = False
            pm.promoting = False
            pm.receiver = None
            if pm.delivery is not None:
                pm.delivery.cancel()
                pm.delivery = None
            data.state = "in production"
            self._record(f"promoted tli={tli} at {data.wal.lsn}")
            for observer in self.world.observers:
                observer.timeline_named(
                    self.world.now(), self.name, data.system_id, tli, data.wal.uid
                )
            self.world.changed()
            if not done.done():
                done.set_result(None)
            # the checkpoint after a promotion comes a moment later (fast promotion)
            asyncio.get_running_loop().call_later(
                self.rng.uniform(*self.world.timings.checkpoint), self._checkpoint_now, pm
            )

        asyncio.get_running_loop().call_later(delay, finish)
        waiters: list[asyncio.Future[object]] = [done, pm.exit]  # type: ignore[list-item]
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if done.done():
            return
        if pm.exit.done() or pm.stopping:
            raise PostgresError("waiting for the promotion failed: server closed the connection")
        # the promotion goes on; only our wait for it ends
        raise PostgresError(f"promotion did not complete within {timeout:g}s")

    def _checkpoint_now(self, pm: _Postmaster) -> None:
        if self.data is not None and not pm.exit.done():
            self.data.checkpoint_lsn = self.data.wal.lsn
            self.data.checkpoint_tli = self.data.wal.tli

    async def reload(self) -> None:
        pm = self._local("pg_reload_conf")
        self._apply_config(pm)
        self.world.changed()

    async def checkpoint(self, timeout: float = 300.0) -> None:
        pm = self._local("CHECKPOINT")
        await asyncio.sleep(min(timeout, self.rng.uniform(*self.world.timings.checkpoint)))
        self._checkpoint_now(pm)

    async def ensure_roles(self) -> None:
        pm = self._local("ensure_roles")
        if pm.in_recovery:
            raise PostgresError(
                "ensure_roles failed: cannot execute CREATE ROLE in a read-only transaction"
            )
        assert self.data is not None
        self.data.roles.add(REPLICATION_USER)

    async def ensure_slots(self, members: set[str]) -> None:
        self._local("ensure_slots")
        assert self.data is not None
        wanted = {slot_name(m) for m in members} - {slot_name(self.name)}
        if wanted != self.data.slots:
            self.data.slots = set(wanted)
            self.world.changed()

    async def replication_status(self) -> tuple[dict[str, tuple[str, str, int]], int]:
        """What syncrep reads from pg_stat_replication: {application_name: (state, sync_state,
        flush_lsn)} of the standbys streaming from us, and our own flush position."""
        pm = self._local("pg_stat_replication")
        assert self.data is not None
        names, _k = _parse_sync_names(pm.sync_names)
        stats: dict[str, tuple[str, str, int]] = {}
        for name in self._downstream():
            standby = self.world.members[name]
            assert standby.data is not None
            if names == ["*"]:
                sync = "sync" if not stats else "potential"
            else:
                sync = "sync" if name in names else "async"
            stats[name] = ("streaming", sync, standby.data.wal.lsn)
        return stats, self.data.wal.lsn

    async def pending_restart_settings(self) -> list[str]:
        """Settings waiting for a restart: none is modelled."""
        self._local("pg_settings")
        return []

    # -- data operations ------------------------------------------------------------------------
    async def initdb(self, timeout: float = 300.0) -> None:
        if self.running:
            raise PostgresError("initdb: PostgreSQL is running")
        if self.data is not None:
            raise PostgresError(f"data directory /sim/{self.name}/data is not empty; wipe it first")
        await asyncio.sleep(min(timeout, self.rng.uniform(*self.world.timings.initdb)))
        uid = self.world.new_uid()
        self.data = DataDir(
            system_id=self.world.new_system_id(),
            wal=Wal((Segment(1, uid, 0),), INITIAL_LSN),
            state="shut down",
            checkpoint_lsn=INITIAL_LSN,
            checkpoint_tli=1,
        )
        self.world.lineages[uid] = self.data.wal.segments
        self._record(f"initdb system={self.data.system_id}")

    async def basebackup(self, source: Conninfo, timeout: float = 3600.0) -> None:
        if self.running:
            raise PostgresError("basebackup: PostgreSQL is running")
        if self.data is not None:
            raise PostgresError(f"data directory /sim/{self.name}/data is not empty; wipe it first")
        src = self.world.reach(self.name, source, replication=True)
        duration = self.rng.uniform(*self.world.timings.basebackup)
        if duration > timeout:
            await asyncio.sleep(timeout)
            raise PostgresError(f"pg_basebackup from {source.host} timed out")
        await asyncio.sleep(duration)
        src = self.world.reach(self.name, source, replication=True)  # still there at the end?
        if self._fails(self.world.faults.basebackup_failure):
            raise PostgresError(f"pg_basebackup from {source.host}: could not receive data")
        assert src.data is not None
        self.data = DataDir(
            system_id=src.data.system_id,
            wal=src.data.wal,
            state=src.data.state,
            checkpoint_lsn=src.data.checkpoint_lsn,
            checkpoint_tli=src.data.checkpoint_tli,
            roles=set(src.data.roles),
            backup_label=True,
            extra_history=src.data.extra_history,
        )
        self._record(f"basebackup from {src.name} at {src.data.wal.lsn}")

    async def wipe_data(self) -> None:
        if self.running:
            raise PostgresError("wipe_data: PostgreSQL is running")
        self.data = None
        self._record("wiped")

    async def controldata(self, timeout: float = 30.0) -> ControlData:
        data = self.data
        if data is None:
            return ControlData(DataState.MISSING)
        if data.invalid:
            return ControlData(DataState.INVALID)
        if data.state in _STANDBY_STATES or (data.state == "in production" and data.backup_label):
            state = DataState.STANDBY
        elif data.state == "shut down":
            state = DataState.PRIMARY_CLEAN
        else:
            state = DataState.PRIMARY_CRASHED
        standby = state == DataState.STANDBY
        return ControlData(
            data_state=state,
            system_id=data.system_id,
            timeline=data.checkpoint_tli,
            checkpoint_lsn=data.checkpoint_lsn,
            redo_lsn=data.checkpoint_lsn,
            min_recovery_end_lsn=data.wal.lsn if standby else None,
            min_recovery_end_timeline=data.wal.tli if standby else None,
            cluster_state=data.state,
        )

    async def rewind(self, source: Conninfo, timeout: float = 3600.0) -> str:
        if self.running:
            raise PostgresError("rewind: PostgreSQL must be stopped first")
        cd = await self.controldata()
        if cd.data_state in (DataState.MISSING, DataState.INVALID):
            raise PostgresError(f"rewind: data directory is {cd.data_state.value}; reclone instead")
        data = self._require_data("rewind")
        if data.state not in _CLEAN_STATES:
            # crash recovery first; a former primary's ends with a checkpoint record of its own
            if cd.data_state != DataState.STANDBY:
                data.wal = data.wal.append(104)
                data.state = "shut down"
            else:
                data.state = "shut down in recovery"
            data.checkpoint_lsn, data.checkpoint_tli = data.wal.lsn, data.wal.tli
        src = self.world.reach(self.name, dataclasses.replace(source, user=SUPERUSER))
        assert src.data is not None
        if src.data.system_id != data.system_id:
            raise PostgresError("pg_rewind: source and target clusters are from different systems")
        if contains(src.data.wal, data.wal):
            self._record(f"rewind from {src.name}: not needed")
            return "not_needed"
        await asyncio.sleep(min(timeout, self.rng.uniform(*self.world.timings.rewind)))
        if self._fails(self.world.faults.rewind_failure):
            if self._fails(self.world.faults.rewind_corrupts):
                data.invalid = True
            self._record(
                f"rewind from {src.name}: failed{' (data left unusable)' if data.invalid else ''}"
            )
            raise PostgresError(f"pg_rewind from {source.host}:{source.port} failed: simulated")
        src = self.world.reach(self.name, dataclasses.replace(source, user=SUPERUSER))
        assert src.data is not None
        data.wal = src.data.wal
        # pg_rewind copies the source's files, its pg_wal history files among them
        data.extra_history = src.data.extra_history
        data.state = "in archive recovery"
        data.roles = set(src.data.roles)
        self._record(f"rewound from {src.name} to tli={data.wal.tli} lsn={data.wal.lsn}")
        return "rewound"

    async def timeline_history(self, source: Conninfo) -> list[tuple[int, int]]:
        src = self.world.reach(self.name, source)
        assert src.data is not None
        return src.data.wal.history()

    def next_timeline(self, current: int) -> int:
        data = self._require_data("next_timeline")
        return data.newest_timeline(current) + 1

    def reserve_timelines(self, current: int, new: int) -> list[int]:
        data = self._require_data("reserve_timelines")
        written = [t for t in range(current + 1, new) if not data.has_history_file(t)]
        if written:
            data.extra_history |= frozenset(written)
            self._record(f"placeholder history files {written}")
        return written

    # -- probe ----------------------------------------------------------------------------------
    async def probe(self) -> PgFacts:
        pm = self._pm
        if pm is None or pm.exit.done() or not pm.accepting:
            cd = await self.controldata()
            tli = cd.timeline
            if cd.min_recovery_end_timeline and cd.data_state == DataState.STANDBY:
                tli = max(tli or 0, cd.min_recovery_end_timeline)
            return PgFacts(
                data=cd.data_state, system_id=cd.system_id, running=self.running, timeline=tli
            )
        data = self.data
        assert data is not None
        lsn = data.wal.lsn
        upstream = self.world.members.get(pm.receiver) if pm.receiver else None
        silent_from, silent_streaming = self._silent_stream(pm)
        named = upstream.name if upstream is not None else silent_from
        return PgFacts(
            data=DataState.STANDBY if pm.in_recovery else DataState.PRIMARY_CRASHED,
            system_id=data.system_id,
            running=True,
            accepting=True,
            in_recovery=pm.in_recovery,
            timeline=data.wal.tli,
            lsn=lsn,
            received_lsn=lsn if pm.in_recovery else None,
            replayed_lsn=lsn if pm.in_recovery else None,
            receiver_streaming=pm.in_recovery and (upstream is not None or silent_streaming),
            receiver_upstream=f"{named}:{PORT}" if named is not None else None,
        )

    # -- replication ------------------------------------------------------------------------------
    def _downstream(self) -> list[str]:
        return sorted(
            name
            for name, pg in self.world.members.items()
            if pg._pm is not None and pg.running and pg._pm.receiver == self.name
        )

    def _stream_source(self, pm: _Postmaster) -> SimPostgres | None:
        """The upstream this standby can stream from right now, or None."""
        up = pm.upstream
        if up is None or self.data is None or pm.exit.done() or not pm.in_recovery:
            return None
        src = self.world.members.get(up.host)
        if src is None or src is self or not self.world.network.can_talk(self.name, src.name):
            return None
        if not src.accepting or src.data is None or REPLICATION_USER not in src.data.roles:
            return None
        if src.data.system_id != self.data.system_id:
            return None
        if pm.slot is not None and pm.slot not in src.data.slots:
            return None  # "replication slot does not exist"
        if not contains(src.data.wal, self.data.wal):
            return None  # forked: the walreceiver cannot follow that timeline
        return src

    def _update_receiver(self) -> None:
        """Called by the world's re-evaluation: follow the upstream we can stream from now."""
        pm = self._pm
        if pm is None or not pm.in_recovery or not pm.accepting or pm.exit.done():
            return
        src = self._stream_source(pm)
        receiver = src.name if src is not None else None
        if receiver != pm.receiver:
            cut_off = pm.receiver if receiver is None and self._cut_off_from(pm.receiver) else None
            pm.receiver = receiver
            pm.silent_from = cut_off
            pm.silent_since = asyncio.get_running_loop().time()
            self._record(f"receiver {'streaming from ' + receiver if receiver else 'stopped'}")
            if pm.delivery is not None:
                pm.delivery.cancel()
                pm.delivery = None
        if src is not None:
            self._schedule_delivery(pm, src)

    def _cut_off_from(self, name: str | None) -> bool:
        """Is ``name`` a running upstream we can no longer reach? Its connection stays open on
        our side: nothing closes it, nothing arrives on it."""
        src = self.world.members.get(name) if name is not None else None
        return (
            src is not None
            and src.running
            and src.accepting
            and not self.world.network.can_talk(self.name, src.name)
        )

    def _silent_stream(self, pm: _Postmaster) -> tuple[str | None, bool]:
        """The upstream a cut-off walreceiver still names (until wal_receiver_timeout ends it)
        and whether the probe still counts it as streaming (until the silence limit)."""
        if pm.silent_from is None or pm.receiver is not None or not pm.in_recovery:
            return None, False
        timeout = pm.receiver_timeout
        if not timeout:
            return pm.silent_from, True  # no timeout: the receiver waits forever, 'streaming'
        silent = asyncio.get_running_loop().time() - pm.silent_since
        if silent >= timeout:
            return None, False
        return pm.silent_from, silent < timeout / 2 + STREAM_SILENCE_SLACK

    def _schedule_delivery(self, pm: _Postmaster, src: SimPostgres) -> None:
        """One timer per standby carries what ``src`` holds now, after a drawn lag."""
        if pm.delivery is not None or src.data is None or self.data is None:
            return
        target = src.data.wal
        mine = self.data.wal
        if target.lsn <= mine.lsn and target.uid == mine.uid:
            return  # nothing new
        loop = asyncio.get_running_loop()
        due = loop.time() + self.rng.uniform(*self.world.timings.replication_lag)
        pm.delivery = loop.call_at(due, self._deliver, pm, src, target)

    def _deliver(self, pm: _Postmaster, src: SimPostgres, target: Wal) -> None:
        pm.delivery = None
        if pm.exit.done() or not pm.in_recovery or self.data is None:
            return
        if pm.receiver != src.name or self._stream_source(pm) is not src:
            self.world.changed()  # the link changed while this batch travelled: re-evaluate
            return
        data = self.data
        if contains(target, data.wal) and target.lsn >= data.wal.lsn and target != data.wal:
            if target.tli != data.wal.tli:
                # following a timeline switch, the walreceiver fetches from the upstream the
                # history file of every timeline up to the new one that it lacks
                assert src.data is not None
                data.extra_history |= frozenset(
                    t for t in src.data.history_files() if data.wal.tli < t <= target.tli
                )
            data.wal = target
            assert src.data is not None
            data.roles |= src.data.roles
            src._check_sync_waiters()
            self._wal_advanced()
        self._schedule_delivery(pm, src)  # more arrived meanwhile

    def _wal_advanced(self) -> None:
        """Our WAL grew: start a delivery to every standby streaming from us; a standby that
        names us but could not follow may be able to now."""
        reevaluate = False
        for _name, pg in sorted(self.world.members.items()):
            other = pg._pm
            if other is None or pg is self or other.exit.done() or not other.in_recovery:
                continue
            if other.receiver == self.name:
                pg._schedule_delivery(other, self)
            elif other.upstream is not None and other.upstream.host == self.name:
                reevaluate = True
        if reevaluate:
            self.world.changed()

    def _check_sync_waiters(self) -> None:
        pm = self._pm
        if pm is None or not pm.sync_waiters:
            return
        waiting = []
        for lsn, uid, fut in pm.sync_waiters:
            if fut.done():
                continue
            if self._sync_satisfied(pm, lsn, uid):
                fut.set_result(None)
            else:
                waiting.append((lsn, uid, fut))
        pm.sync_waiters = waiting

    def _sync_satisfied(self, pm: _Postmaster, lsn: int, uid: int) -> bool:
        names, k = _parse_sync_names(pm.sync_names)
        if not names:
            return True
        acked = 0
        for name in self._downstream():
            if names != ["*"] and name not in names:
                continue
            standby = self.world.members[name]
            if standby.data is not None and standby.data.wal.has(lsn, uid):
                acked += 1
        return acked >= k

    async def execute_write(self, size: int) -> tuple[int, int, int]:
        """A committed transaction of ``size`` bytes of WAL: returns (lsn, timeline, timeline
        id) once PostgreSQL acknowledges it (after the synchronous standbys, when there are)."""
        pm = self._pm
        if pm is None or not self.writable or self.data is None:
            raise PostgresError(f"{self.name} does not accept writes")
        self.data.wal = self.data.wal.append(size)
        lsn, tli, uid = self.data.wal.lsn, self.data.wal.tli, self.data.wal.uid
        self._record(f"write lsn={lsn} tli={tli}")
        for observer in self.world.observers:
            observer.write_accepted(self.world.now(), self.name, lsn, tli)
        self._wal_advanced()
        if not self._sync_satisfied(pm, lsn, uid):
            acknowledged: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            pm.sync_waiters.append((lsn, uid, acknowledged))
            await acknowledged
        if pm.exit.done():
            raise PostgresError(f"{self.name}: server closed the connection unexpectedly")
        return lsn, tli, uid


@functools.lru_cache(maxsize=64)
def _parse_sync_names(value: str) -> tuple[list[str], int]:
    """synchronous_standby_names as syncrep writes it: "" (none), "*" (any one), or
    'FIRST k ("a", "b")'. Parsed once per distinct value (every commit and every standby's
    flush asks); the list returned is shared, and read only."""
    value = value.strip()
    if not value:
        return [], 0
    if value == "*":
        return ["*"], 1
    if value.upper().startswith("FIRST"):
        head, _, rest = value[5:].strip().partition("(")
        names = [n.strip().strip('"') for n in rest.rstrip(")").split(",") if n.strip()]
        return names, int(head) if head.strip() else 1
    names = [n.strip().strip('"') for n in value.split(",") if n.strip()]
    return names, 1


# -- the client --------------------------------------------------------------------------------


class SimClient:
    """An application writing through whichever member accepts writes. Records every commit it
    saw acknowledged, so that any member can be checked for what it lost."""

    def __init__(
        self,
        world: PgWorld,
        name: str = "client",
        *,
        timeout: float = 2.0,
        size: tuple[int, int] = (64, 8192),
    ) -> None:
        self.world = world
        self.name = name
        self.rng = derive_rng(world.rng)
        self.timeout = timeout
        self.size = size
        self.commits: list[Commit] = []
        self.failures = 0
        self._seq = 0
        self._preferred: str | None = None

    def _candidates(self) -> Iterator[SimPostgres]:
        names = sorted(self.world.members)
        if self._preferred in names:
            names.remove(self._preferred)
            names.insert(0, self._preferred)
        for name in names:
            if self.world.network.can_talk(self.name, name):
                yield self.world.members[name]

    async def write(self) -> Commit | None:
        """One transaction through the first member that takes it; None if none did."""
        for pg in self._candidates():
            if not pg.writable:
                continue
            try:
                lsn, tli, uid = await bounded(
                    pg.execute_write(self.rng.randint(*self.size)), self.timeout
                )
            except (PostgresError, TimeoutError):
                self.failures += 1
                continue
            self._seq += 1
            commit = Commit(self._seq, pg.name, lsn, tli, uid, self.world.now())
            self.commits.append(commit)
            self._preferred = pg.name
            return commit
        return None

    async def run(self, interval: tuple[float, float] = (0.01, 0.2)) -> None:
        """Write until cancelled."""
        while True:
            await self.write()
            await asyncio.sleep(self.rng.uniform(*interval))

    def lost_by(self, member: SimPostgres) -> list[Commit]:
        """Acknowledged commits ``member`` does not hold."""
        return [c for c in self.commits if not member.has(c)]
