"""Continuous archiving with pgBackRest: the parameters each role's postgresql.conf gets, the
member's pgbackrest.conf written at start, and the stanza the master creates after each
promotion (the bootstrap's included); and the port of a bootstrap from another cluster's
repository. Archiving never stands in the way of the master: a stanza
that cannot be created is recorded, reported and tried again while the member stays master."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
from prometheus_client.core import GaugeMetricFamily

from fsm.machine import Role
from pgsidecar.agent.ports import Clock
from pgsidecar.agent.state import ActionLog, NodeState, TaskSet
from pgsidecar.backup import BackupError, StanzaInfo
from pgsidecar.backup.pitr import RecoveryResult

log = structlog.get_logger("pgsidecar.agent")


class ArchivePort(Protocol):
    """What the agent asks of pgBackRest (PgBackRest is the real one)."""

    def archive_parameters(self) -> dict[str, str]: ...

    def restore_command(self) -> str: ...

    def write_config(self) -> Any: ...

    async def stanza_create(self, timeout: float = ...) -> None: ...  # noqa: ASYNC109

    async def info(self, timeout: float = ...) -> StanzaInfo: ...  # noqa: ASYNC109

    async def restore(self, data_dir: Path, *, standby: bool = ...) -> None: ...


class BootstrapPort(Protocol):
    """A new cluster's data restored from another cluster's repository, for the member that
    wins the initialise race (RepositoryBootstrap is the real one)."""

    def check(self) -> None: ...

    async def restore(self) -> RecoveryResult: ...

    def interrupted(self) -> bool: ...

    def settle(self) -> None: ...


ArchiverStats = tuple[int, float | None, int, float | None]

# how often the master reads the repository's backups (`pgbackrest info`), at most
BACKUPS_EVERY = 60.0
# how long one read may take (pgBackRest lists the repository's WAL too: an S3 one takes a while)
BACKUPS_TIMEOUT = 30.0


@dataclass(frozen=True)
class LastBackup:
    """The repository's newest backup as ``pgbackrest info`` listed it."""

    label: str
    type: str
    stop: float  # when it finished, Unix time


def archiver_failing(stats: ArchiverStats) -> bool:
    """pg_stat_archiver's last failure is newer than its last success (or there was none)."""
    _, last_archived, _, last_failed = stats
    return last_failed is not None and (last_archived is None or last_failed > last_archived)


class Archiving:
    """One member's archiving. ``stanza_ok`` is None until the first attempt of this promotion,
    then whether the stanza was confirmed; ``failures`` counts failed attempts since the start;
    ``last_error`` is the latest one's message (pgBackRest's, without secrets)."""

    def __init__(
        self,
        pgbackrest: ArchivePort,
        state: NodeState,
        tasks: TaskSet,
        record: ActionLog,
        clock: Clock,
        data_dir: Path,
        *,
        first_retry: float = 5.0,
        max_retry: float = 300.0,
    ) -> None:
        self.pgbackrest = pgbackrest
        self.state = state
        self.tasks = tasks
        self.record = record
        self.clock = clock
        self.data_dir = data_dir
        self.first_retry = first_retry
        self.max_retry = max_retry
        self.stanza_ok: bool | None = None
        self.failures = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[Any] | None = None
        # pg_stat_archiver as last read (watch_archiver), for /metrics
        self.archiver: ArchiverStats | None = None
        # the repository's newest backup, read by the master (watch_backups): None before the
        # first read, when the repository holds none, or while not master
        self.last_backup: LastBackup | None = None
        self.backups_read_at: float | None = None  # wall clock of the last good read
        self.backups_error: str | None = None  # the last read's error, until one succeeds

    def primary_parameters(self) -> dict[str, str]:
        # archive_mode can change only at server start: every role writes it, so a promoted
        # standby archives at once, with no restart
        return dict(self.pgbackrest.archive_parameters())

    def standby_parameters(self) -> dict[str, str]:
        # a standby that fell behind the master's WAL catches up from the repository
        return {
            **self.pgbackrest.archive_parameters(),
            "restore_command": self.pgbackrest.restore_command(),
        }

    def write_config(self) -> None:
        """pgbackrest.conf, before PostgreSQL starts (its archive_command reads it). Raises
        BackupError (or OSError) when it cannot be written."""
        self.pgbackrest.write_config()

    def on_promoted(self) -> None:
        """We are master now (after the bootstrap or a failover): create the stanza, or confirm
        it (idempotent), in the background; the master serves meanwhile."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self.stanza_ok = None
        self._task = self.tasks.spawn(self._ensure_stanza(), "stanza_create")

    async def _ensure_stanza(self) -> None:
        delay = self.first_retry
        while self.state.role is Role.MASTER:
            started = self.clock.monotonic()
            try:
                await self.pgbackrest.stanza_create()
            except BackupError as exc:
                self.stanza_ok = False
                self.failures += 1
                self.last_error = str(exc)
                log.error("stanza_create_failed", error=self.last_error, retry_in=delay)
                self.record(
                    "stanza_create", "failed", started, error=self.last_error[:500], retry=delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_retry)
                continue
            self.stanza_ok = True
            self.last_error = None
            self.record("stanza_create", "ok", started)
            return

    async def restore_replica(self) -> str | None:
        """Restore the repository's latest backup into the (empty) data directory as a standby
        (standby.signal, restore_command): the new replica replays the archive, then streams
        from the master. Returns the backup's label, or None when the repository holds no
        backup yet. Raises BackupError when the restore fails (the caller falls back on
        pg_basebackup)."""
        info = await self.pgbackrest.info()
        latest = info.latest()
        if latest is None:
            return None
        await self.pgbackrest.restore(self.data_dir, standby=True)
        return latest.label

    async def watch_archiver(
        self,
        read: Callable[[], Awaitable[ArchiverStats]],
        running: Callable[[], bool],
        every: float = 10.0,
    ) -> None:
        """Read pg_stat_archiver every ``every`` seconds while PostgreSQL runs (for /metrics)."""
        while True:
            if running():
                try:
                    self.archiver = await read()
                except Exception as exc:  # noqa: BLE001 - a probe: the next round tries again
                    log.debug("archiver_stats_unread", error=str(exc))
            await asyncio.sleep(every)

    async def watch_backups(
        self,
        every: float = BACKUPS_EVERY,
        read_timeout: float = BACKUPS_TIMEOUT,
        poll: float = 5.0,
    ) -> None:
        """While master, the repository's newest backup from ``pgbackrest info``: read within
        ``poll`` seconds of becoming master, then every ``every`` seconds, each read bounded by
        ``read_timeout`` (a child process: the loop never waits on it); the value is kept between
        reads for /status, ``pgsidecar list`` and /metrics. The repository is the master's
        business: a replica keeps nothing, so a former master shows no stale age."""
        while True:
            if self.state.role is not Role.MASTER:
                self.last_backup = self.backups_read_at = self.backups_error = None
            elif self.backups_read_at is None or self.clock.wall() - self.backups_read_at >= every:
                await self.read_backups(read_timeout)
            await asyncio.sleep(poll)

    async def read_backups(self, read_timeout: float = BACKUPS_TIMEOUT) -> None:
        try:
            info = await self.pgbackrest.info(timeout=read_timeout)
        except (BackupError, OSError) as exc:
            # the last value stays (the backups it names still exist); the next round tries
            # again, not sooner, so a slow repository is not asked more often
            self.backups_error = str(exc)[:500]
            self.backups_read_at = self.clock.wall()
            log.warning("backup_info_failed", error=self.backups_error)
            return
        newest = max(info.backups, key=lambda b: b.stop, default=None)
        self.last_backup = (
            None
            if newest is None
            else LastBackup(newest.label, newest.type, newest.stop.timestamp())
        )
        self.backups_read_at = self.clock.wall()
        self.backups_error = None

    def health(self) -> dict[str, Any]:
        """Archiving and backups for /status and ``pgsidecar list`` (ages in seconds, as of
        now). The archive's fields are the master's: a replica's archiver does not run
        (archive_mode on), so there they are None, like the backup's."""
        now = self.clock.wall()
        master = self.state.role is Role.MASTER
        stats = self.archiver if master else None
        last_archived = stats[1] if stats is not None else None
        last = self.last_backup
        return {
            "last_archived_age": _age(now, last_archived),
            "archive_failing": archiver_failing(stats) if stats is not None else None,
            "archived_count": stats[0] if stats is not None else None,
            "failed_count": stats[2] if stats is not None else None,
            "stanza_ok": self.stanza_ok,
            "last_backup": last.label if last is not None else None,
            "last_backup_type": last.type if last is not None else None,
            "last_backup_age": _age(now, last.stop) if last is not None else None,
            # how old the backup's figures are (read at most once a minute)
            "backups_read_age": _age(now, self.backups_read_at),
            "backups_error": self.backups_error,
        }


def _age(now: float, then: float | None) -> float | None:
    return None if then is None else round(max(0.0, now - then), 1)


class ArchivingMetrics:
    """The archiving's health on /metrics (a collector on the agent's registry): the age of the
    last archived WAL file, failed archive attempts, and whether the stanza is confirmed."""

    def __init__(self, archiving: Archiving, clock: Clock) -> None:
        self.archiving = archiving
        self.clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        a = self.archiving
        if a.archiver is not None:
            archived, last_archived, failed, _ = a.archiver
            age = GaugeMetricFamily(
                "pgsidecar_archive_last_archived_age_seconds",
                "seconds since PostgreSQL last archived a WAL file (pg_stat_archiver; absent: "
                "none since the statistics were reset)",
            )
            if last_archived is not None:
                age.add_metric([], max(0.0, self.clock.wall() - last_archived))
            yield age
            yield GaugeMetricFamily(
                "pgsidecar_archive_archived_count",
                "WAL files archived (pg_stat_archiver.archived_count)",
                value=archived,
            )
            yield GaugeMetricFamily(
                "pgsidecar_archive_failed_count",
                "failed archive attempts (pg_stat_archiver.failed_count)",
                value=failed,
            )
            yield GaugeMetricFamily(
                "pgsidecar_archive_failing",
                "1 when the last archive attempt failed",
                value=1 if archiver_failing(a.archiver) else 0,
            )
        backup_age = GaugeMetricFamily(
            "pgsidecar_backup_last_age_seconds",
            "seconds since the repository's newest backup finished (pgbackrest info, read by "
            "the master at most once a minute; absent: not master, no backup, or not read yet)",
        )
        if a.last_backup is not None:
            backup_age.add_metric([], max(0.0, self.clock.wall() - a.last_backup.stop))
        yield backup_age
        stanza = GaugeMetricFamily(
            "pgsidecar_backup_stanza_ok",
            "1 when this master created or confirmed the stanza, 0 when that failed (absent: "
            "not master, or not tried yet)",
        )
        if a.stanza_ok is not None:
            stanza.add_metric([], 1 if a.stanza_ok else 0)
        yield stanza
        yield GaugeMetricFamily(
            "pgsidecar_backup_stanza_failures",
            "failed stanza-create attempts since the agent started",
            value=a.failures,
        )
