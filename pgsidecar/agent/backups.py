"""Scheduled backups: a source beside the agent's loop that claims each slot of the backup
schedule (the local config's ``backup.schedule``) in the DCS and runs the backup, exactly once per
slot however many members there are (pgsidecar/backup/schedule.py says how).

It decides nothing about roles and posts no input to the machine: what it did goes into the
record as ``scheduled_backup`` actions (journal, log, Kafka), and the cluster-wide outcome, read
from the DCS records, into /metrics. Every wait is bounded: DCS calls by ``dcs_timeout``, the
sleep between rounds by ``max_sleep``, the backup itself by pgBackRest's timeout; the backup runs
in a task, so the loop is never blocked, and pgBackRest runs as a child process of the agent that
dies with it.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import structlog
from prometheus_client.core import GaugeMetricFamily

from events.dcs import DCS, ClusterView, DCSError
from events.tasks import bounded
from fsm.machine import Role
from pgsidecar.agent.ports import Clock, PostgresPort
from pgsidecar.agent.state import ActionLog, NodeState, TaskSet
from pgsidecar.backup import BackupError, BackupSet, PgInstance, Schedule
from pgsidecar.backup.schedule import (
    SlotRecord,
    claim_value,
    covered,
    decide,
    due_slot,
    finished_value,
    running_elsewhere,
    slot_text,
)
from pgsidecar.backup.settings import BackupType
from pgsidecar.backup.source import choose_source
from pgsidecar.postgres.errors import PostgresError
from pgsidecar.postgres.sql import connect as pg_connect

log = structlog.get_logger("pgsidecar.agent")


@dataclass(frozen=True)
class Taken:
    """A scheduled backup that succeeded: its label and the member its files came from."""

    label: str
    source: str


class BackupRun(Protocol):
    """Takes one backup of the cluster now (ScheduledBackup is the real one); raises
    BackupError when it fails. ``can_run`` says whether this member can reach the servers a
    backup needs (the master's, at least) in that view of the cluster."""

    async def __call__(self, kind: BackupType, view: ClusterView) -> Taken: ...

    def can_run(self, view: ClusterView | None) -> bool: ...


class BackupScheduler:
    """One member's scheduler. ``eligible`` says whether this member can run a backup now (the
    master's server is reachable from here); a member that cannot never claims a slot."""

    def __init__(
        self,
        schedule: Schedule,
        *,
        dcs: DCS,
        state: NodeState,
        clock: Clock,
        tasks: TaskSet,
        record: ActionLog,
        run_backup: BackupRun,
        eligible: Callable[[], bool],
        pid: int | None = None,
        dcs_timeout: float = 5.0,
        max_sleep: float = 15.0,
    ) -> None:
        self.schedule = schedule
        self.dcs = dcs
        self.state = state
        self.clock = clock
        self.tasks = tasks
        self.record = record
        self.run_backup = run_backup
        self.eligible = eligible
        self.pid = pid if pid is not None else os.getpid()
        self.dcs_timeout = dcs_timeout
        self.max_sleep = max_sleep
        # the records as last read, by type (for /metrics: the whole cluster's last success)
        self.records: dict[str, SlotRecord | None] = {}
        self.running: asyncio.Task[Any] | None = None

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.wall(), tz=UTC)

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except (DCSError, TimeoutError) as exc:
                log.info("backup_schedule_dcs_unanswered", error=str(exc) or type(exc).__name__)
            except Exception as exc:  # noqa: BLE001 - a bad round must not end the schedule
                log.error("backup_schedule_round_failed", error=str(exc) or type(exc).__name__)
            await asyncio.sleep(self.sleep_time())

    def sleep_time(self) -> float:
        """Until the next slot of any type (a moment after it), at most ``max_sleep``."""
        now = self.now()
        nexts = [self.schedule.next_slot(k, now) for k in self.schedule.kinds()]
        waits = [(n - now).total_seconds() + 0.2 for n in nexts if n is not None]
        return max(0.2, min([self.max_sleep, *waits]))

    async def read_records(self) -> dict[str, tuple[SlotRecord | None, dict[str, Any] | None, int]]:
        out: dict[str, tuple[SlotRecord | None, dict[str, Any] | None, int]] = {}
        for kind in self.schedule.kinds():
            value, index = await bounded(self.dcs.read_backup_slot(kind), self.dcs_timeout)
            out[kind] = (SlotRecord.from_value(value), value, index)
        self.records = {k: r for k, (r, _v, _i) in out.items()}
        return out

    async def tick(self) -> bool:
        """One round: read the records, claim the due slot this member may take, start its
        backup. Returns True when it claimed one."""
        read = await self.read_records()
        if self.running is not None and not self.running.done():
            return False
        view = self.state.dcs_view
        if view is None or not self.eligible():
            return False
        members: Mapping[str, Any] = view.members
        now = self.now()
        for kind in self.schedule.kinds():
            record, value, index = read[kind]
            if value is not None and self._orphan(record):
                return await self._resume(kind, value, index, now, view)
        records = {k: r for k, (r, _v, _i) in read.items()}
        if running_elsewhere(records, members):
            return False
        for kind in self.schedule.kinds():
            slot = due_slot(self.schedule, kind, now)
            if slot is None or covered(kind, slot, records):
                continue
            record, _value, index = read[kind]
            decision = decide(record, slot, members)
            if decision not in ("claim", "take_over"):
                continue
            claim = claim_value(record, kind, slot, self.state.name, self.pid, now)
            won = await bounded(self.dcs.swap_backup_slot(kind, claim, index), self.dcs_timeout)
            started = self.clock.monotonic()
            if not won:
                self.record(
                    "scheduled_backup", "lost_claim", started, type=kind, slot=claim["slot"]
                )
                return False
            self.record(
                "scheduled_backup",
                "taken_over" if decision == "take_over" else "claimed",
                started,
                type=kind,
                slot=claim["slot"],
                attempt=claim["attempt"],
                previous=record.member if record is not None else None,
            )
            self.running = self.tasks.spawn(self._backup(kind, claim, view), "scheduled_backup")
            return True
        return False

    def _orphan(self, record: SlotRecord | None) -> bool:
        """A running claim of this very agent that runs nothing: its write went through but the
        answer was lost (a timeout), so this agent never started the backup."""
        return (
            record is not None
            and record.state == "running"
            and record.member == self.state.name
            and record.pid == self.pid
        )

    async def _resume(
        self,
        kind: BackupType,
        claim: dict[str, Any],
        index: int,
        now: datetime,
        view: ClusterView,
    ) -> bool:
        """Run the orphaned claim's backup if its slot is still due; else close it as failed,
        or it would stand as a running backup of a live member and hold every later slot up."""
        started = self.clock.monotonic()
        if claim.get("slot") == slot_text(due_slot(self.schedule, kind, now) or now):
            self.record("scheduled_backup", "resumed", started, type=kind, slot=claim["slot"])
            self.running = self.tasks.spawn(self._backup(kind, claim, view), "scheduled_backup")
            return True
        error = "the claim's answer was lost and its slot is past the grace window"
        closed = finished_value(claim, False, now, error=error)
        if await bounded(self.dcs.swap_backup_slot(kind, closed, index), self.dcs_timeout):
            self.record(
                "scheduled_backup", "failed", started, type=kind, slot=claim["slot"], error=error
            )
        return False

    async def _backup(self, kind: BackupType, claim: dict[str, Any], view: ClusterView) -> None:
        started = self.clock.monotonic()
        try:
            taken = await self.run_backup(kind, view)
        except BackupError as exc:
            error = str(exc)[:500]
            log.error("scheduled_backup_failed", type=kind, slot=claim["slot"], error=error)
            self.record(
                "scheduled_backup", "failed", started, type=kind, slot=claim["slot"], error=error
            )
            await self._finish(kind, finished_value(claim, False, self.now(), error=error))
            return
        self.record(
            "scheduled_backup",
            "ok",
            started,
            type=kind,
            slot=claim["slot"],
            label=taken.label,
            source=taken.source,
        )
        await self._finish(
            kind, finished_value(claim, True, self.now(), label=taken.label, source=taken.source)
        )

    async def _finish(self, kind: BackupType, value: dict[str, Any]) -> None:
        """Write the outcome into the record, if the record is still our claim (a member that
        took the slot over meanwhile owns it). A few tries: the DCS may be away for a moment."""
        for attempt in range(5):
            try:
                current, index = await bounded(self.dcs.read_backup_slot(kind), self.dcs_timeout)
                if current is None or (
                    current.get("slot"),
                    current.get("member"),
                    current.get("pid"),
                ) != (
                    value["slot"],
                    value["member"],
                    value["pid"],
                ):
                    log.warning("scheduled_backup_record_not_ours", type=kind, slot=value["slot"])
                    return
                if await bounded(self.dcs.swap_backup_slot(kind, value, index), self.dcs_timeout):
                    self.records[kind] = SlotRecord.from_value(value)
                    return
            except (DCSError, TimeoutError) as exc:
                log.info("scheduled_backup_record_failed", error=str(exc) or type(exc).__name__)
            await asyncio.sleep(min(5.0, 0.5 * 2**attempt))
        log.error("scheduled_backup_record_unwritten", type=kind, slot=value["slot"])


class BackupScheduleMetrics:
    """The schedule's outcome on /metrics, cluster-wide (every member reads the same DCS
    records, so any member's value will do: alert on the max over the cluster's members)."""

    def __init__(self, scheduler: BackupScheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[GaugeMetricFamily]:
        success = GaugeMetricFamily(
            "pgsidecar_backup_last_success_timestamp_seconds",
            "when the last scheduled backup of this type finished successfully (Unix time, from "
            "the DCS record; absent: none yet)",
            labels=["type"],
        )
        failed = GaugeMetricFamily(
            "pgsidecar_backup_last_scheduled_failed",
            "1 when the newest scheduled backup of this type failed",
            labels=["type"],
        )
        for kind, record in sorted(self.scheduler.records.items()):
            if record is None:
                continue
            last = record.last_success or {}
            finished = last.get("finished_at")
            if isinstance(finished, (int, float)) and not isinstance(finished, bool):
                success.add_metric([kind], float(finished))
            failed.add_metric([kind], 1 if record.state == "failed" else 0)
        yield success
        yield failed


class ScheduledBackup:
    """The backup a claimed slot runs: ``pgsidecar backup``'s choice of source (a streaming
    replica where one is on this host, else the master), through this member's pgBackRest.
    Members on this host are those whose member key names this host; their data directories
    are asked of their servers (pgBackRest reads the files there)."""

    def __init__(
        self,
        pgbackrest: Any,
        own: PgInstance,
        name: str,
        data_directory: Callable[[str, int], Awaitable[str]],
        hostname: str | None = None,
    ) -> None:
        self.pgbackrest = pgbackrest
        self.own = own
        self.name = name
        self.data_directory = data_directory
        self.hostname = hostname or socket.gethostname()

    def local_members(self, view: ClusterView) -> set[str]:
        local = {self.name}
        for name, m in view.members.items():
            if isinstance(m, dict) and m.get("hostname") == self.hostname:
                local.add(name)
        return local

    def can_run(self, view: ClusterView | None) -> bool:
        return (
            view is not None
            and view.leader is not None
            and view.leader.name in self.local_members(view)
        )

    async def _instance(self, name: str, view: ClusterView) -> PgInstance:
        if name == self.name:
            return self.own
        m = view.members[name]
        port = m.get("port")
        if not isinstance(port, int):
            raise BackupError(f"member {name} publishes no port")
        try:
            data_dir = await self.data_directory(self.own.host, port)
        except (PostgresError, OSError, TimeoutError) as exc:
            raise BackupError(f"cannot ask member {name} for its data directory: {exc}") from exc
        # same host: reached the way our own server is (pgBackRest takes one TCP host)
        return PgInstance(
            data_dir=Path(data_dir), port=port, host=self.own.host, user=self.own.user
        )

    async def __call__(self, kind: BackupType, view: ClusterView) -> Taken:
        master, replica = choose_source(view, self.local_members(view))
        primary = await self._instance(master, view)
        standby = await self._instance(replica, view) if replica else None
        taken: BackupSet = await self.pgbackrest.backup(kind, standby=standby, primary=primary)
        return Taken(taken.label, replica or master)


def eligible(state: NodeState, pg: PostgresPort, backup: BackupRun) -> bool:
    """A member runs scheduled backups while it is master or a replica with PostgreSQL up and
    the master's server reachable from its host."""
    return (
        state.role in (Role.MASTER, Role.REPLICA) and pg.running and backup.can_run(state.dcs_view)
    )


async def server_data_directory(pg: PostgresPort, passfile: Path, host: str, port: int) -> str:
    """The data directory of the server at host:port, asked as the superuser."""
    conn = await pg_connect(
        pg.superuser_conninfo(host, port),
        passfile,
        application_name="pgsidecar-backup",
        timeout=5.0,
        statement_timeout=5.0,
    )
    async with conn:
        cur = await conn.execute("SELECT current_setting('data_directory')")
        row = await cur.fetchone()
    if row is None:
        raise PostgresError(f"{host}:{port} did not say its data directory")
    return str(row[0])
