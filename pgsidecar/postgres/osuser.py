"""The OS user PostgreSQL runs as: its environment, the files it owns, and running its tools.

Every PostgreSQL binary runs as ``settings.os_user`` when the agent is root (PostgreSQL refuses
root), with a minimal environment: the agent's own environment may carry secrets.
"""

# The timeouts are part of this API's contract and are enforced inside with asyncio.wait_for.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shlex
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

from pgsidecar.postgres.errors import PostgresError, tail
from pgsidecar.procutil import os_user_ids, traversable_by


class OsUser:
    """Who PostgreSQL's processes and files belong to. When the agent is not root, everything runs
    as the agent's own user and nothing is switched or chowned."""

    def __init__(self, os_user: str | None, passfile: Path, log: Any) -> None:
        self.passfile = passfile
        self.log = log
        self.ids: tuple[int, int, str, str] | None = None  # uid, gid, user, home
        if os.geteuid() == 0:
            user = os_user or "postgres"
            uid, gid = os_user_ids(user)
            self.ids = (uid, gid, user, pwd.getpwuid(uid).pw_dir)

    # ------------------------------------------------------------------ processes

    def env(self) -> dict[str, str]:
        # a fresh environment: the agent's may hold secrets (PGSIDECAR_* overrides), and LC_ALL
        # keeps pg_controldata's keys and PostgreSQL's messages in English for parsing
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LC_ALL": "C.UTF-8",
            "LANG": "C.UTF-8",
            "PGPASSFILE": str(self.passfile),
            "HOME": self.ids[3] if self.ids else os.environ.get("HOME", "/"),
        }
        if "TZ" in os.environ:
            env["TZ"] = os.environ["TZ"]
        return env

    @staticmethod
    def setpriv() -> str:
        return shutil.which("setpriv") or "/usr/bin/setpriv"

    def switch_args(self) -> list[str]:
        """setpriv's options that switch to the OS user ([] when the agent is not root)."""
        if not self.ids:
            return []
        return [f"--reuid={self.ids[0]}", f"--regid={self.ids[1]}", "--init-groups"]

    def as_user(self, argv: list[str]) -> list[str]:
        if not self.ids:
            return argv
        return [self.setpriv(), *self.switch_args(), "--", *argv]

    async def run(
        self, argv: list[str], *, what: str, timeout: float, quiet: bool = False
    ) -> tuple[int, str, str]:
        """Run a PostgreSQL tool as the OS user; returns (rc, stdout, stderr). Raises
        PostgresError on timeout (after killing its process group: pg_basebackup forks a WAL
        streamer)."""
        full = self.as_user(argv)
        if not quiet:  # pg_controldata runs on every probe of a stopped server: not news
            self.log.info("pg_command", what=what, command=shlex.join(argv))
        proc = await asyncio.create_subprocess_exec(
            *full,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env(),
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

    @staticmethod
    def failed(what: str, argv: list[str], rc: int, out: str, err: str) -> PostgresError:
        return PostgresError(
            f"{what} failed: `{shlex.join(argv)}` exited with {rc}: {tail(err or out)}"
        )

    # ------------------------------------------------------------------ files

    def check_traversable(self, path: Path, what: str) -> None:
        if not self.ids:
            return
        blocked = traversable_by(path, self.ids[0], self.ids[1])
        if blocked is not None:
            raise PostgresError(
                f"{what} {path} is not reachable by OS user {self.ids[2]!r}: {blocked} denies "
                f"it search permission; chmod o+x {blocked} or move the directory"
            )

    def chown(self, path: Path) -> None:
        if self.ids:
            os.chown(path, self.ids[0], self.ids[1], follow_symlinks=False)

    def fchown(self, fd: int) -> None:
        if self.ids:
            os.fchown(fd, self.ids[0], self.ids[1])

    def ensure_dir(self, path: Path, what: str) -> None:
        """Create ``path`` (0700, owned by the OS user) if missing; it must be reachable."""
        if not path.exists():
            path.mkdir(parents=True, mode=0o700)
            self.chown(path)
        self.check_traversable(path, what)

    def write_file(self, path: Path, text: str, mode: int = 0o600) -> None:
        """Atomic replace, owned by the OS user: a crash never leaves a half-written file."""
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            os.fchmod(fd, mode)
            self.fchown(fd)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
