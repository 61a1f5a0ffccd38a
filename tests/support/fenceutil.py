"""Helpers for the fence tests (tests/unit/test_fence.py, tests/e2e/test_fence_postgres.py):
processes started by pid and always reaped, the fence process driven over its pipe."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgsidecar import fence as fencemod
from pgsidecar.watchdog import FENCE_SCRIPT

REPO = Path(__file__).resolve().parents[2]
FENCE_ARGV = [sys.executable, "-I", "-S", str(FENCE_SCRIPT)]


def proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def zombie_children() -> list[int]:
    me, out = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == me:
                out.append(int(entry))
    return out


class SchedulingLag:
    """How late this machine runs a thread that asks to wake: a thread sleeps 10 ms at a time and
    keeps the worst overshoot. The fence tests' bounds are the documented detection time (ping
    interval + answer timeout) plus a fixed margin plus this, so they hold what the code promises
    (so long after the event, once the OS lets the thread run) on a loaded machine too, where a
    fixed bound would fail for a reason that is not the code's."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scheduling-lag", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            time.sleep(0.01)
            self.worst = max(self.worst, time.monotonic() - t - 0.01)

    def __enter__(self) -> SchedulingLag:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def interpreter_start_time() -> float:
    """Seconds to start and end the interpreter the fence process runs in, on this machine now
    (under load it is most of the time a new fence process takes to start)."""
    t = time.monotonic()
    subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True, timeout=30)
    return time.monotonic() - t


def _default_quit_and_int() -> None:
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def sleep_standin() -> subprocess.Popen[bytes]:
    """A postmaster stand-in (`sleep 60`) that dies of SIGQUIT as a postmaster does: a test run
    started in the background by a non-interactive shell inherits SIGQUIT and SIGINT ignored
    (bash does that to background jobs without job control), and `sleep` would then survive the
    fence's SIGQUIT and die of its SIGKILL a second later. PostgreSQL installs its own handler,
    so only the stand-in needs the default back."""
    return subprocess.Popen(["sleep", "60"], preexec_fn=_default_quit_and_int)


def wait_until(pred, within: float, step: float = 0.01) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


class Procs:
    """Processes a test started: killed (SIGCONT first, for stopped ones) and reaped by pid."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen[bytes]] = []
        self.others: list[tuple[int, int | None]] = []  # not our children: pid, start time

    def track(self, pid: int) -> None:
        self.others.append((pid, fencemod.start_time(pid)))

    def sleep(self) -> subprocess.Popen[bytes]:
        p = sleep_standin()
        self.popens.append(p)
        return p

    def add(self, p: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.popens.append(p)
        return p

    def close(self) -> None:
        for pid, start in self.others:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                fencemod.signal_if_same(pid, start, sig)  # never a recycled pid
        for p in self.popens:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
                p.kill()
            p.wait(timeout=10)
        for pid, start in self.others:
            wait_until(lambda pid=pid, start=start: fencemod.start_time(pid) != start, 5)


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.close()


class FenceProc:
    """fence.py driven over its pipes by the test itself (the agent side of the protocol)."""

    def __init__(self, procs: Procs, argv: list[str] | None = None) -> None:
        self.p = procs.add(
            subprocess.Popen(
                argv or FENCE_ARGV,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                bufsize=0,
            )
        )
        self.lines: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        self.n = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.expect("hello")

    def _read(self) -> None:
        assert self.p.stdout is not None
        for raw in self.p.stdout:
            with self.cond:
                self.lines.append((time.monotonic(), raw.decode().strip()))
                self.cond.notify_all()

    def send(self, cmd: str, *args: object) -> int:
        assert self.p.stdin is not None
        self.n += 1
        self.p.stdin.write(" ".join([cmd, str(self.n), *map(str, args)]).encode() + b"\n")
        return self.n

    def expect(self, prefix: str, within: float = 5.0) -> tuple[float, list[str]]:
        end = time.monotonic() + within
        with self.cond:
            while True:
                for t, line in self.lines:
                    if line.startswith(prefix):
                        return t, line.split()
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {prefix!r} from fence.py; got {self.lines}")
                self.cond.wait(left)

    def arm(self, deadline: float, pid: int | None) -> None:
        n = self.send("arm", f"{deadline:.6f}", pid or "-")
        self.expect(f"ok {n}")

    def stderr(self) -> str:
        assert self.p.stderr is not None
        if self.p.poll() is None:
            return ""
        return self.p.stderr.read().decode(errors="replace")


def child_pid_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except OSError:
                continue
    return out


CHILD_AGENT = r"""
import os, signal, sys, time
from pathlib import Path
import structlog
from pgsidecar.watchdog import Watchdog

structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout: for us

pm, lead, state = int(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
# the agent's own fence (SIGQUIT through its pidfd of the postmaster) is left out: what is under
# test is the fence process, and this process is frozen when it matters
wd = Watchdog(
    fence=lambda: True,
    on_fired=lambda: print("on_fired", flush=True),
    postmaster_pid=lambda: pm,
    state_dir=state,
)
# the deadline is taken once the Watchdog and its fence process are up: a loaded machine may
# take seconds to start this interpreter, and a deadline fixed before would pass meanwhile
deadline = time.monotonic() + lead
wd.arm(deadline)
while not wd.fence_in_sync():
    time.sleep(0.01)
print("armed", wd.fence_pid, repr(deadline), flush=True)
while True:
    time.sleep(1)
"""


def start_child_agent(
    procs: Procs, root: Path, pm: int, lead: float
) -> tuple[subprocess.Popen[bytes], int, float]:
    """A child process owning a Watchdog armed ``lead`` seconds after it is up; returns it, its
    fence process's pid and the deadline it armed."""
    script = root / "child_agent.py"
    script.write_text(CHILD_AGENT)
    state = root / "state"
    state.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = procs.add(
        subprocess.Popen(
            [sys.executable, str(script), str(pm), repr(lead), str(state)],
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,  # its own process group: we stop the whole group
        )
    )
    assert child.stdout is not None
    line = child.stdout.readline().decode().split()
    assert line and line[0] == "armed", line
    fence_pid = int(line[1])
    procs.track(fence_pid)
    assert (state / "fence.pid").read_text().strip() == str(fence_pid)
    return child, fence_pid, float(line[2])
