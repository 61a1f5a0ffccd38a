"""Helpers for tests that run real PostgreSQL through pgsidecar.postgres.control.

Every test gets its own directory under /tmp (pytest's tmp_path is 0700 root, which the postgres OS
user cannot enter), its own free ports, and a Lab that stops every process it started, by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from pgsidecar.config import Credentials, PostgresSettings
from pgsidecar.postgres.control import Conninfo, PostgresControl
from pgsidecar.procutil import chown_tree, free_port, os_user_ids, pid_alive

PG_BIN = Path("/usr/lib/postgresql/15/bin")
OS_USER = "postgres"
# ':' and '\' exercise the .pgpass escaping; the quote exercises SQL literal quoting
SU_PASSWORD = "su:pa\\ss'word"
REPL_PASSWORD = "repl:pa\\ss'word"
# test-only: no fsync makes initdb/checkpoints cheap on a small CI machine; it changes nothing
# about crash semantics for a process kill (the OS page cache survives)
FAST_PARAMS: dict[str, str | int | float | bool] = {"fsync": False, "shared_buffers": "16MB"}


class RecordingLog:
    """A structlog-like logger that keeps every event (tests assert on them, e.g. no password)."""

    def __init__(self, echo: bool = False) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.echo = echo

    def _add(self, level: str, event: str, **kw: Any) -> None:
        self.events.append((level, event, kw))
        if self.echo:
            print(f"{time.monotonic():.3f}", level, event, kw, file=sys.stderr)

    def debug(self, event: str, **kw: Any) -> None:
        self._add("debug", event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        self._add("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._add("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._add("error", event, **kw)

    def names(self) -> list[str]:
        return [e[1] for e in self.events]

    def text(self) -> str:
        return "\n".join(f"{lvl} {ev} {kw!r}" for lvl, ev, kw in self.events)


def make_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="pgsc-test-", dir="/tmp"))
    os.chmod(root, 0o755)
    return root


def make_settings(data_dir: Path, port: int, **overrides: Any) -> PostgresSettings:
    values: dict[str, Any] = {
        "bin_dir": PG_BIN,
        "data_dir": data_dir,
        "listen": "127.0.0.1",
        "port": port,
        "os_user": OS_USER,
        "superuser": Credentials(username="postgres", password=SU_PASSWORD),
        "replication": Credentials(username="replicator", password=REPL_PASSWORD),
        "parameters": dict(FAST_PARAMS),
        "stop_timeout": 10.0,
        # tests read the server's log from ctl.log_path
        "log_destination": "file",
    }
    values.update(overrides)
    return PostgresSettings(**values)


def copy_data_dir(src: Path, dst: Path) -> None:
    """Copy a (stopped) data directory, owned by the postgres OS user, mode 0700."""
    shutil.copytree(src, dst, symlinks=True)
    uid, gid = os_user_ids(OS_USER)
    chown_tree(dst, uid, gid)
    os.chmod(dst, 0o700)


async def query(
    ci: Conninfo, passfile: Path, sql: str, params: Any = None
) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(
        ci.dsn(passfile, connect_timeout=3), autocommit=True
    ) as conn:
        cur = await conn.execute(sql, params)
        return await cur.fetchall() if cur.description else []


async def wait_for(
    predicate: Any, within: float, interval: float = 0.1, what: str = "condition"
) -> Any:
    """Await an async predicate until it returns a truthy value (returned), or fail."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last: Any = None
    while loop.time() < deadline:
        last = await predicate()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {within}s waiting for {what}; last value: {last!r}")


async def wait_pid_gone(pid: int, within: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if not pid_alive(pid):
            return True
        await asyncio.sleep(0.05)
    return not pid_alive(pid)


class Lab:
    """One test's PostgreSQL instances. ``close()`` stops all of them and every extra pid it was
    told about, then removes the directory."""

    def __init__(self, template: Path | None = None) -> None:
        self.root = make_root()
        self.template = template
        self.controls: list[PostgresControl] = []
        self.pids: list[int] = []
        self.log = RecordingLog(echo=bool(os.environ.get("PGSC_TEST_ECHO")))

    def control(
        self, name: str, *, from_template: bool = True, **overrides: Any
    ) -> PostgresControl:
        base = self.root / name
        base.mkdir()
        os.chmod(base, 0o755)
        data = base / "data"
        if from_template and self.template is not None:
            copy_data_dir(self.template, data)
        ctl = PostgresControl(
            make_settings(data, overrides.pop("port", None) or free_port(), **overrides),
            base / "state",
            name,
            self.log,
        )
        ctl.write_passfile()
        self.controls.append(ctl)
        return ctl

    def track(self, pid: int) -> None:
        self.pids.append(pid)

    async def close(self) -> None:
        for ctl in self.controls:
            with contextlib.suppress(Exception):
                await ctl.stop("immediate", timeout=5)
            ctl.close_server_log()
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await wait_pid_gone(pid, 5)
        # postmasters not started as our children (agent-death test) are tracked by pid above;
        # wait for their backends (cwd = data dir) to go before removing the files
        shutil.rmtree(self.root, ignore_errors=True)
