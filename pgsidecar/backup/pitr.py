"""Point-in-time recovery of a new cluster's data directory from another cluster's pgBackRest
repository: the one implementation behind the agent's ``bootstrap`` section (method pgbackrest)
and the lab's ``local up --restore-from``.

1. pgBackRest restores the source stanza's backup into the empty data directory (the latest
   backup that ended before the target), with the recovery settings for the target and
   ``recovery_target_action = promote`` in postgresql.auto.conf and the source's
   ``restore_command``.
2. PostgreSQL runs once on its own, as the OS user and as this process's child (it dies with
   it), from the restored configuration with ``archive_mode=off`` (it must never push its new
   timeline into the source's stanza), ``hot_standby=off`` (nobody connects) and ``ssl=off``
   (the source's certificate files are not here): it replays the source's archive up to the
   target and promotes, on a new timeline.
3. It is stopped cleanly, and the recovery's ``restore_command`` and ``recovery_target*`` are
   removed from postgresql.auto.conf, which outranks postgresql.conf: a target left there would
   stop a later standby's replay, a restore_command would read the source's archive.

The result is a primary's data directory, shut down cleanly, with the source's system
identifier (a restore keeps it) on a timeline of its own. Every step is bounded by a timeout;
a failure raises RecoveryError with PostgreSQL's last log lines, and leaves the data directory
for the caller to wipe.
"""

# The timeouts are part of this API's contract (the caller passes its own budget per step).
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgsidecar.backup.pgbackrest import BackupError, PgBackRest, PgInstance, RecoveryTarget
from pgsidecar.backup.settings import (
    BackupSettings,
    BootstrapSettings,
    PosixRepository,
    RecoveryTargetSettings,
    S3Repository,
)
from pgsidecar.postgres.conf import parse_controldata
from pgsidecar.postgres.osuser import OsUser

_RECOVERY_SETTING = re.compile(r"^\s*(restore_command|recovery_target\w*)\s*=", re.I)
_POLL = 0.5


class RecoveryError(Exception):
    """The restore or the recovery did not reach a promoted, cleanly stopped data directory."""


@dataclass(frozen=True)
class RecoveryServer:
    """The PostgreSQL that replays the restored data: its binaries, data directory, the address
    it listens on while it does (PostgreSQL needs one socket), and its OS user (None: this
    process's own user, unless it is root: then postgres)."""

    bin_dir: Path
    data_dir: Path
    port: int
    listen: str = "127.0.0.1"
    os_user: str | None = None


@dataclass(frozen=True)
class RecoveryResult:
    """The restored data directory as pg_controldata shows it after the recovery."""

    system_id: str | None
    timeline: int | None


def recovery_target(target: RecoveryTargetSettings | None) -> RecoveryTarget:
    """The bootstrap section's target as the restore's (promote once there); without one, the
    whole archive is replayed."""
    if target is None:
        return RecoveryTarget("default")
    if target.time is not None:
        return RecoveryTarget.time(target.time, action="promote", inclusive=target.inclusive)
    if target.lsn is not None:
        return RecoveryTarget.lsn(target.lsn, action="promote", inclusive=target.inclusive)
    if target.xid is not None:
        return RecoveryTarget.xid(target.xid, action="promote", inclusive=target.inclusive)
    assert target.name is not None  # the settings hold exactly one
    return RecoveryTarget.restore_point(target.name, action="promote")


def source_pgbackrest(
    settings: BootstrapSettings, server: RecoveryServer, work_dir: Path, log: Any
) -> PgBackRest:
    """pgBackRest for the source stanza, its files under ``work_dir``/pgbackrest (never the
    member's own pgbackrest.conf, which names its own stanza and repository)."""
    assert settings.repository is not None and settings.stanza is not None
    return PgBackRest(
        BackupSettings(repository=settings.repository, process_max=settings.process_max),
        settings.stanza,
        PgInstance(data_dir=server.data_dir, port=server.port, host=server.listen),
        state_dir=work_dir,
        os_user=server.os_user,
        log=log,
    )


async def restore_to_target(
    source: PgBackRest,
    target: RecoveryTarget,
    server: RecoveryServer,
    *,
    log_path: Path,
    log: Any,
    restore_timeout: float,
    recovery_timeout: float,
    stop_timeout: float = 120.0,
) -> RecoveryResult:
    """Restore ``server.data_dir`` (absent or empty) from ``source`` to ``target``, replay to it
    and promote, stop cleanly, remove the recovery's settings. ``source``'s pgbackrest.conf must
    have been written (``write_config``). PostgreSQL's output goes to ``log_path``."""
    if target.type != "default" and target.action != "promote":
        raise RecoveryError("a new cluster's recovery promotes at its target")
    # the recovery server and pg_controldata use no password: an empty passfile
    osuser = OsUser(server.os_user, Path(os.devnull), log)
    log.info(
        "pitr_restore",
        stanza=source.stanza,
        target_type=target.type,
        target=target.target,
        inclusive=target.inclusive,
    )
    try:
        await source.restore(server.data_dir, target, timeout=restore_timeout)
    except BackupError as exc:
        raise RecoveryError(f"restore from stanza {source.stanza!r} failed: {exc}") from None
    await _recover(osuser, server, log_path, target, recovery_timeout, stop_timeout, log)
    forget_recovery(server.data_dir)
    controldata = await _controldata(osuser, server)
    state = controldata.get("Database cluster state", "")
    if state != "shut down":
        raise RecoveryError(
            f"the restored data directory is {state or 'unreadable'!r}, not shut down"
        )
    timeline = controldata.get("Latest checkpoint's TimeLineID")
    result = RecoveryResult(
        system_id=controldata.get("Database system identifier"),
        timeline=int(timeline) if timeline and timeline.isdigit() else None,
    )
    log.info("pitr_done", system_id=result.system_id, timeline=result.timeline)
    return result


async def _recover(
    osuser: OsUser,
    server: RecoveryServer,
    log_path: Path,
    target: RecoveryTarget,
    timeout: float,
    stop_timeout: float,
    log: Any,
) -> None:
    """Run PostgreSQL on the restored data until it has promoted, then stop it with a fast
    shutdown."""
    argv = [
        str(server.bin_dir / "postgres"),
        "-D",
        str(server.data_dir),
        "-c",
        f"port={server.port}",
        "-c",
        f"listen_addresses={server.listen}",
        "-c",
        "unix_socket_directories=",
        "-c",
        "archive_mode=off",
        "-c",
        "hot_standby=off",
        "-c",
        "ssl=off",
        "-c",
        "logging_collector=off",
    ]
    # the postmaster dies with this process (SIGKILL): a recovery never outlives its agent
    full = [osuser.setpriv(), "--pdeathsig=KILL", *osuser.switch_args(), "--", *argv]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        mark = os.lseek(out, 0, os.SEEK_END)
        proc = await asyncio.create_subprocess_exec(
            *full,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=osuser.env(),
            cwd="/",
            start_new_session=True,
        )
    finally:
        os.close(out)  # the server holds its own copy
    log.info("pitr_recovery_started", pid=proc.pid, port=server.port)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), _POLL)
            except TimeoutError:
                pass
            if proc.returncode is not None:
                raise RecoveryError(
                    f"PostgreSQL stopped before reaching the recovery target "
                    f"({_describe(target)}), exit code {proc.returncode}:\n"
                    f"{_log_tail(log_path, mark)}"
                )
            state = (await _controldata(osuser, server)).get("Database cluster state", "")
            # the restored pg_control says "in production" too (copied from the running
            # source) until the startup process marks it in recovery; recovery.signal, which
            # PostgreSQL removes only when recovery ends, tells the two apart
            promoted = not (server.data_dir / "recovery.signal").exists()
            if state == "in production" and promoted:
                log.info("pitr_promoted")
                return
            if loop.time() > deadline:
                raise RecoveryError(
                    f"recovery to {_describe(target)} did not complete within {timeout:g}s "
                    f"({state or 'no state'}):\n{_log_tail(log_path, mark)}"
                )
    finally:
        await _stop(proc, stop_timeout)


async def _stop(proc: asyncio.subprocess.Process, timeout: float) -> None:
    """Fast shutdown (SIGINT); after ``timeout`` an immediate one (SIGQUIT), then SIGKILL of the
    process group. Returns once the postmaster is reaped."""
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 10.0), (signal.SIGKILL, 10.0)):
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if sig is signal.SIGKILL:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), wait)


async def _controldata(osuser: OsUser, server: RecoveryServer) -> dict[str, str]:
    argv = [str(server.bin_dir / "pg_controldata"), "-D", str(server.data_dir)]
    rc, out, _ = await osuser.run(argv, what="pg_controldata", timeout=30, quiet=True)
    return parse_controldata(out) if rc == 0 else {}


def _describe(target: RecoveryTarget) -> str:
    if target.target is None:
        return "the end of the archive" if target.type == "default" else target.type
    return f"{target.type} {target.target}"


def _log_tail(path: Path, mark: int, lines: int = 8) -> str:
    """What the server logged since ``mark``: its FATAL and PANIC lines first (the reason,
    which a record's bounded error field must not lose), then its last lines."""
    try:
        with open(path, "rb") as fh:
            fh.seek(mark)
            text = fh.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    logged = text.splitlines()
    reasons = [ln for ln in logged if "FATAL:" in ln or "PANIC:" in ln][-2:]
    tail = [ln for ln in logged[-lines:] if ln not in reasons]
    return "\n".join(reasons + tail) or "(no log)"


def forget_recovery(data_dir: Path) -> None:
    """postgresql.auto.conf without the recovery's restore_command and recovery_target*."""
    auto = data_dir / "postgresql.auto.conf"
    if not auto.exists():
        return
    st = auto.stat()
    kept = [ln for ln in auto.read_text().splitlines() if not _RECOVERY_SETTING.match(ln)]
    auto.write_text("\n".join(kept) + "\n")
    with contextlib.suppress(PermissionError):
        os.chown(auto, st.st_uid, st.st_gid)


class RepositoryBootstrap:
    """A new cluster's first data directory restored from another cluster's repository: the
    ``bootstrap`` section with method pgbackrest, for the member that initialises the cluster.
    Its files (the source's pgbackrest.conf, logs, the recovery's server log) live under
    ``work_dir``.

    A restore in progress is marked by a file (``work_dir``/restoring), removed once the data
    directory is complete or wiped (``settle``): a member killed mid-restore finds it at its
    next start and must wipe the data directory, which holds the source's recovery target and
    ``restore_command`` in postgresql.auto.conf (started as a standby it would replay to the
    target and promote on its own)."""

    def __init__(
        self, settings: BootstrapSettings, server: RecoveryServer, work_dir: Path, log: Any
    ) -> None:
        self.settings = settings
        self.server = server
        self.work_dir = work_dir
        self.log = log
        self.source = source_pgbackrest(settings, server, work_dir, log)
        self.target = recovery_target(settings.target)

    def check(self) -> None:
        """What can be checked before the cluster is initialised, without touching the
        repository: an S3 source's credentials files are readable (BackupSettingsError)."""
        repo = self.settings.repository
        if isinstance(repo, S3Repository):
            repo.read_credentials()

    async def restore(self) -> RecoveryResult:
        """Write the source's pgbackrest.conf, restore, replay to the target and promote, stop.
        Raises RecoveryError (BackupError, BackupSettingsError or OSError for the config)."""
        repo = self.settings.repository
        if isinstance(repo, PosixRepository) and not repo.path.is_dir():
            # pgBackRest's config step would create an empty repository there
            raise RecoveryError(
                f"bootstrap.repository.path {repo.path} is not a directory: mount the source "
                f"cluster's repository there or fix the path"
            )
        self.source.write_config()
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(f"{self.server.data_dir}\n")
        result = await restore_to_target(
            self.source,
            self.target,
            self.server,
            log_path=self.work_dir / "recovery.log",
            log=self.log,
            restore_timeout=self.settings.restore_timeout,
            recovery_timeout=self.settings.recovery_timeout,
        )
        self.settle()
        return result

    @property
    def marker(self) -> Path:
        return self.work_dir / "restoring"

    def interrupted(self) -> bool:
        """Whether a restore began and neither completed nor was wiped (``settle``)."""
        return self.marker.exists()

    def settle(self) -> None:
        """The data directory is complete, or the partial restore is wiped."""
        with contextlib.suppress(FileNotFoundError):
            self.marker.unlink()
