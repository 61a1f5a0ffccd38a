"""A server the tests run as their child (etcd, a Consul agent): started with its output in a
log file and so that it dies with the test process, waited for until it answers, stopped by pid
and reaped, and its log's tail for the error when it does not come up."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, TypeVar

from pgsidecar.procutil import die_with_parent, terminate


class ChildServer:
    """What the etcd and Consul agent fixtures share. A subclass sets ``what`` (its name in
    errors), ``log_path`` and ``stop_timeout`` (SIGKILL after it)."""

    what: str
    log_path: Path
    stop_timeout: float
    proc: subprocess.Popen[bytes] | None = None

    def spawn_logged(self, argv: list[str]) -> None:
        log = open(self.log_path, "ab")  # handed to the child, closed below
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        finally:
            log.close()

    def wait_ready(
        self, ready: Callable[[], bool], timeout: float, interval: float, not_ready: str
    ) -> None:
        """Until ``ready()``; if the process exits first, or ``timeout`` passes (then it is
        stopped), a RuntimeError with the log's tail."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"{self.what} exited at start:\n{self.log_tail()}")
            if ready():
                return
            time.sleep(interval)
        self.stop()
        raise RuntimeError(f"{self.what} {not_ready} after {timeout} s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it and reap it (terminate() waits on our child by pid)."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)  # a paused server cannot act on SIGTERM
        terminate(proc.pid, sig, timeout=self.stop_timeout)
        with contextlib.suppress(ChildProcessError, OSError, subprocess.TimeoutExpired):
            proc.wait(timeout=1)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class _Startable(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


S = TypeVar("S", bound=_Startable)


@contextlib.contextmanager
def started_in_tempdir(
    make: Callable[[Path], S], prefix: str, root: str | None = None
) -> Iterator[S]:
    """``make(a fresh temporary dir)`` started; stopped and its dir removed at the end."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    server = make(base)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
