"""The agent's outside world, as ports: what the agent asks of each thing it does not own.

The factory (factory.py) plugs in the real ones (a DCS backend, PostgresControl, the fencing
Watchdog, the journal/log/Kafka sinks, the system clock); a test or the simulator plugs in
in-memory ones. The agent reads no clock, opens no connection and starts no process except
through these.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from events.dcs import DCS
from events.sinks import Sink
from fsm.snapshot import PgFacts
from pgsidecar.postgres.control import Conninfo, ControlData
from pgsidecar.syncrep import ReplicationStats

__all__ = ["DCS", "Clock", "FencePort", "Ports", "PostgresPort", "Sink", "SystemClock"]


class Clock(Protocol):
    """Every time the agent reads. ``monotonic`` is the clock of the event loop the agent runs
    on (timers, timeouts and the fencing deadline compare with it): the system's monotonic clock
    for the default loop, the virtual time of a simulated one. ``wall`` stamps records and turns
    a scheduled switchover's wall-clock time into monotonic time."""

    def monotonic(self) -> float: ...

    def wall(self) -> float: ...


class SystemClock:
    """The real clock: time.monotonic is the default asyncio loop's clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


class PostgresPort(Protocol):
    """What the agent asks of its local PostgreSQL (PostgresControl is the real one). Every
    method that fails raises (PostgresError or OSError); ``probe`` never does: it answers with
    what it could see."""

    @property
    def running(self) -> bool:
        """A postmaster started by this agent is alive."""
        ...

    def write_passfile(self) -> None: ...

    async def probe(self) -> PgFacts: ...

    async def wait_exit(self) -> int:
        """Resolves with the postmaster's return code when it exits."""
        ...

    def fence(self) -> bool:
        """SIGQUIT the postmaster now (no more writes); thread-safe."""
        ...

    async def start(self, timeout: float) -> None:  # noqa: ASYNC109 - PostgresControl's own
        """Start the postmaster with the config already written; raises if it is not ready
        within ``timeout`` seconds."""
        ...

    async def stop(self, mode: Literal["fast", "immediate"] = "fast") -> None: ...

    async def promote(self) -> None: ...

    async def reload(self) -> None: ...

    async def checkpoint(self) -> None: ...

    async def ensure_roles(self) -> None: ...

    async def ensure_slots(self, members: set[str]) -> None: ...

    async def initdb(self) -> None: ...

    async def basebackup(self, source: Conninfo) -> None: ...

    async def wipe_data(self) -> None: ...

    async def rewind(self, source: Conninfo) -> str:
        """Make a stopped former primary follow ``source``: "rewound" or "not_needed"."""
        ...

    async def controldata(self) -> ControlData: ...

    def write_config(
        self,
        role: Literal["primary", "standby"],
        upstream: Conninfo | None,
        slot: str | None,
        parameters: dict[str, Any] | None = None,
    ) -> None: ...

    def superuser_conninfo(self, host: str | None = None, port: int | None = None) -> Conninfo: ...

    def replication_conninfo(self, host: str, port: int) -> Conninfo: ...

    async def timeline_history(self, source: Conninfo) -> list[tuple[int, int]]: ...

    def next_timeline(self, current: int) -> int:
        """The timeline a promotion from ``current`` would name now (PostgreSQL's own choice:
        one above the newest timeline with a history file in pg_wal, counted from ``current``
        without a gap)."""
        ...

    def reserve_timelines(self, current: int, new: int) -> list[int]:
        """Write a placeholder history file into pg_wal for each timeline between ``current``
        and ``new`` (exclusive) that has none, so that the next promotion names ``new``.
        Returns the timelines written."""
        ...

    async def pending_restart_settings(self) -> list[str]: ...


class FencePort(Protocol):
    """The fencing watchdog (pgsidecar.watchdog.Watchdog is the real one): it fences PostgreSQL
    on its own clock at the deadline unless re-armed, and then tells the agent (the factory wires
    that call to the agent's inbox)."""

    @property
    def device_state(self) -> str | None: ...

    def arm(self, deadline: float) -> None: ...

    def disarm(self) -> None: ...

    def can_lead(self) -> bool:
        """False while fencing.mode is required and the watchdog device cannot be used."""
        ...

    def armed_and_valid(self) -> bool:
        """Armed and its deadline not passed: the lease is valid on our own clock."""
        ...

    def postmaster_started(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class Ports:
    """The agent's outside world. ``sinks`` receive every record, in order.
    ``replication_stats`` reads the master's pg_stat_replication for synchronous mode."""

    clock: Clock
    dcs: DCS
    pg: PostgresPort
    fence: FencePort
    sinks: Sequence[Sink]
    replication_stats: Callable[[], Awaitable[ReplicationStats]]
