"""The postmaster: started as the agent's child, watched, stopped, fenced.

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
* A postmaster left by a previous agent run (not our child) is stopped before ours starts.
* Its stdout and stderr are a pipe the agent reads (``serverlog.ServerLog``): the server log goes
  to the agent's stderr as JSON lines or to a rotated file, and never blocks the server.
"""

# The timeouts are part of this API's contract and are enforced inside.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from pgsidecar.postgres.errors import PostgresError
from pgsidecar.postgres.osuser import OsUser
from pgsidecar.postgres.serverlog import ServerLog
from pgsidecar.procutil import pid_alive

# One attempt to see the server accept a connection, bounded by the given seconds: returns when it
# answers as ours, raises PostgresError or TimeoutError otherwise.
ReadyCheck = Callable[[float], Awaitable[None]]


async def fd_readable(loop: asyncio.AbstractEventLoop, fd: int, timeout: float) -> bool:
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


class Postmaster:
    def __init__(
        self,
        data_dir: Path,
        bin_dir: Path,
        server_log: ServerLog,
        stop_timeout: float,
        osuser: OsUser,
        log: Any,
    ) -> None:
        self.data_dir = data_dir
        self.bin_dir = bin_dir
        self.server_log = server_log
        self.stop_timeout = stop_timeout
        self.osuser = osuser
        self.log = log
        self._pid: int | None = None
        self._pidfd: int | None = None
        self._exit: asyncio.Future[int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expect_exit = False
        self._fenced = False
        # fence() runs on a watchdog thread; the pidfd is closed on the loop thread
        self._sig_lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._exit is not None and not self._exit.done()

    @property
    def pid(self) -> int | None:
        return self._pid if self.running else None

    def is_our_data_dir(self, path: str) -> bool:
        # the server answering on our port must be ours: never report another instance's facts
        return os.path.realpath(path) == os.path.realpath(self.data_dir)

    # ------------------------------------------------------------------ a previous run's postmaster

    def foreign_pid(self) -> int | None:
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
        if pid > 0 and pid_alive(pid) and self.foreign_pid() is None:
            self.log.warning("pg_stale_pidfile_removed", pid=pid)
            with contextlib.suppress(FileNotFoundError):
                pid_file.unlink()

    async def _stop_foreign(self, pid: int) -> None:
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
                if await fd_readable(loop, pidfd, wait):
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

    # ------------------------------------------------------------------ start

    async def start(self, timeout: float, ready: ReadyCheck) -> None:
        """Spawn the postmaster and return once ``ready`` succeeds; if it never does within
        ``timeout``, or the postmaster exits first, stop it and raise PostgresError."""
        if self.running:
            self.log.info("pg_already_running", pid=self._pid)
            return
        if not (self.data_dir / "PG_VERSION").exists():
            raise PostgresError(f"start: {self.data_dir} holds no PostgreSQL data directory")
        self.osuser.check_traversable(self.data_dir, "data_dir")
        foreign = self.foreign_pid()
        if foreign is not None:
            await self._stop_foreign(foreign)
        self._clear_recycled_pidfile()

        loop = asyncio.get_running_loop()
        self.osuser.ensure_dir(
            self.server_log.path.parent, "state_dir (it holds the passfile PostgreSQL reads)"
        )
        setpriv = self.osuser.setpriv()
        # pdeathsig after the uid switch (setpriv applies it last): the postmaster gets SIGQUIT
        # (immediate shutdown) the moment the agent dies
        argv = [setpriv, *self.osuser.switch_args(), "--pdeathsig=QUIT", "--"]
        argv += [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)]
        logfd = self.server_log.spawn_fd()  # the agent's for its life: not closed here
        log_mark = self.server_log.mark()
        # synchronous on purpose, on the loop thread: the parent-death signal is bound to
        # the thread that forks, and the loop thread lives as long as the agent
        pid = os.posix_spawn(  # noqa: ASYNC221
            setpriv,
            argv,
            self.osuser.env(),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, logfd, 1),
                (os.POSIX_SPAWN_DUP2, logfd, 2),
            ],
            # own session: a Ctrl-C or SIGTERM to the agent's process group is not a shutdown
            # request for PostgreSQL; the agent decides how to stop it
            setsid=True,
        )
        # only we reap this pid, so it cannot be recycled before pidfd_open
        pidfd = os.pidfd_open(pid)
        self._pid, self._pidfd, self._loop = pid, pidfd, loop
        exited: asyncio.Future[int] = loop.create_future()
        self._exit = exited
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
        pause = 0.01  # short first: a promotion-path start should not wait a poll interval
        while True:
            if exited.done():
                raise PostgresError(
                    f"postgres exited with {exited.result()} during startup: "
                    f"{await self.log_tail(log_mark)}"
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                await ready(min(3.0, max(remaining, 0.5)))
                self.log.info("pg_accepting", pid=pid, seconds=round(loop.time() - started, 3))
                return
            except (PostgresError, TimeoutError) as exc:
                last_error = str(exc).strip() or type(exc).__name__
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.wait([exited], timeout=min(pause, remaining))
            pause = min(pause * 2, 0.1)
        await self.stop("immediate", timeout=5)
        raise PostgresError(
            f"postgres did not accept connections within {timeout:.0f}s (last: {last_error}); "
            f"log: {await self.log_tail(log_mark)}"
        )

    async def log_tail(self, mark: int, lines: int = 10) -> str:
        """The server's last lines since ``mark`` (``ServerLog.mark()``), for an error message."""
        await asyncio.to_thread(self.server_log.flush, 1.0)
        return self.server_log.tail(lines, since=mark)

    # ------------------------------------------------------------------ exit, signals, stop

    def _on_pidfd_readable(self) -> None:
        pid, loop, fut = self._pid, self._loop, self._exit
        assert pid is not None and loop is not None and fut is not None
        status: int | None
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
        return self._signal(signal.SIGQUIT)

    async def stop(
        self, mode: Literal["fast", "immediate"] = "fast", timeout: float | None = None
    ) -> None:
        if not self.running:
            return
        assert self._exit is not None
        timeout = self.stop_timeout if timeout is None else timeout
        self._expect_exit = True
        pid = self._pid
        sig = signal.SIGINT if mode == "fast" else signal.SIGQUIT
        self.log.info("pg_stopping", pid=pid, mode=mode)
        self._signal(sig)
        # immediate shutdown: the postmaster itself SIGKILLs children that linger for 5 s
        for next_sig, wait in ((signal.SIGQUIT, timeout), (signal.SIGKILL, 10.0), (None, 10.0)):
            try:
                await asyncio.wait_for(asyncio.shield(self._exit), wait)
                # its last lines ("database system is shut down") out before the caller goes on
                await asyncio.to_thread(self.server_log.flush, 0.5)
                return
            except TimeoutError:
                pass
            if next_sig is None:
                break
            self.log.warning("pg_stop_escalating", pid=pid, signal=signal.Signals(next_sig).name)
            self._signal(next_sig)
        raise PostgresError(f"postgres (pid {pid}) did not exit after SIGKILL")
