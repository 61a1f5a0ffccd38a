"""Operations on the data directory itself, with PostgreSQL's tools: pg_controldata, initdb,
pg_basebackup, pg_rewind, crash recovery in single-user mode, and wiping it. Each runs as the OS
user (``OsUser.run``) and reports a failure as PostgresError naming the command and its output.

Passwords live only in the 0600 passfile (and initdb's short-lived pwfile). Connection strings
name the passfile, so command lines and logs never contain a password.
"""

# The timeouts are part of this API's contract and are enforced inside.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from events import netloc
from fsm.snapshot import DataState
from pgsidecar.config import PostgresSettings
from pgsidecar.postgres.conf import Conninfo, parse_controldata, parse_lsn
from pgsidecar.postgres.errors import PostgresError, tail
from pgsidecar.postgres.osuser import OsUser
from pgsidecar.postgres.serverlog import ServerLog
from pgsidecar.postgres.tls import PostgresTlsFiles


@dataclass(frozen=True)
class ControlData:
    data_state: DataState
    system_id: str | None = None
    timeline: int | None = None  # "Latest checkpoint's TimeLineID"
    checkpoint_lsn: int | None = None
    redo_lsn: int | None = None
    min_recovery_end_lsn: int | None = None
    min_recovery_end_timeline: int | None = None
    # the raw "Database cluster state" ("shut down", "in production", ...); rewind() needs the
    # difference between a clean and an unclean standby, which data_state does not carry
    cluster_state: str | None = None

    @property
    def clean(self) -> bool:
        """Shut down cleanly (pg_rewind works only on such a target)."""
        return self.cluster_state in CLEAN_STATES


# "Database cluster state" values of pg_controldata (PostgreSQL 15, LC_ALL=C)
CLEAN_STATES = frozenset({"shut down", "shut down in recovery"})
STANDBY_STATES = frozenset({"shut down in recovery", "in archive recovery"})


def control_data(output: str, has_backup_label: bool) -> ControlData:
    """pg_controldata's output (LC_ALL=C) as ControlData; a fresh pg_basebackup copy is told by
    its ``backup_label``."""
    kv = parse_controldata(output)
    state = kv.get("Database cluster state")
    if state is None:
        return ControlData(DataState.INVALID)
    if state in STANDBY_STATES:
        data = DataState.STANDBY
    elif state == "shut down":
        data = DataState.PRIMARY_CLEAN
    elif state == "in production" and has_backup_label:
        # a fresh pg_basebackup copy carries the source's "in production" control file plus a
        # backup_label: it is a clone that has to recover as a standby, not a crashed primary
        data = DataState.STANDBY
    else:
        # "in production", "shutting down", "in crash recovery", "starting up"
        data = DataState.PRIMARY_CRASHED

    def num(key: str) -> int | None:
        v = kv.get(key)
        return int(v) if v and v.isdigit() else None

    def lsn(key: str) -> int | None:
        try:
            return parse_lsn(kv.get(key))
        except ValueError:
            return None

    return ControlData(
        data_state=data,
        system_id=kv.get("Database system identifier"),
        timeline=num("Latest checkpoint's TimeLineID"),
        checkpoint_lsn=lsn("Latest checkpoint location"),
        redo_lsn=lsn("Latest checkpoint's REDO location"),
        min_recovery_end_lsn=lsn("Minimum recovery ending location"),
        min_recovery_end_timeline=num("Min recovery ending loc's timeline"),
        cluster_state=state,
    )


def placeholder_history(tli: int, claimed: int) -> str:
    """The text of a placeholder history file: comments only (timeline.c skips lines that
    start with '#'), so every parser of history files reads it without error."""
    return (
        f"# pgsidecar: timeline {tli} was never used. The cluster's timeline counter had\n"
        f"# moved past it, so this member's promotion named timeline {claimed} instead;\n"
        f"# this file only makes PostgreSQL skip the number.\n"
    )


def _is_empty_dir(path: Path) -> bool:
    # a volume's lost+found does not make a data directory
    return all(name == "lost+found" for name in os.listdir(path))


class DataOps:
    def __init__(
        self,
        settings: PostgresSettings,
        name: str,
        data_dir: Path,
        state_dir: Path,
        passfile: Path,
        server_log: ServerLog,
        osuser: OsUser,
        log: Any,
    ) -> None:
        self.settings = settings
        self.name = name
        self.data_dir = data_dir
        self.state_dir = state_dir
        self.passfile = passfile
        self.server_log = server_log
        self.osuser = osuser
        self.log = log
        self.tls = PostgresTlsFiles(settings, state_dir, osuser)

    def _require_auth(self, ci: Conninfo) -> str | None:
        # pg_basebackup and pg_rewind run bin_dir's libpq, which may predate require_auth
        return self.tls.client_options(ci.host, for_tools=True).get("require_auth")

    def _bin(self, name: str) -> str:
        return str(Path(self.settings.bin_dir) / name)

    async def controldata(self, timeout: float = 30.0) -> ControlData:
        if not self.data_dir.is_dir() or _is_empty_dir(self.data_dir):
            return ControlData(DataState.MISSING)
        # an unreachable data dir is a configuration error, not corrupt data: never let it look
        # INVALID (which leads to a reclone that would wipe it)
        self.osuser.check_traversable(self.data_dir, "data_dir")
        argv = [self._bin("pg_controldata"), "-D", str(self.data_dir)]
        rc, out, err = await self.osuser.run(
            argv, what="pg_controldata", timeout=timeout, quiet=True
        )
        if rc != 0 or "does not match" in out + err:
            self.log.warning("pg_controldata_unreadable", rc=rc, stderr=tail(err or out, 3))
            return ControlData(DataState.INVALID)
        return control_data(out, (self.data_dir / "backup_label").exists())

    def _prepare_empty_data_dir(self) -> None:
        d = self.data_dir
        if d.exists():
            if os.listdir(d):
                raise PostgresError(f"data directory {d} is not empty; wipe it first")
        else:
            d.mkdir(parents=True, mode=0o700)
        os.chmod(d, 0o700)
        self.osuser.chown(d)
        self.osuser.check_traversable(d, "data_dir")

    async def initdb(self, timeout: float) -> None:
        su = self.settings.superuser
        password = su.resolve_password()
        if not password:
            raise PostgresError(
                f"initdb needs a password for superuser {su.username!r} (scram-sha-256 auth): set "
                f"postgresql.superuser.password or password_file"
            )
        self.osuser.ensure_dir(self.state_dir, "state_dir (it holds the passfile PostgreSQL reads)")
        self._prepare_empty_data_dir()
        fd, pwfile = tempfile.mkstemp(dir=self.state_dir, prefix=".initdb-pw-")
        try:
            os.fchmod(fd, 0o600)
            self.osuser.fchown(fd)
            with os.fdopen(fd, "w") as fh:
                fh.write(password + "\n")
            argv = [
                self._bin("initdb"),
                "-D",
                str(self.data_dir),
                f"--username={su.username}",
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--data-checksums",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-instructions",
            ]
            rc, out, err = await self.osuser.run(argv, what="initdb", timeout=timeout)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pwfile)
        if rc != 0:
            raise self.osuser.failed("initdb", argv, rc, out, err)
        self.log.info("pg_initdb_done", data_dir=str(self.data_dir))

    async def basebackup(self, source: Conninfo, timeout: float) -> None:
        """Clone ``source`` into the empty data dir, as the replication user. No -R: the agent
        writes the recovery settings itself (write_config). A failure leaves the dir empty."""
        src = dataclasses.replace(
            source,
            user=self.settings.replication.username,
            application_name=source.application_name or f"{self.name}-basebackup",
        )
        self._prepare_empty_data_dir()
        self.tls.install()  # sslrootcert
        dsn = src.dsn(self.passfile, connect_timeout=10, require_auth=self._require_auth(src))
        argv = [
            self._bin("pg_basebackup"),
            "-D",
            str(self.data_dir),
            "-X",
            "stream",
            "--checkpoint=fast",
            "--no-password",
            "-d",
            dsn,
        ]
        try:
            rc, out, err = await self.osuser.run(argv, what="pg_basebackup", timeout=timeout)
        except BaseException:
            await self.wipe()
            raise
        if rc != 0:
            await self.wipe()
            raise self.osuser.failed(
                f"pg_basebackup from {netloc.host_port(src.host, src.port)}", argv, rc, out, err
            )
        self.log.info("pg_basebackup_done", source=netloc.host_port(src.host, src.port))

    # -- timeline history files -------------------------------------------------------------------
    def history_file(self, tli: int) -> Path:
        return self.data_dir / "pg_wal" / f"{tli:08X}.history"

    def next_timeline(self, current: int) -> int:
        """The timeline a promotion would name now: PostgreSQL takes one above the newest of
        ``current`` and the timelines after it that have a history file, without a gap
        (``findNewestTimeLine`` in timeline.c, called at the end of recovery in xlog.c).
        With a restore_command it also looks in the archive first: what it finds there can
        only raise the result, which the caller checks after the promotion."""
        newest = current
        while self.history_file(newest + 1).exists():
            newest += 1
        return newest + 1

    def reserve_timelines(self, current: int, new: int) -> list[int]:
        """Make the next promotion from ``current`` name ``new``: a placeholder history file
        for each timeline in between that has none (returned). The placeholder holds only
        comments: PostgreSQL's parser skips them, so it reads as a timeline with no parent,
        which no recovery can target (it never contains the server's checkpoint); a standby
        following the new timeline fetches it from us as it fetches every history file up
        to the new one. Each file is written atomically (pg_wal and the OS user's ownership)
        and marked ready for the archiver, as PostgreSQL marks its own history files: an archive
        recovery with recovery_target_timeline 'latest' probes the archive for the history files
        one after the other, and would stop at a missing number."""
        written: list[int] = []
        status_dir = self.data_dir / "pg_wal" / "archive_status"
        for tli in range(current + 1, new):
            path = self.history_file(tli)
            if path.exists():
                continue
            self.osuser.write_file(path, placeholder_history(tli, new))
            if status_dir.is_dir():
                self.osuser.write_file(status_dir / f"{path.name}.ready", "")
            written.append(tli)
        if written:
            self.log.info("timeline_placeholders_written", timelines=written, new_timeline=new)
        return written

    async def wipe(self) -> None:
        """Remove the data directory's contents (not the directory: it may be a mount point)."""
        d = self.data_dir
        if not d.exists():
            return

        def wipe() -> None:
            for entry in os.scandir(d):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)

        await asyncio.to_thread(wipe)

    async def single_user_recovery(self, state: str | None, timeout: float) -> None:
        """Crash recovery of a former primary in single-user mode (no standby.signal: the caller
        removes it): postgres recovers, reads EOF on stdin (/dev/null), writes a shutdown
        checkpoint and exits, leaving the cluster "shut down"."""
        self.log.info("pg_crash_recovery", cluster_state=state)
        argv = [self._bin("postgres"), "--single", "-D", str(self.data_dir), "template1"]
        rc, out, err = await self.osuser.run(
            argv, what="postgres --single (crash recovery)", timeout=timeout
        )
        # what the server said in single-user mode belongs in its log with the rest
        self.server_log.write_text(err)
        if rc != 0:
            raise self.osuser.failed("crash recovery in single-user mode", argv, rc, out, err)

    async def pg_rewind(self, source: Conninfo, timeout: float) -> str:
        """Run pg_rewind from ``source`` (connects as given: the superuser) on the cleanly stopped
        data directory. Returns "rewound" or "not_needed"."""
        self.tls.install()  # sslrootcert
        dsn = source.dsn(
            self.passfile,
            application_name=f"{self.name}-rewind",
            connect_timeout=10,
            require_auth=self._require_auth(source),
        )
        argv = [
            self._bin("pg_rewind"),
            f"--target-pgdata={self.data_dir}",
            f"--source-server={dsn}",
        ]
        rc, out, err = await self.osuser.run(argv, what="pg_rewind", timeout=timeout)
        if rc != 0:
            raise self.osuser.failed(
                f"pg_rewind from {netloc.host_port(source.host, source.port)}", argv, rc, out, err
            )
        result = "not_needed" if "no rewind required" in out + err else "rewound"
        self.log.info(
            "pg_rewind_done",
            result=result,
            source=netloc.host_port(source.host, source.port),
            output=tail(err or out, 3),
        )
        return result
