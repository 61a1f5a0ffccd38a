"""Everything the agent does to its local PostgreSQL, as an async API.

Design points (see ARCHITECTURE.md for the why at cluster level):

* The postmaster is a direct child of the agent, spawned through ``setpriv --pdeathsig=QUIT``: if
  the agent dies for any reason (even SIGKILL) the kernel sends the postmaster SIGQUIT (immediate
  shutdown), so a master's PostgreSQL never outlives the agent that holds its lease. setpriv sets the
  parent-death signal *after* switching uid (a uid change clears it), then execs postgres.
  Caveat of PR_SET_PDEATHSIG: it fires when the *thread* that forked exits, so ``start()`` must run
  on the agent's long-lived event-loop thread (it spawns synchronously on the loop thread).
* The child is spawned with ``os.posix_spawn`` and watched through a pidfd: the pidfd becomes
  readable the instant the postmaster exits (event-driven, no polling, no child-watcher thread),
  we reap it ourselves, and ``fence()`` can signal it race-free from another thread (a pidfd can
  never point at a recycled pid).
* Every PostgreSQL binary runs as ``settings.os_user`` when the agent is root (PostgreSQL refuses
  root), with a minimal environment: the agent's own environment may carry secrets.
* Passwords live only in the 0600 passfile (and initdb's short-lived pwfile). Connection strings
  name the passfile, so command lines and logs never contain a password.
"""

# The timeouts are part of this API's contract (the agent passes its own budgets per step), and
# each is enforced inside with asyncio.wait_for, so ASYNC109 does not apply here.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import math
import os
import pwd
import shlex
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql

from fsm.snapshot import DataState, PgFacts
from pgsidecar.config import PostgresSettings, slot_name
from pgsidecar.postgres.conf import (
    make_dsn,
    parse_controldata,
    parse_lsn,
    parse_timeline_history,
    pgpass_line,
    render_conf,
    strip_auto_conf,
)
from pgsidecar.procutil import os_user_ids, pid_alive, traversable_by


class PostgresError(Exception):
    """A PostgreSQL operation failed. The message names the command, its exit code and the last
    lines of its stderr; it never contains a password."""


@dataclass(frozen=True)
class Conninfo:
    """A PostgreSQL server to connect to (a peer, or the local one)."""

    host: str
    port: int
    user: str
    dbname: str = "postgres"
    application_name: str | None = None

    def dsn(self, passfile: Path, **extra: Any) -> str:
        """libpq keyword/value string. The password comes from ``passfile``, never inline.
        ``extra`` adds/overrides libpq keywords (connect_timeout, options, ...)."""
        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "dbname": self.dbname,
            "application_name": self.application_name,
            "passfile": str(passfile),
        }
        params.update(extra)
        if "password" in params:
            raise ValueError("passwords belong in the passfile, not in a connection string")
        return make_dsn(params)


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


# "Database cluster state" values of pg_controldata (PostgreSQL 15, LC_ALL=C)
_CLEAN_STATES = frozenset({"shut down", "shut down in recovery"})
_STANDBY_STATES = frozenset({"shut down in recovery", "in archive recovery"})

# settings the agent must control: its own connections and the walreceiver depend on them
_MANAGED = ("listen_addresses", "port", "unix_socket_directories", "cluster_name")
# recovery settings that follow the role; never taken from user parameters or postgresql.auto.conf
_ROLE_KEYS = frozenset({"primary_conninfo", "primary_slot_name"})

_PROBE_SQL = """
SELECT pg_is_in_recovery(),
       current_setting('data_directory'),
       (SELECT system_identifier FROM pg_control_system())::text,
       CASE WHEN NOT pg_is_in_recovery()
            THEN pg_wal_lsn_diff(pg_current_wal_flush_lsn(), '0/0')::bigint END,
       CASE WHEN NOT pg_is_in_recovery()
            THEN ('x' || substr(pg_walfile_name(pg_current_wal_flush_lsn()), 1, 8))::bit(32)::int END,
       pg_wal_lsn_diff(pg_last_wal_receive_lsn(), '0/0')::bigint,
       pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint,
       (SELECT timeline_id FROM pg_control_checkpoint()),
       (SELECT min_recovery_end_timeline FROM pg_control_recovery()),
       r.status, r.received_tli, r.sender_host, r.sender_port
FROM (SELECT 1) AS one LEFT JOIN pg_stat_wal_receiver AS r ON true
"""

# the timeline a server writes (primary) or receives (standby) right now; pg_control_checkpoint()
# alone is stale after a promotion until the next checkpoint
_CURRENT_TLI_SQL = """
SELECT pg_is_in_recovery(),
       (SELECT timeline_id FROM pg_control_checkpoint()),
       CASE WHEN pg_is_in_recovery()
            THEN (SELECT received_tli FROM pg_stat_wal_receiver)
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END
"""


def _tail(text: str, lines: int = 15) -> str:
    kept = [ln for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return "\n".join(kept) if kept else "(no output)"


def _is_empty_dir(path: Path) -> bool:
    # a volume's lost+found does not make a data directory
    return all(name == "lost+found" for name in os.listdir(path))


class PostgresControl:
    def __init__(self, settings: PostgresSettings, state_dir: Path, name: str, log: Any) -> None:
        self.settings = settings
        self.state_dir = Path(state_dir)
        self.name = name
        self.log = log
        self.data_dir = Path(settings.data_dir)
        self.bin_dir = Path(settings.bin_dir)
        self.passfile = self.state_dir / "pgpass"
        self.log_path = self.state_dir / "postgresql.log"
        # slots this agent created for members: ensure_slots() drops only these
        self.slots_path = self.state_dir / "replication_slots.json"

        self._run_as: tuple[int, int, str, str] | None = None  # uid, gid, user, home
        if os.geteuid() == 0:
            user = settings.os_user or "postgres"
            uid, gid = os_user_ids(user)
            self._run_as = (uid, gid, user, pwd.getpwuid(uid).pw_dir)

        # the postmaster child
        self._pid: int | None = None
        self._pidfd: int | None = None
        self._exit: asyncio.Future[int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expect_exit = False
        self._fenced = False
        # fence() runs on a watchdog thread; the pidfd is closed on the loop thread
        self._sig_lock = threading.Lock()

        self._probe_conn: psycopg.AsyncConnection[Any] | None = None
        self._probe_lock = asyncio.Lock()

    # ------------------------------------------------------------------ identities, files

    def superuser_conninfo(self, host: str | None = None, port: int | None = None) -> Conninfo:
        return Conninfo(
            host=host or self._local_host(),
            port=port or self.settings.port,
            user=self.settings.superuser.username,
        )

    def replication_conninfo(self, host: str, port: int) -> Conninfo:
        return Conninfo(host=host, port=port, user=self.settings.replication.username)

    def _local_host(self) -> str:
        listen = self.settings.listen.split(",")[0].strip()
        if listen in ("", "*", "0.0.0.0"):
            return "127.0.0.1"
        if listen == "::":
            return "::1"
        return listen

    def write_passfile(self) -> None:
        """state_dir/pgpass (0600, owned by os_user): read by the agent's own connections and by
        PostgreSQL's tools and walreceiver, which run as os_user."""
        self._ensure_state_dir()
        lines = []
        for cred in (self.settings.superuser, self.settings.replication):
            password = cred.resolve_password()
            if password is not None:
                lines.append(pgpass_line(cred.username, password))
        self._write_file(self.passfile, "".join(line + "\n" for line in lines), 0o600)
        self.log.info("pg_passfile_written", path=str(self.passfile), users=len(lines))

    def _ensure_state_dir(self) -> None:
        if not self.state_dir.exists():
            self.state_dir.mkdir(parents=True, mode=0o700)
            if self._run_as:
                os.chown(self.state_dir, self._run_as[0], self._run_as[1])
        self._check_traversable(
            self.state_dir, "state_dir (it holds the passfile PostgreSQL reads)"
        )

    def _check_traversable(self, path: Path, what: str) -> None:
        if not self._run_as:
            return
        blocked = traversable_by(path, self._run_as[0], self._run_as[1])
        if blocked is not None:
            raise PostgresError(
                f"{what} {path} is not reachable by OS user {self._run_as[2]!r}: {blocked} denies "
                f"it search permission; chmod o+x {blocked} or move the directory"
            )

    def _chown(self, path: Path) -> None:
        if self._run_as:
            os.chown(path, self._run_as[0], self._run_as[1], follow_symlinks=False)

    def _write_file(self, path: Path, text: str, mode: int = 0o600) -> None:
        """Atomic replace, owned by os_user: a crash never leaves a half-written config."""
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            os.fchmod(fd, mode)
            if self._run_as:
                os.fchown(fd, self._run_as[0], self._run_as[1])
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    # ------------------------------------------------------------------ subprocesses

    def _env(self) -> dict[str, str]:
        # a fresh environment: the agent's may hold secrets (PGSIDECAR_* overrides), and LC_ALL
        # keeps pg_controldata's keys and PostgreSQL's messages in English for parsing
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LC_ALL": "C.UTF-8",
            "LANG": "C.UTF-8",
            "PGPASSFILE": str(self.passfile),
            "HOME": self._run_as[3] if self._run_as else os.environ.get("HOME", "/"),
        }
        if "TZ" in os.environ:
            env["TZ"] = os.environ["TZ"]
        return env

    def _setpriv(self) -> str:
        return shutil.which("setpriv") or "/usr/bin/setpriv"

    def _as_user(self, argv: list[str]) -> list[str]:
        if not self._run_as:
            return argv
        uid, gid = self._run_as[0], self._run_as[1]
        return [self._setpriv(), f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--", *argv]

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    async def _run(
        self, argv: list[str], *, what: str, timeout: float, quiet: bool = False
    ) -> tuple[int, str, str]:
        """Run a PostgreSQL tool as os_user; returns (rc, stdout, stderr). Raises PostgresError on
        timeout (after killing its process group: pg_basebackup forks a WAL streamer)."""
        full = self._as_user(argv)
        if not quiet:  # pg_controldata runs on every probe of a stopped server: not news
            self.log.info("pg_command", what=what, command=shlex.join(argv))
        proc = await asyncio.create_subprocess_exec(
            *full,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._env(),
            cwd="/",
            start_new_session=True,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except BaseException as exc:
            # timed out or cancelled: never leave the tool running behind our back
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 10)
            if isinstance(exc, TimeoutError):
                raise PostgresError(
                    f"{what} timed out after {timeout:.0f}s: `{shlex.join(argv)}`"
                ) from None
            raise
        rc = proc.returncode if proc.returncode is not None else -1
        return rc, out.decode(errors="replace"), err.decode(errors="replace")

    def _failed(self, what: str, argv: list[str], rc: int, out: str, err: str) -> PostgresError:
        return PostgresError(
            f"{what} failed: `{shlex.join(argv)}` exited with {rc}: {_tail(err or out)}"
        )

    # ------------------------------------------------------------------ pg_controldata

    async def controldata(self, timeout: float = 30.0) -> ControlData:
        if not self.data_dir.is_dir() or _is_empty_dir(self.data_dir):
            return ControlData(DataState.MISSING)
        # an unreachable data dir is a configuration error, not corrupt data: never let it look
        # INVALID (which leads to a reclone that would wipe it)
        self._check_traversable(self.data_dir, "data_dir")
        argv = [self._bin("pg_controldata"), "-D", str(self.data_dir)]
        rc, out, err = await self._run(argv, what="pg_controldata", timeout=timeout, quiet=True)
        if rc != 0 or "does not match" in out + err:
            self.log.warning("pg_controldata_unreadable", rc=rc, stderr=_tail(err or out, 3))
            return ControlData(DataState.INVALID)
        kv = parse_controldata(out)
        state = kv.get("Database cluster state")
        if state is None:
            return ControlData(DataState.INVALID)
        if state in _STANDBY_STATES:
            data = DataState.STANDBY
        elif state == "shut down":
            data = DataState.PRIMARY_CLEAN
        elif state == "in production" and (self.data_dir / "backup_label").exists():
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

    # ------------------------------------------------------------------ creating a data dir

    def _prepare_empty_data_dir(self) -> None:
        d = self.data_dir
        if d.exists():
            if os.listdir(d):
                raise PostgresError(f"data directory {d} is not empty; wipe it first")
        else:
            d.mkdir(parents=True, mode=0o700)
        os.chmod(d, 0o700)
        self._chown(d)
        self._check_traversable(d, "data_dir")

    async def initdb(self, timeout: float = 300.0) -> None:
        su = self.settings.superuser
        password = su.resolve_password()
        if not password:
            raise PostgresError(
                f"initdb needs a password for superuser {su.username!r} (scram-sha-256 auth): set "
                f"postgresql.superuser.password or password_file"
            )
        if self.running:
            raise PostgresError("initdb: PostgreSQL is running")
        self._ensure_state_dir()
        self._prepare_empty_data_dir()
        fd, pwfile = tempfile.mkstemp(dir=self.state_dir, prefix=".initdb-pw-")
        try:
            os.fchmod(fd, 0o600)
            if self._run_as:
                os.fchown(fd, self._run_as[0], self._run_as[1])
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
            rc, out, err = await self._run(argv, what="initdb", timeout=timeout)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pwfile)
        if rc != 0:
            raise self._failed("initdb", argv, rc, out, err)
        self.log.info("pg_initdb_done", data_dir=str(self.data_dir))

    async def basebackup(self, source: Conninfo, timeout: float = 3600.0) -> None:
        """Clone ``source`` into the empty data dir, as the replication user. No -R: the agent
        writes the recovery settings itself (write_config). A failure leaves the dir empty."""
        if self.running:
            raise PostgresError("basebackup: PostgreSQL is running")
        src = dataclasses.replace(source, user=self.settings.replication.username)
        self._prepare_empty_data_dir()
        dsn = src.dsn(
            self.passfile,
            application_name=src.application_name or f"{self.name}-basebackup",
            connect_timeout=10,
        )
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
            rc, out, err = await self._run(argv, what="pg_basebackup", timeout=timeout)
        except BaseException:
            await self._wipe_contents()
            raise
        if rc != 0:
            await self._wipe_contents()
            raise self._failed(f"pg_basebackup from {src.host}:{src.port}", argv, rc, out, err)
        self.log.info("pg_basebackup_done", source=f"{src.host}:{src.port}")

    async def wipe_data(self) -> None:
        if self.running:
            raise PostgresError("wipe_data: PostgreSQL is running")
        await self._wipe_contents()
        self.log.warning("pg_data_wiped", data_dir=str(self.data_dir))

    async def _wipe_contents(self) -> None:
        d = self.data_dir
        if not d.exists():
            return

        def wipe() -> None:
            # contents only: the data dir itself may be a mount point
            for entry in os.scandir(d):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)

        await asyncio.to_thread(wipe)

    # ------------------------------------------------------------------ rewind

    async def rewind(self, source: Conninfo, timeout: float = 3600.0) -> str:
        """Make a stopped former primary (or a diverged standby) follow ``source``.
        Returns "rewound" or "not_needed". Connects as the superuser whatever ``source.user``.
        An uncleanly stopped target is recovered first: a former primary in single-user mode, a
        standby by a brief start/stop as a standby without upstream (so start()/stop() log and
        the postmaster runs for a moment). Either way the agent rewrites the config afterwards."""
        if self.running:
            raise PostgresError("rewind: PostgreSQL must be stopped first")
        src = dataclasses.replace(source, user=self.settings.superuser.username)
        cd = await self.controldata()
        if cd.data_state in (DataState.MISSING, DataState.INVALID):
            raise PostgresError(f"rewind: data directory is {cd.data_state.value}; reclone instead")
        if cd.cluster_state not in _CLEAN_STATES:
            # pg_rewind only works on a cleanly shut down target
            if cd.data_state == DataState.STANDBY:
                await self._standby_recovery(cd.cluster_state, timeout)
            else:
                await self._single_user_recovery(cd.cluster_state, timeout)
        await self._checkpoint_if_promoted(src)
        dsn = src.dsn(self.passfile, application_name=f"{self.name}-rewind", connect_timeout=10)
        argv = [
            self._bin("pg_rewind"),
            f"--target-pgdata={self.data_dir}",
            f"--source-server={dsn}",
        ]
        rc, out, err = await self._run(argv, what="pg_rewind", timeout=timeout)
        if rc != 0:
            raise self._failed(f"pg_rewind from {src.host}:{src.port}", argv, rc, out, err)
        result = "not_needed" if "no rewind required" in out + err else "rewound"
        self.log.info(
            "pg_rewind_done",
            result=result,
            source=f"{src.host}:{src.port}",
            output=_tail(err or out, 3),
        )
        return result

    async def _standby_recovery(self, state: str | None, timeout: float) -> None:
        """Bring a crashed standby to "shut down in recovery" without writing WAL: start it as a
        standby with no upstream (it replays only its own WAL) until consistent, then stop it.
        Single-user mode would end recovery with a checkpoint record appended to the local WAL,
        which the upstream does not have: the standby would then diverge from it."""
        self.log.info("pg_standby_recovery", cluster_state=state)
        self.write_config("standby", None, None)
        await self.start(min(timeout, 600.0))
        await self.stop("fast")
        cd = await self.controldata()
        if cd.cluster_state not in _CLEAN_STATES:
            raise PostgresError(f"standby recovery left the cluster {cd.cluster_state!r}")

    async def _single_user_recovery(self, state: str | None, timeout: float) -> None:
        # single-user mode cannot run in standby mode, and the agent rewrites the signal files
        # with write_config() after the rewind anyway
        for sig in ("standby.signal", "recovery.signal"):
            with contextlib.suppress(FileNotFoundError):
                (self.data_dir / sig).unlink()
        self.log.info("pg_crash_recovery", cluster_state=state)
        # stdin is /dev/null: single-user postgres recovers, reads EOF, writes a shutdown
        # checkpoint and exits, leaving the cluster "shut down"
        argv = [self._bin("postgres"), "--single", "-D", str(self.data_dir), "template1"]
        rc, out, err = await self._run(
            argv, what="postgres --single (crash recovery)", timeout=timeout
        )
        await asyncio.to_thread(self._append_log, err)
        if rc != 0:
            raise self._failed("crash recovery in single-user mode", argv, rc, out, err)
        cd = await self.controldata()
        if cd.cluster_state not in _CLEAN_STATES:
            raise PostgresError(
                f"crash recovery left the cluster {cd.cluster_state!r}, not shut down"
            )

    def _append_log(self, text: str) -> None:
        with contextlib.suppress(OSError), open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(text)

    async def _checkpoint_if_promoted(self, src: Conninfo) -> None:
        """PostgreSQL 15's pg_rewind reads the source's timeline from its control file, which a
        promotion updates only at the next checkpoint: without one, pg_rewind says "no rewind
        required" for a target that has forked. So checkpoint a freshly promoted source."""
        try:
            conn = await self._connect(src, timeout=10, statement_timeout=300)
        except PostgresError as exc:
            raise PostgresError(f"rewind: {exc}") from None
        try:
            async with asyncio.timeout(330), conn:
                cur = await conn.execute(_CURRENT_TLI_SQL)
                row = await cur.fetchone()
                assert row is not None
                in_recovery, ckpt_tli, cur_tli = row
                if not in_recovery and cur_tli is not None and cur_tli != ckpt_tli:
                    self.log.info(
                        "pg_rewind_source_checkpoint",
                        source=f"{src.host}:{src.port}",
                        timeline=cur_tli,
                    )
                    await conn.execute("CHECKPOINT")
        except TimeoutError:
            raise PostgresError("rewind: checkpoint on the source timed out") from None
        except psycopg.Error as exc:
            raise PostgresError(f"rewind: checkpoint on the source failed: {exc}") from None

    # ------------------------------------------------------------------ configuration

    def write_config(
        self,
        role: Literal["primary", "standby"],
        upstream: Conninfo | None,
        slot: str | None,
        parameters: dict[str, Any] | None = None,
    ) -> None:
        if role not in ("primary", "standby"):
            raise ValueError(f"role must be primary or standby, not {role!r}")
        if not (self.data_dir / "PG_VERSION").exists():
            raise PostgresError(f"write_config: {self.data_dir} holds no PostgreSQL data directory")
        s = self.settings
        params: dict[str, Any] = {
            "max_connections": 100,
            "shared_buffers": "32MB",
            "wal_level": "replica",
            "hot_standby": True,
            "wal_log_hints": True,  # pg_rewind needs it (checksums are on too)
            "full_page_writes": True,
            "max_wal_senders": 10,
            "max_replication_slots": 10,
            "wal_keep_size": "128MB",
            "hot_standby_feedback": True,
            "wal_receiver_status_interval": "1s",
            "wal_receiver_timeout": "10s",
            "wal_sender_timeout": "10s",
            # a standby whose upstream went away retries after this: short for fast re-follow
            "wal_retrieve_retry_interval": "1s",
            "password_encryption": "scram-sha-256",
            "logging_collector": False,  # stderr goes to <state_dir>/postgresql.log via the agent
            "log_destination": "stderr",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "log_timezone": "UTC",
            "timezone": "UTC",
            "datestyle": "iso, mdy",
            "default_text_search_config": "pg_catalog.english",
        }
        params.update(s.parameters)
        params.update(parameters or {})
        managed = {
            "listen_addresses": s.listen,
            "port": s.port,
            # TCP only: no socket dir to share or clean up, and every client uses the passfile
            "unix_socket_directories": "",
            "cluster_name": self.name,
        }
        for key in _MANAGED:
            if key in params and str(params[key]) != str(managed[key]):
                self.log.warning(
                    "pg_parameter_ignored", parameter=key, reason="managed by the agent"
                )
        params.update(managed)
        for key in _ROLE_KEYS:
            params.pop(key, None)
        params.pop("recovery_target_timeline", None)
        if role == "standby":
            if upstream is not None:
                params["primary_conninfo"] = upstream.dsn(
                    self.passfile,
                    application_name=self.name,
                    connect_timeout=3,
                    keepalives_idle=5,
                    keepalives_interval=2,
                    keepalives_count=3,
                )
                if slot:
                    params["primary_slot_name"] = slot
            params["recovery_target_timeline"] = "latest"

        header = (
            f"Written by pgsidecar for member {self.name} as {role}; any edit is overwritten.\n"
            f"Set parameters in the pgsidecar config (postgresql.parameters)."
        )
        self._write_file(self.data_dir / "postgresql.conf", render_conf(params, header))

        hba = [
            "# Written by pgsidecar; any edit is overwritten. Networks: postgresql.hba_networks.",
            "# TYPE  DATABASE     USER  ADDRESS  METHOD",
        ]
        for net in self._hba_networks():
            if not net or any(c.isspace() for c in net):
                raise PostgresError(f"invalid hba network {net!r}")
            hba.append(f"host    all          all   {net}  scram-sha-256")
            hba.append(f"host    replication  all   {net}  scram-sha-256")
        self._write_file(self.data_dir / "pg_hba.conf", "\n".join(hba) + "\n")

        standby_signal = self.data_dir / "standby.signal"
        if role == "standby":
            if not standby_signal.exists():
                self._write_file(standby_signal, "")
        else:
            with contextlib.suppress(FileNotFoundError):
                standby_signal.unlink()
        # recovery.signal = archive recovery then promote on its own: never wanted
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / "recovery.signal").unlink()

        auto = self.data_dir / "postgresql.auto.conf"
        if auto.exists():
            text, changed = strip_auto_conf(auto.read_text(encoding="utf-8"), _ROLE_KEYS)
            if changed:
                self._write_file(auto, text)
                self.log.warning("pg_auto_conf_stripped", keys=sorted(_ROLE_KEYS))
        self.log.info(
            "pg_config_written",
            role=role,
            upstream=f"{upstream.host}:{upstream.port}" if upstream and role == "standby" else None,
            slot=slot if role == "standby" else None,
        )

    def _hba_networks(self) -> list[str]:
        """The configured networks, plus the address the agent itself connects from (its local
        host) if none covers it: without it start() could never see the server accept."""
        nets = list(self.settings.hba_networks)
        try:
            own = ipaddress.ip_address(self._local_host())
        except ValueError:
            return nets  # a host name: the operator's networks must cover it
        for net in nets:
            try:
                if own in ipaddress.ip_network(net, strict=False):
                    return nets
            except ValueError:
                continue
        return [*nets, f"{own}/{own.max_prefixlen}"]

    # ------------------------------------------------------------------ the postmaster

    @property
    def running(self) -> bool:
        return self._exit is not None and not self._exit.done()

    @property
    def postmaster_pid(self) -> int | None:
        return self._pid if self.running else None

    def _foreign_postmaster(self) -> int | None:
        """A live postmaster for our data dir that is not our child (left by a previous agent)."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0].strip())
        except (OSError, ValueError, IndexError):
            return None
        if pid == self._pid and self.running:
            return None
        if pid <= 0 or not pid_alive(pid):
            return None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            return None
        # a postmaster chdirs into its data directory: matching the cwd exactly (not a substring
        # of the command line) never mistakes /data/pg2's postmaster for /data/pg's
        is_postgres = os.path.basename(argv[0]).decode(errors="replace") in (
            "postgres",
            "postmaster",
        )
        if is_postgres and cwd == os.path.realpath(self.data_dir):
            return pid
        return None

    def _clear_recycled_pidfile(self) -> None:
        """A lock file left by a killed postmaster whose pid now belongs to an unrelated process
        of the same user would make postgres refuse to start ("lock file already exists")."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0].strip())
        except (OSError, ValueError, IndexError):
            return
        if pid > 0 and pid_alive(pid) and self._foreign_postmaster() is None:
            self.log.warning("pg_stale_pidfile_removed", pid=pid)
            with contextlib.suppress(FileNotFoundError):
                pid_file.unlink()

    async def _stop_foreign_postmaster(self, pid: int) -> None:
        self.log.warning("pg_foreign_postmaster_stopping", pid=pid)
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        loop = asyncio.get_running_loop()
        try:
            for sig, wait in ((signal.SIGQUIT, 10.0), (signal.SIGKILL, 10.0)):
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, sig)
                # readable = exited (a zombie counts: its parent, not us, must reap it)
                if await self._fd_readable(loop, pidfd, wait):
                    break
            else:
                raise PostgresError(
                    f"a previous postmaster (pid {pid}) for {self.data_dir} does not exit"
                )
        finally:
            os.close(pidfd)
        # its backends exit on postmaster death; wait for the shared memory users to go
        deadline = loop.time() + 10
        # (no event tells when the last orphan is gone: a short bounded poll, on a rare path)
        while self._shm_in_use() and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    def _shm_in_use(self) -> bool:
        # the lock file survives a SIGKILLed postmaster; any process still running from this data
        # dir (an orphaned backend) would make the new postmaster refuse to start
        data = str(self.data_dir.resolve())
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry.name}/cwd") == data and pid_alive(int(entry.name)):
                    return True
            except OSError:
                continue
        return False

    @staticmethod
    async def _fd_readable(loop: asyncio.AbstractEventLoop, fd: int, timeout: float) -> bool:
        fut: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(fd, ready)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(fd)

    async def start(self, timeout: float) -> None:
        if self.running:
            self.log.info("pg_already_running", pid=self._pid)
            return
        if not (self.data_dir / "PG_VERSION").exists():
            raise PostgresError(f"start: {self.data_dir} holds no PostgreSQL data directory")
        self._standby_tli_seen = 0  # a new postmaster (maybe after a rewind): forget the old one
        self._check_traversable(self.data_dir, "data_dir")
        foreign = self._foreign_postmaster()
        if foreign is not None:
            await self._stop_foreign_postmaster(foreign)
        self._clear_recycled_pidfile()

        loop = asyncio.get_running_loop()
        self._ensure_state_dir()
        setpriv = self._setpriv()
        argv = [setpriv]
        if self._run_as:
            argv += [f"--reuid={self._run_as[0]}", f"--regid={self._run_as[1]}", "--init-groups"]
        # pdeathsig after the uid switch (setpriv applies it last): the postmaster gets SIGQUIT
        # (immediate shutdown) the moment the agent dies
        argv += ["--pdeathsig=QUIT", "--", self._bin("postgres"), "-D", str(self.data_dir)]
        logfd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        log_offset = os.fstat(logfd).st_size
        try:
            # synchronous on purpose, on the loop thread: the parent-death signal is bound to
            # the thread that forks, and the loop thread lives as long as the agent
            pid = os.posix_spawn(  # noqa: ASYNC221
                setpriv,
                argv,
                self._env(),
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, logfd, 1),
                    (os.POSIX_SPAWN_DUP2, logfd, 2),
                ],
                # own session: a Ctrl-C or SIGTERM to the agent's process group is not a shutdown
                # request for PostgreSQL; the agent decides how to stop it
                setsid=True,
            )
        finally:
            os.close(logfd)
        # only we reap this pid, so it cannot be recycled before pidfd_open
        pidfd = os.pidfd_open(pid)
        self._pid, self._pidfd, self._loop = pid, pidfd, loop
        self._exit = loop.create_future()
        self._expect_exit = False
        self._fenced = False
        loop.add_reader(pidfd, self._on_pidfd_readable)
        self.log.info(
            "pg_started",
            pid=pid,
            data_dir=str(self.data_dir),
            command=shlex.join(argv[argv.index("--") + 1 :]),
        )

        started = loop.time()
        deadline = started + timeout
        last_error = "no attempt"
        ci = self.superuser_conninfo()
        pause = 0.01  # short first: a promotion-path start should not wait a poll interval
        while True:
            if self._exit.done():
                raise PostgresError(
                    f"postgres exited with {self._exit.result()} during startup: {self._log_tail(log_offset)}"
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                conn = await self._connect(
                    ci, timeout=min(3.0, max(remaining, 0.5)), statement_timeout=2
                )
                async with conn:
                    cur = await asyncio.wait_for(
                        conn.execute("SELECT current_setting('data_directory')"), 3
                    )
                    row = await cur.fetchone()
                # whoever answers on our port must be our postmaster, not another instance that
                # holds the port (ours would then fail to bind and exit)
                if row is None or not self._is_our_data_dir(row[0]):
                    raise PostgresError(
                        f"another server ({row[0] if row else '?'}) answers on our port"
                    )
                self.log.info("pg_accepting", pid=pid, seconds=round(loop.time() - started, 3))
                return
            except (PostgresError, psycopg.Error, TimeoutError) as exc:
                last_error = str(exc).strip() or type(exc).__name__
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.wait([self._exit], timeout=min(pause, remaining))
            pause = min(pause * 2, 0.1)
        await self.stop("immediate", timeout=5)
        raise PostgresError(
            f"postgres did not accept connections within {timeout:.0f}s (last: {last_error}); "
            f"log: {self._log_tail(log_offset)}"
        )

    def _log_tail(self, offset: int, lines: int = 10) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return _tail(fh.read().decode(errors="replace"), lines)
        except OSError:
            return "(no log)"

    def _on_pidfd_readable(self) -> None:
        pid, loop, fut = self._pid, self._loop, self._exit
        assert pid is not None and loop is not None and fut is not None
        try:
            wpid, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            wpid, status = pid, None  # reaped by someone else: exit status unknown
        if wpid == 0:
            return
        with self._sig_lock:
            if self._pidfd is not None:
                loop.remove_reader(self._pidfd)
                os.close(self._pidfd)
                self._pidfd = None
        rc = os.waitstatus_to_exitcode(status) if status is not None else -1
        if self._fenced:
            self.log.warning("pg_exited_fenced", pid=pid, returncode=rc)
        elif self._expect_exit:
            self.log.info("pg_exited", pid=pid, returncode=rc)
        else:
            self.log.error("pg_exited_unexpectedly", pid=pid, returncode=rc)
        if not fut.done():
            fut.set_result(rc)

    async def wait_exit(self) -> int:
        """Resolves with the return code (negative = killed by that signal) when the postmaster
        started by start() exits; at once if it already has."""
        if self._exit is None:
            raise PostgresError("wait_exit: PostgreSQL was not started by this agent")
        return await asyncio.shield(self._exit)

    def _signal(self, sig: int) -> bool:
        with self._sig_lock:
            if self._pidfd is None:
                return False
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
                return True
            except ProcessLookupError:
                return False

    def fence(self) -> bool:
        """SIGQUIT the postmaster (immediate shutdown: no more writes). Synchronous and
        thread-safe: the fencing watchdog calls it while the event loop may be stuck."""
        self._fenced = True
        sent = self._signal(signal.SIGQUIT)
        return sent

    async def stop(
        self, mode: Literal["fast", "immediate"] = "fast", timeout: float | None = None
    ) -> None:
        await self._close_probe()
        if not self.running:
            return
        assert self._exit is not None
        timeout = self.settings.stop_timeout if timeout is None else timeout
        self._expect_exit = True
        pid = self._pid
        sig = signal.SIGINT if mode == "fast" else signal.SIGQUIT
        self.log.info("pg_stopping", pid=pid, mode=mode)
        self._signal(sig)
        # immediate shutdown: the postmaster itself SIGKILLs children that linger for 5 s
        for next_sig, wait in ((signal.SIGQUIT, timeout), (signal.SIGKILL, 10.0), (None, 10.0)):
            try:
                await asyncio.wait_for(asyncio.shield(self._exit), wait)
                return
            except TimeoutError:
                pass
            if next_sig is None:
                break
            self.log.warning("pg_stop_escalating", pid=pid, signal=signal.Signals(next_sig).name)
            self._signal(next_sig)
        raise PostgresError(f"postgres (pid {pid}) did not exit after SIGKILL")

    # ------------------------------------------------------------------ SQL

    async def _connect(
        self, ci: Conninfo, *, timeout: float = 5.0, statement_timeout: float | None = 5.0
    ) -> psycopg.AsyncConnection[Any]:
        options = (
            f"-c statement_timeout={int(statement_timeout * 1000) if statement_timeout else 0}"
        )
        dsn = ci.dsn(
            self.passfile,
            application_name=ci.application_name or f"pgsidecar-{self.name}",
            connect_timeout=max(2, math.ceil(timeout)),
            options=options,
        )
        try:
            return await asyncio.wait_for(
                psycopg.AsyncConnection.connect(dsn, autocommit=True), timeout
            )
        except TimeoutError:
            raise PostgresError(
                f"connecting to {ci.host}:{ci.port} as {ci.user} timed out after {timeout}s"
            ) from None
        except psycopg.Error as exc:
            raise PostgresError(
                f"cannot connect to {ci.host}:{ci.port} as {ci.user}: {str(exc).strip()}"
            ) from None

    async def _sql(
        self, what: str, query: str, params: Sequence[Any] | None = None, *, timeout: float = 10.0
    ) -> Any:
        """One statement on a fresh local superuser connection; returns the first row."""
        conn = await self._connect(
            self.superuser_conninfo(), timeout=min(timeout, 5.0), statement_timeout=timeout
        )
        try:
            async with conn:
                cur = await asyncio.wait_for(conn.execute(query, params), timeout + 2)
                return await cur.fetchone() if cur.description else None
        except TimeoutError:
            raise PostgresError(f"{what} timed out after {timeout}s") from None
        except psycopg.Error as exc:
            raise PostgresError(f"{what} failed: {str(exc).strip()}") from None

    async def promote(self, timeout: float = 30) -> None:
        row = await self._sql("pg_is_in_recovery", "SELECT pg_is_in_recovery()")
        if not row[0]:
            self.log.info("pg_promote_not_needed")
            return
        # pg_promote(wait => true) polls every 100 ms; every millisecond here is a millisecond
        # without a writable master, so ask without waiting and poll ourselves, on one connection
        row = await self._sql("pg_promote", "SELECT pg_promote(false)")
        if not row[0]:
            raise PostgresError("pg_promote refused to signal the promotion")
        deadline = time.monotonic() + timeout
        conn = await self._connect(self.superuser_conninfo(), timeout=5, statement_timeout=5)
        try:
            async with conn:
                while True:
                    cur = await conn.execute("SELECT pg_is_in_recovery()")
                    one = await cur.fetchone()
                    if one is not None and not one[0]:
                        break
                    if time.monotonic() > deadline:
                        raise PostgresError(f"promotion did not complete within {timeout:g}s")
                    await asyncio.sleep(0.01)
        except psycopg.Error as exc:
            raise PostgresError(f"waiting for the promotion failed: {str(exc).strip()}") from None
        self.log.info("pg_promoted")

    async def reload(self) -> None:
        await self._sql("pg_reload_conf", "SELECT pg_reload_conf()")
        self.log.info("pg_reloaded")

    async def checkpoint(self, timeout: float = 300.0) -> None:
        await self._sql("CHECKPOINT", "CHECKPOINT", timeout=timeout)

    async def ensure_roles(self) -> None:
        """Create or update the replication role on the running primary. The password is hashed
        client-side into a SCRAM verifier (libpq PQencryptPasswordConn), and statement logging is
        off in that transaction, so the password reaches neither the server log nor the wire."""
        repl = self.settings.replication
        password = repl.resolve_password()
        if not password:
            raise PostgresError(
                f"replication user {repl.username!r} has no password (needed for scram-sha-256): set "
                f"postgresql.replication.password or password_file"
            )
        conn = await self._connect(self.superuser_conninfo(), timeout=5, statement_timeout=10)
        try:
            # bounded even if the server stops answering mid-transaction
            async with asyncio.timeout(30), conn, conn.transaction():
                for setting in (
                    "SET LOCAL log_statement = 'none'",
                    "SET LOCAL log_min_error_statement = 'panic'",
                    "SET LOCAL log_min_duration_statement = -1",
                    "SET LOCAL log_min_duration_sample = -1",
                ):
                    await conn.execute(setting)
                verifier = conn.pgconn.encrypt_password(
                    password.encode(), repl.username.encode(), b"scram-sha-256"
                ).decode()
                cur = await conn.execute(
                    "SELECT 1 FROM pg_roles WHERE rolname = %s", (repl.username,)
                )
                exists = await cur.fetchone() is not None
                await conn.execute(
                    sql.SQL("{} ROLE {} WITH LOGIN REPLICATION NOSUPERUSER PASSWORD {}").format(
                        sql.SQL("ALTER" if exists else "CREATE"),
                        sql.Identifier(repl.username),
                        sql.Literal(verifier),
                    )
                )
        except TimeoutError:
            raise PostgresError("ensure_roles timed out after 30s") from None
        except psycopg.Error as exc:
            raise PostgresError(f"ensure_roles failed: {str(exc).strip()}") from None
        self.log.info("pg_roles_ensured", role=repl.username, created=not exists)

    # ------------------------------------------------------------------ slots

    def _recorded_slots(self) -> set[str]:
        try:
            return set(json.loads(self.slots_path.read_text()))
        except FileNotFoundError:
            return set()
        except (OSError, ValueError) as exc:
            self.log.warning("pg_slot_record_unreadable", path=str(self.slots_path), error=str(exc))
            return set()

    def _record_slots(self, slots: set[str]) -> None:
        self._write_file(self.slots_path, json.dumps(sorted(slots)) + "\n")

    async def ensure_slots(self, members: set[str]) -> None:
        """A physical slot per other member; drop slots this agent created for members that left.
        Slots made by anyone else (operators, other tools) are never touched."""
        own = slot_name(self.name)
        wanted = {slot_name(m) for m in members} - {own}
        recorded = self._recorded_slots()
        # record before creating: a crash in between must not leave a slot we would never drop
        if not wanted <= recorded:
            self._record_slots(recorded | wanted)
        conn = await self._connect(self.superuser_conninfo(), timeout=5, statement_timeout=10)
        keep_recorded = set(wanted)
        try:
            async with asyncio.timeout(30), conn:
                cur = await conn.execute(
                    "SELECT slot_name, active_pid FROM pg_replication_slots "
                    "WHERE slot_type = 'physical' AND NOT temporary"
                )
                existing = {name: active for name, active in await cur.fetchall()}
                for name in sorted(wanted - existing.keys()):
                    try:
                        await conn.execute(
                            "SELECT pg_create_physical_replication_slot(%s, true)", (name,)
                        )
                        self.log.info("pg_slot_created", slot=name)
                    except psycopg.errors.DuplicateObject:
                        pass
                for name in sorted((recorded - wanted - {own}) & existing.keys()):
                    if not await self._drop_slot(conn, name, existing[name]):
                        keep_recorded.add(name)
        except TimeoutError:
            raise PostgresError("ensure_slots timed out after 30s") from None
        except psycopg.Error as exc:
            raise PostgresError(f"ensure_slots failed: {str(exc).strip()}") from None
        # only after success: a failure half way must not forget slots still to be dropped
        if keep_recorded != recorded:
            self._record_slots(keep_recorded)

    async def _drop_slot(
        self, conn: psycopg.AsyncConnection[Any], name: str, active_pid: int | None
    ) -> bool:
        for _ in range(20):
            if active_pid:
                # the member left the cluster but its walsender still holds the slot
                await conn.execute("SELECT pg_terminate_backend(%s)", (active_pid,))
            try:
                await conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
                self.log.info("pg_slot_dropped", slot=name)
                return True
            except psycopg.errors.UndefinedObject:
                return True
            except psycopg.errors.ObjectInUse:
                cur = await conn.execute(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (name,)
                )
                row = await cur.fetchone()
                active_pid = row[0] if row else None
                await asyncio.sleep(0.1)
        self.log.warning("pg_slot_drop_failed", slot=name, reason="still active; retried next time")
        return False

    # ------------------------------------------------------------------ probe

    async def _close_probe(self) -> None:
        conn, self._probe_conn = self._probe_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1)

    async def _probe_row(self) -> tuple[Any, ...]:
        async with self._probe_lock:
            for attempt in (1, 2):
                fresh = self._probe_conn is None or self._probe_conn.closed
                if fresh:
                    self._probe_conn = await self._connect(
                        self.superuser_conninfo(), timeout=2.5, statement_timeout=2
                    )
                conn = self._probe_conn
                assert conn is not None
                task = asyncio.ensure_future(self._probe_exec(conn))
                # not wait_for: cancelling a query makes psycopg send a cancel request and wait
                # for the server (up to 10 s if it is frozen); the probe returns at once instead
                # and leaves that clean-up to the abandoned task
                try:
                    done, _ = await asyncio.wait({task}, timeout=3)
                except asyncio.CancelledError:
                    self._probe_conn = None
                    self._abandon(conn, task)
                    raise
                if not done:
                    self._probe_conn = None
                    self._abandon(conn, task)
                    raise PostgresError("probe query: no answer within 3s")
                try:
                    return task.result()
                except psycopg.Error as exc:
                    await self._close_probe()
                    # a restarted server leaves the kept connection broken: retry once afresh
                    if fresh or attempt == 2:
                        raise PostgresError(f"probe query failed: {str(exc).strip()}") from None
        raise AssertionError("unreachable")

    @staticmethod
    async def _probe_exec(conn: psycopg.AsyncConnection[Any]) -> tuple[Any, ...]:
        cur = await conn.execute(_PROBE_SQL)
        row = await cur.fetchone()
        assert row is not None
        return tuple(row)

    @staticmethod
    def _abandon(conn: psycopg.AsyncConnection[Any], task: asyncio.Future[Any]) -> None:
        def finished(t: asyncio.Future[Any]) -> None:
            if not t.cancelled():
                t.exception()  # retrieved: no "exception never retrieved" noise
            with contextlib.suppress(Exception):
                conn.pgconn.finish()

        task.add_done_callback(finished)
        task.cancel()

    async def _offline_facts(self, running: bool) -> PgFacts:
        try:
            cd = await self.controldata(timeout=10)
        except PostgresError as exc:
            self.log.warning("pg_probe_controldata_failed", error=str(exc))
            return PgFacts(running=running)
        tli = cd.timeline
        if cd.min_recovery_end_timeline and cd.data_state == DataState.STANDBY:
            # a stopped standby's data can be on a later timeline than its last restartpoint
            tli = max(tli or 0, cd.min_recovery_end_timeline)
        return PgFacts(data=cd.data_state, system_id=cd.system_id, running=running, timeline=tli)

    def _is_our_data_dir(self, path: str) -> bool:
        # the server answering on our port must be ours: never report another instance's facts
        return os.path.realpath(path) == os.path.realpath(self.data_dir)

    async def probe(self) -> PgFacts:
        """Facts about the local PostgreSQL; never raises, never hangs (each step is bounded).
        While it runs, ``data`` is what pg_controldata would report (STANDBY in recovery,
        PRIMARY_CRASHED = "in production" otherwise) without forking pg_controldata."""
        running = self.running or self._foreign_postmaster() is not None
        if not running:
            await self._close_probe()
            return await self._offline_facts(False)
        try:
            row = await self._probe_row()
        except PostgresError as exc:
            self.log.info("pg_probe_unanswered", error=str(exc))
            return await self._offline_facts(True)
        (
            in_recovery,
            data_directory,
            system_id,
            flush_lsn,
            wal_tli,
            received,
            replayed,
            ckpt_tli,
            minrec_tli,
            status,
            received_tli,
            sender_host,
            sender_port,
        ) = row
        if not self._is_our_data_dir(data_directory):
            self.log.error(
                "pg_probe_wrong_server", port=self.settings.port, data_directory=data_directory
            )
            await self._close_probe()
            return PgFacts(running=self.running, accepting=False)
        received = int(received) if received is not None else None
        replayed = int(replayed) if replayed is not None else None
        if in_recovery:
            # pg_stat_wal_receiver has a row only while the receiver runs, and the checkpoint's
            # timeline lags; once a master is gone its replicas must still compare the timeline
            # they had received, so remember the highest one seen since this postmaster started
            seen = max(getattr(self, "_standby_tli_seen", 0), received_tli or 0)
            self._standby_tli_seen = seen
            timeline = max(seen, ckpt_tli or 0, minrec_tli or 0) or None
            positions = [p for p in (received, replayed) if p is not None]
            lsn = max(positions) if positions else None
        else:
            timeline = wal_tli
            lsn = int(flush_lsn) if flush_lsn is not None else None
        return PgFacts(
            data=DataState.STANDBY if in_recovery else DataState.PRIMARY_CRASHED,
            system_id=system_id,
            running=True,
            accepting=True,
            in_recovery=bool(in_recovery),
            timeline=timeline,
            lsn=lsn,
            received_lsn=received,
            replayed_lsn=replayed,
            receiver_streaming=status == "streaming",
            receiver_upstream=f"{sender_host}:{sender_port}" if sender_host else None,
        )

    # ------------------------------------------------------------------ timelines

    async def timeline_history(self, source: Conninfo) -> list[tuple[int, int]]:
        """[(parent_tli, switchpoint_lsn)] of ``source``'s current timeline, oldest first ([] on
        timeline 1). A standby whose (timeline, lsn) lies past a switchpoint of its parent
        timeline has forked and needs a rewind."""
        src = dataclasses.replace(source, user=self.settings.superuser.username)
        conn = await self._connect(src, timeout=5, statement_timeout=10)
        try:
            async with asyncio.timeout(15), conn:
                cur = await conn.execute(_CURRENT_TLI_SQL)
                row = await cur.fetchone()
                assert row is not None
                tli = row[2] or row[1]
                if not tli or tli <= 1:
                    return []
                cur = await conn.execute("SELECT pg_read_file(%s)", (f"pg_wal/{tli:08X}.history",))
                text_row = await cur.fetchone()
        except TimeoutError:
            raise PostgresError(
                f"reading the timeline history of {src.host}:{src.port} timed out"
            ) from None
        except psycopg.Error as exc:
            raise PostgresError(
                f"reading the timeline history of {src.host}:{src.port} failed: {str(exc).strip()}"
            ) from None
        return parse_timeline_history(text_row[0] if text_row else "")

    # ------------------------------------------------------------------ settings

    async def pending_restart_settings(self) -> list[str]:
        """The settings the running server has read from its files but applies only after a
        restart (pg_settings.pending_restart), by name. Raises PostgresError."""
        conn = await self._connect(self.superuser_conninfo(), timeout=3, statement_timeout=5)
        try:
            async with asyncio.timeout(7), conn:
                cur = await conn.execute(
                    "SELECT name FROM pg_settings WHERE pending_restart ORDER BY name"
                )
                return [str(r[0]) for r in await cur.fetchall()]
        except TimeoutError:
            raise PostgresError("reading pg_settings.pending_restart timed out") from None
        except psycopg.Error as exc:
            raise PostgresError(f"reading pg_settings.pending_restart failed: {exc}") from None
