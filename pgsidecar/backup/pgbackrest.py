"""pgBackRest for one member: its pgbackrest.conf, the archive and restore commands, and the
operations (stanza-create, check, backup, info, restore, expire) as an async API.

Design points:

* The stanza is the cluster's name; every member renders the same repository section and its own
  ``pg1`` (its data directory and port), so archive-push on whichever member is master writes into
  the one stanza, across failovers.
* pgBackRest runs as the PostgreSQL OS user when the agent is root (it must read the data directory
  and write files PostgreSQL reads), through ``setpriv`` as pgsidecar.postgres.control runs
  PostgreSQL's own tools, with a fresh environment: the agent's may hold secrets.
* The agent's PostgreSQL listens on TCP only (no Unix socket). pgBackRest has no TCP host option
  for a local server (``pg-host`` means a remote pgBackRest), but it connects through libpq, which
  takes the host from ``PGHOST``: a TCP host goes there, a socket directory into
  ``pgN-socket-path``. Passwords come from the member's passfile (``PGPASSFILE``).
* Every call is bounded by a timeout; on timeout or cancellation the whole process group is
  killed. A failure raises ``BackupError`` with pgBackRest's own message.
* Secrets (S3 key and secret) are only in pgbackrest.conf (0600, owned by the OS user, since
  archive-push run by PostgreSQL reads them there). Command lines never carry them, the logged
  form of the config is redacted, and error text is scrubbed of them.
"""

# The timeouts are part of this API's contract (the caller passes its own budget per operation),
# each enforced inside with asyncio.wait_for, so ASYNC109 does not apply here.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pgsidecar.backup.settings import (
    BackupSettings,
    BackupType,
    PosixRepository,
    S3Repository,
    check_restore_point_name,
)
from pgsidecar.postgres.conf import conf_value
from pgsidecar.procutil import os_user_ids, traversable_by

PGBACKREST = "/usr/bin/pgbackrest"
REDACTED = "********"
_STANZA_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# "ERROR: [055]: unable to load info file ..." (stderr, log-level-stderr=error)
_ERROR_RE = re.compile(r"^(?:ERROR|ASSERT): \[(\d+)\]: (.*)$")


class BackupError(Exception):
    """A pgBackRest operation failed. ``code`` is pgBackRest's error code (None if it did not say,
    e.g. it was killed or timed out); the message is pgBackRest's own, without secrets."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PgInstance:
    """A PostgreSQL server pgBackRest works on. ``host`` is an address or host name (TCP, the
    agent's default) or a Unix socket directory (an absolute path)."""

    data_dir: Path
    port: int
    host: str = "127.0.0.1"
    user: str = "postgres"  # the database superuser pgBackRest connects as


@dataclass(frozen=True)
class RecoveryTarget:
    """Where a restore stops replaying WAL. ``type`` "default" replays the whole archive."""

    type: Literal["default", "immediate", "time", "lsn", "xid", "name"] = "default"
    target: str | None = None
    action: Literal["promote", "pause", "shutdown"] = "promote"
    inclusive: bool = True

    @classmethod
    def time(cls, when: datetime, **kw: Any) -> RecoveryTarget:
        if when.tzinfo is None:
            raise ValueError("a recovery target time must be timezone-aware")
        text = when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")
        return cls("time", text, **kw)

    @classmethod
    def lsn(cls, lsn: str, **kw: Any) -> RecoveryTarget:
        if not re.fullmatch(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}", lsn):
            raise ValueError(f"{lsn!r} is not an LSN (like 0/3000060)")
        return cls("lsn", lsn, **kw)

    @classmethod
    def xid(cls, xid: int, **kw: Any) -> RecoveryTarget:
        if xid < 3:
            raise ValueError(f"{xid} is not a normal transaction id")
        return cls("xid", str(xid), **kw)

    @classmethod
    def restore_point(cls, name: str, **kw: Any) -> RecoveryTarget:
        """A named restore point (``pg_create_restore_point``): recovery_target_name."""
        check_restore_point_name(name)
        return cls("name", name, **kw)

    def __post_init__(self) -> None:
        needs_target = self.type in ("time", "lsn", "xid", "name")
        if needs_target != (self.target is not None):
            raise ValueError(
                f"recovery type {self.type!r} "
                + ("needs a target" if needs_target else "takes no target")
            )
        if self.target is not None and ("\n" in self.target or "'" in self.target):
            raise ValueError("a recovery target cannot contain a quote or a newline")
        if self.type == "name" and not self.inclusive:
            # pgBackRest takes --target-exclusive only with time, xid and lsn
            raise ValueError("a restore point is a position: it cannot be exclusive")


@dataclass(frozen=True)
class BackupSet:
    """One backup in the repository (``pgbackrest info --output=json``)."""

    label: str
    type: BackupType
    start: datetime
    stop: datetime
    size: int  # the database's size at backup time, bytes
    delta: int  # bytes this backup copied (all of them for a full)
    repo_size: int  # bytes in the repository, compressed
    repo_delta: int
    wal_start: str | None  # first WAL segment the backup needs
    wal_stop: str | None  # last WAL segment it needs to be consistent
    lsn_start: str | None
    lsn_stop: str | None
    prior: str | None  # the backup this one depends on (diff/incr)
    error: bool  # pgBackRest found page checksum errors


@dataclass(frozen=True)
class ArchiveRange:
    """The WAL held for one database (one system identifier and version) of the stanza."""

    id: str  # "15-1": version and database id
    min: str | None
    max: str | None


@dataclass(frozen=True)
class StanzaInfo:
    name: str
    status_code: int  # 0 ok; 1 missing stanza path; 2 no valid backups; ...
    status_message: str
    backups: list[BackupSet] = field(default_factory=list)
    archives: list[ArchiveRange] = field(default_factory=list)
    system_ids: list[int] = field(default_factory=list)
    backup_running: bool = False

    @property
    def ok(self) -> bool:
        return self.status_code == 0

    def latest(self, kind: BackupType | None = None) -> BackupSet | None:
        sets = [b for b in self.backups if kind is None or b.type == kind]
        return sets[-1] if sets else None


def _ts(value: Any) -> datetime:
    return datetime.fromtimestamp(int(value), tz=UTC)


def parse_info(text: str) -> list[StanzaInfo]:
    """``pgbackrest info --output=json`` -> one StanzaInfo per stanza."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BackupError(f"pgbackrest info printed no JSON: {exc}") from None
    if not isinstance(doc, list):
        raise BackupError("pgbackrest info: expected a JSON list of stanzas")
    out = []
    for st in doc:
        backups = []
        for b in st.get("backup", []):
            info = b.get("info", {})
            repo = info.get("repository", {})
            archive = b.get("archive") or {}
            lsn = b.get("lsn") or {}
            ts = b.get("timestamp", {})
            backups.append(
                BackupSet(
                    label=b["label"],
                    type=b["type"],
                    start=_ts(ts["start"]),
                    stop=_ts(ts["stop"]),
                    size=int(info.get("size", 0)),
                    delta=int(info.get("delta", 0)),
                    repo_size=int(repo.get("size", 0)),
                    repo_delta=int(repo.get("delta", 0)),
                    wal_start=archive.get("start"),
                    wal_stop=archive.get("stop"),
                    lsn_start=lsn.get("start"),
                    lsn_stop=lsn.get("stop"),
                    prior=b.get("prior"),
                    error=bool(b.get("error", False)),
                )
            )
        status = st.get("status", {})
        lock = status.get("lock", {}).get("backup", {})
        out.append(
            StanzaInfo(
                name=st.get("name", ""),
                status_code=int(status.get("code", -1)),
                status_message=str(status.get("message", "")),
                backups=backups,
                archives=[
                    ArchiveRange(id=a.get("id", ""), min=a.get("min"), max=a.get("max"))
                    for a in st.get("archive", [])
                ],
                system_ids=[int(d["system-id"]) for d in st.get("db", []) if "system-id" in d],
                backup_running=bool(lock.get("held", False)),
            )
        )
    return out


def _conf_line(key: str, value: str | int) -> str:
    text = str(value)
    if "\n" in text or "\r" in text or text != text.strip():
        raise BackupError(f"pgbackrest.conf value of {key} cannot hold a newline or edge spaces")
    return f"{key}={text}"


def _pct(text: str) -> str:
    # archive_command / restore_command: PostgreSQL expands %p/%f/%r and reads %% as a '%'
    return text.replace("%", "%%")


async def _end_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL every process left in ``proc``'s process group (its own session) and wait until
    they are gone, so no worker outlives the command and keeps its lock."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(proc.wait(), 10)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while loop.time() < deadline:
        if not _group_alive(proc.pid):
            return
        await asyncio.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    """True while a process of group ``pgid`` runs (zombies, whose locks are gone, do not count:
    orphans are reaped late by PID 1 here)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


class PgBackRest:
    """pgBackRest for one member: ``pg`` is its own PostgreSQL (pgBackRest's pg1), ``state_dir``
    the agent's state directory (the config, logs, locks and spool live under
    state_dir/pgbackrest/), ``passfile`` the member's libpq passfile."""

    def __init__(
        self,
        settings: BackupSettings,
        stanza: str,
        pg: PgInstance,
        *,
        state_dir: Path,
        os_user: str | None = None,
        passfile: Path | None = None,
        log: Any,
        exe: str = PGBACKREST,
    ) -> None:
        if not _STANZA_RE.match(stanza):
            raise BackupError(f"{stanza!r} cannot be a stanza name (letters, digits, . _ -)")
        self.settings = settings
        self.stanza = stanza
        self.pg = pg
        self.base_dir = Path(state_dir) / "pgbackrest"
        self.config_path = self.base_dir / "pgbackrest.conf"
        self.log_dir = self.base_dir / "log"
        self.lock_dir = self.base_dir / "lock"
        self.spool_dir = self.base_dir / "spool"
        self.passfile = passfile
        self.log = log
        self.exe = exe
        self._run_as: tuple[int, int, str] | None = None  # uid, gid, home
        if os.geteuid() == 0:
            uid, gid = os_user_ids(os_user or "postgres")
            self._run_as = (uid, gid, pwd.getpwuid(uid).pw_dir)
        # values scrubbed from any text this class logs or raises
        self._secrets: list[str] = []

    # ------------------------------------------------------------------ commands for PostgreSQL

    def _base_argv(self) -> list[str]:
        return [self.exe, f"--config={self.config_path}", f"--stanza={self.stanza}"]

    def archive_command(self) -> str:
        """archive_command for postgresql.conf: pushes one WAL segment (or history file)."""
        return " ".join(_pct(shlex.quote(a)) for a in self._base_argv()) + " archive-push %p"

    def restore_command(self) -> str:
        """restore_command: fetches one WAL segment from the repository."""
        return " ".join(_pct(shlex.quote(a)) for a in self._base_argv()) + ' archive-get %f "%p"'

    def archive_parameters(self) -> dict[str, str]:
        """The postgresql.conf parameters of a member that archives into this stanza."""
        return {"archive_mode": "on", "archive_command": self.archive_command()}

    # ------------------------------------------------------------------ pgbackrest.conf

    def _pg_options(self, index: int, pg: PgInstance) -> list[str]:
        lines = [
            _conf_line(f"pg{index}-path", str(pg.data_dir)),
            _conf_line(f"pg{index}-port", pg.port),
            _conf_line(f"pg{index}-user", pg.user),
        ]
        if pg.host.startswith("/"):
            lines.append(_conf_line(f"pg{index}-socket-path", pg.host))
        return lines

    def render_config(self, *, redact: bool = False) -> str:
        """The member's pgbackrest.conf. With ``redact`` the secrets are replaced by ********,
        for logs and records; the file itself must hold them (archive-push reads them)."""
        s = self.settings
        repo = s.repository
        lines = [
            "# Written by pgsidecar; any edit is overwritten. Settings: the backup section.",
            "[global]",
        ]
        if isinstance(repo, PosixRepository):
            lines += [_conf_line("repo1-type", "posix"), _conf_line("repo1-path", str(repo.path))]
        else:
            assert isinstance(repo, S3Repository)
            creds = repo.read_credentials()
            self._secrets = [creds.key, creds.secret]
            key = REDACTED if redact else creds.key
            secret = REDACTED if redact else creds.secret
            lines += [
                _conf_line("repo1-type", "s3"),
                _conf_line("repo1-path", repo.path),
                _conf_line("repo1-s3-bucket", repo.bucket),
                _conf_line("repo1-s3-endpoint", repo.endpoint),
                _conf_line("repo1-s3-region", repo.region),
                _conf_line("repo1-s3-uri-style", repo.uri_style),
                _conf_line("repo1-s3-key", key),
                _conf_line("repo1-s3-key-secret", secret),
                _conf_line("repo1-storage-verify-tls", "y" if repo.verify_tls else "n"),
            ]
            if repo.port is not None:
                lines.append(_conf_line("repo1-storage-port", repo.port))
            if repo.ca_file is not None:
                lines.append(_conf_line("repo1-storage-ca-file", str(repo.ca_file)))
        lines += [
            _conf_line("repo1-retention-full-type", "count"),
            _conf_line("repo1-retention-full", s.retention.full),
        ]
        if s.retention.diff is not None:
            lines.append(_conf_line("repo1-retention-diff", s.retention.diff))
        lines += [
            _conf_line("compress-type", s.compression),
            _conf_line("process-max", s.process_max),
            _conf_line("start-fast", "y" if s.start_fast else "n"),
            _conf_line("archive-timeout", f"{s.archive_timeout:g}"),
            _conf_line("log-path", str(self.log_dir)),
            _conf_line("lock-path", str(self.lock_dir)),
            _conf_line("spool-path", str(self.spool_dir)),
            _conf_line("log-level-file", "info"),
            _conf_line("log-level-console", "off"),
            _conf_line("log-level-stderr", "error"),
        ]
        if s.compression_level is not None:
            lines.append(_conf_line("compress-level", s.compression_level))
        lines += ["", f"[{self.stanza}]", *self._pg_options(1, self.pg)]
        return "\n".join(lines) + "\n"

    def write_config(self) -> Path:
        """Write pgbackrest.conf (0600, owned by the OS user) and the directories it names;
        create a posix repository's directory if it is missing. Returns the config's path."""
        text = self.render_config()
        for d in (self.base_dir, self.log_dir, self.lock_dir, self.spool_dir):
            self._mkdir(d, 0o700)
        repo = self.settings.repository
        if isinstance(repo, PosixRepository):
            self._mkdir(repo.path, 0o750)
            self._check_reachable(repo.path, "the backup repository")
        self._check_reachable(self.base_dir, "state_dir/pgbackrest")
        self._write_file(self.config_path, text)
        self.log.info(
            "pgbackrest_config_written",
            path=str(self.config_path),
            stanza=self.stanza,
            repository=repo.type,
        )
        return self.config_path

    def _mkdir(self, path: Path, mode: int) -> None:
        if path.is_dir():
            return
        try:
            path.mkdir(parents=True, mode=mode)
        except FileExistsError:
            # another member made it between our look and our mkdir: the members of a local
            # cluster start together and share a posix repository. Theirs is as good as ours
            if path.is_dir():
                return
            raise
        os.chmod(path, mode)
        if self._run_as:
            os.chown(path, self._run_as[0], self._run_as[1])

    def _check_reachable(self, path: Path, what: str) -> None:
        if not self._run_as:
            return
        blocked = traversable_by(path, self._run_as[0], self._run_as[1])
        if blocked is not None:
            raise BackupError(
                f"{what} {path} is not reachable by the PostgreSQL OS user: {blocked} denies it "
                f"search permission; chmod o+x {blocked} or move the directory"
            )

    def _write_file(self, path: Path, text: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            os.fchmod(fd, 0o600)
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

    # ------------------------------------------------------------------ running pgbackrest

    def scrub(self, text: str) -> str:
        """``text`` without the repository's secrets (for logs and errors)."""
        repo = self.settings.repository
        if not self._secrets and isinstance(repo, S3Repository):
            with contextlib.suppress(Exception):
                creds = repo.read_credentials()
                self._secrets = [creds.key, creds.secret]
        for secret in self._secrets:
            if secret:
                text = text.replace(secret, REDACTED)
        return text

    def _env(self, pgs: Sequence[PgInstance]) -> dict[str, str]:
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LC_ALL": "C.UTF-8",
            "LANG": "C.UTF-8",
            "HOME": self._run_as[2] if self._run_as else os.environ.get("HOME", "/"),
        }
        if self.passfile is not None:
            env["PGPASSFILE"] = str(self.passfile)
        tcp_hosts = {pg.host for pg in pgs if not pg.host.startswith("/")}
        if len(tcp_hosts) > 1:
            raise BackupError(
                f"pgBackRest reaches local servers through one TCP host; these differ: "
                f"{sorted(tcp_hosts)} (a server on another host needs a pgBackRest remote)"
            )
        if tcp_hosts:
            env["PGHOST"] = tcp_hosts.pop()
        if "TZ" in os.environ:
            env["TZ"] = os.environ["TZ"]
        return env

    def _as_user(self, argv: list[str]) -> list[str]:
        setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        # pgBackRest dies with whoever started it (SIGKILL; its workers follow when their pipes
        # close): a scheduled backup whose agent died must not go on copying beside the backup
        # of the member that takes its slot over
        prefix = [setpriv, "--pdeathsig=KILL"]
        if self._run_as:
            uid, gid = self._run_as[0], self._run_as[1]
            prefix += [f"--reuid={uid}", f"--regid={gid}", "--init-groups"]
        return [*prefix, "--", *argv]

    async def run(
        self,
        command: str,
        options: Sequence[str] = (),
        *,
        timeout: float,
        pgs: Sequence[PgInstance] | None = None,
    ) -> str:
        """Run ``pgbackrest --config --stanza [options] command`` as the OS user; returns its
        stdout. Raises BackupError on a non-zero exit, a timeout or a missing config."""
        if not self.config_path.exists():
            raise BackupError(
                f"pgbackrest {command}: {self.config_path} does not exist (write_config first)"
            )
        argv = [*self._base_argv(), *options, command]
        env = self._env(pgs if pgs is not None else [self.pg])
        self.log.info("pgbackrest_command", command=command, argv=shlex.join(argv))
        loop = asyncio.get_running_loop()
        started = loop.time()
        proc = await asyncio.create_subprocess_exec(
            *self._as_user(argv),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd="/",
            start_new_session=True,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except BaseException as exc:
            # timed out or cancelled: the backup's worker processes share its process group
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_end_group(proc), 15)
            if isinstance(exc, TimeoutError):
                self.log.error("pgbackrest_timeout", command=command, timeout=timeout)
                raise BackupError(f"pgbackrest {command} timed out after {timeout:g}s") from None
            raise
        rc = proc.returncode if proc.returncode is not None else -1
        seconds = round(loop.time() - started, 3)
        if rc != 0:
            # a pgbackrest killed from outside leaves its workers (backup:local, restore:local)
            # copying on their own, holding the stanza's lock: the next backup would fail
            await _end_group(proc)
            error = self._error(command, rc, err.decode(errors="replace"), out.decode("replace"))
            self.log.error(
                "pgbackrest_failed",
                command=command,
                returncode=rc,
                seconds=seconds,
                error=str(error),
            )
            raise error
        self.log.info("pgbackrest_done", command=command, seconds=seconds)
        return out.decode(errors="replace")

    def _error(self, command: str, rc: int, err: str, out: str) -> BackupError:
        if rc < 0:
            return BackupError(f"pgbackrest {command} was killed by signal {-rc}")
        lines = [ln.rstrip() for ln in (err.splitlines() + out.splitlines()) if ln.strip()]
        for i, line in enumerate(lines):
            m = _ERROR_RE.match(line.strip())
            if m:
                code = int(m.group(1))
                # the message may go on over the following lines (hints)
                msg = "\n".join([m.group(2), *lines[i + 1 : i + 6]])
                return BackupError(self.scrub(f"pgbackrest {command}: [{code}] {msg}"), code)
        tail = "\n".join((err or out).strip().splitlines()[-10:]) or "(no output)"
        return BackupError(self.scrub(f"pgbackrest {command} exited with {rc}: {tail}"))

    # ------------------------------------------------------------------ operations

    async def stanza_create(self, timeout: float = 300.0) -> None:
        """Create the stanza (or confirm it matches this cluster), then check that archiving
        reaches it. Safe to run again: both steps are idempotent. Needs PostgreSQL running, with
        archive_command set to this member's."""
        await self.run("stanza-create", timeout=timeout)
        await self.check(timeout=timeout)

    async def check(self, timeout: float = 300.0) -> None:
        """pgBackRest's check: switches WAL on the server and waits until the segment is in the
        repository (archive_timeout)."""
        await self.run("check", timeout=timeout)

    async def backup(
        self,
        kind: BackupType = "full",
        *,
        standby: PgInstance | None = None,
        primary: PgInstance | None = None,
        timeout: float = 6 * 3600.0,
    ) -> BackupSet:
        """Take a backup; returns it as ``info`` lists it. With ``standby`` the files are copied
        from that streaming replica (backup-standby) while the backup is started and stopped on
        ``primary`` (by default this member's server). A diff or incr without a prior full is
        taken as a full by pgBackRest."""
        options = [f"--type={kind}"]
        pgs = [primary or self.pg]
        if standby is not None:
            pgs.append(standby)
            options += ["--backup-standby"]
            for index, pg in ((1, pgs[0]), (2, standby)):
                options += ["--" + line for line in self._pg_options(index, pg)]
        elif primary is not None:
            options += ["--" + line for line in self._pg_options(1, primary)]
        await self.run("backup", options, timeout=timeout, pgs=pgs)
        info = await self.info()
        latest = info.latest()
        if latest is None:
            raise BackupError("pgbackrest backup succeeded but info lists no backup")
        self.log.info(
            "pgbackrest_backup_taken",
            label=latest.label,
            type=latest.type,
            size=latest.size,
            repo_size=latest.repo_size,
        )
        return latest

    async def info(self, timeout: float = 60.0) -> StanzaInfo:
        out = await self.run("info", ["--output=json"], timeout=timeout)
        stanzas = parse_info(out)
        for st in stanzas:
            if st.name == self.stanza:
                return st
        raise BackupError(f"pgbackrest info did not list stanza {self.stanza!r}")

    async def restore(
        self,
        data_dir: Path,
        target: RecoveryTarget | None = None,
        *,
        standby: bool = False,
        delta: bool = False,
        backup_set: str | None = None,
        timeout: float = 6 * 3600.0,
    ) -> None:
        """Restore into ``data_dir`` (created if missing; it must be empty unless ``delta``).
        ``target`` sets where recovery stops (and what PostgreSQL does there: promote by default);
        ``standby`` writes standby.signal instead, for a replica that then streams. Either way
        postgresql.auto.conf gets this member's restore_command. The server is not started."""
        if standby and target is not None and target.type != "default":
            raise BackupError("a standby restore replays the whole archive: it takes no target")
        data_dir = Path(data_dir)
        if data_dir.exists():
            if not delta and any(n != "lost+found" for n in os.listdir(data_dir)):
                raise BackupError(
                    f"restore into {data_dir}: the directory is not empty (use delta to reuse "
                    f"its files, or empty it)"
                )
        else:
            self._mkdir(data_dir, 0o700)
        self._check_reachable(data_dir, "the data directory")
        options = [f"--pg1-path={data_dir}"]
        if delta:
            options.append("--delta")
        if backup_set is not None:
            options.append(f"--set={backup_set}")
        if standby:
            options.append("--type=standby")
        elif target is not None:
            options.append(f"--type={target.type}")
            if target.target is not None:
                options.append(f"--target={target.target}")
            if target.type not in ("default", "immediate") and not target.inclusive:
                options.append("--target-exclusive")
            if target.type != "default":
                options.append(f"--target-action={target.action}")
        await self.run("restore", options, timeout=timeout)
        self._set_restore_command(data_dir)

    def _set_restore_command(self, data_dir: Path) -> None:
        """Put this member's restore_command into postgresql.auto.conf in place of the one
        pgBackRest wrote (which names its own command line and quotes no quote), quoted the way
        PostgreSQL reads it."""
        auto = data_dir / "postgresql.auto.conf"
        try:
            text = auto.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = ""
        kept = [
            line
            for line in text.splitlines()
            if line.split("=", 1)[0].strip().lower() != "restore_command"
        ]
        kept.append(f"restore_command = {conf_value(self.restore_command())}")
        self._write_file(auto, "\n".join(kept) + "\n")

    async def expire(self, timeout: float = 3600.0) -> None:
        """Remove backups (and their WAL) beyond the retention; pgBackRest also runs this after
        each successful backup."""
        await self.run("expire", timeout=timeout)
