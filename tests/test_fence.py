"""The fence process (pgsidecar/fence.py) and the Watchdog client that drives it (issue 11).

Real processes throughout: ``sleep 60`` as a stand-in postmaster where a target is enough, real
PostgreSQL 15 where what matters is that writes stop. Every test picks its own /tmp directory and
ports, and kills and reaps every process it started, by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from pgsidecar import fence as fencemod
from pgsidecar.config import AgentConfig, FencingSettings
from pgsidecar.postgres.control import PostgresControl
from pgsidecar.procutil import pid_alive
from pgsidecar.watchdog import FENCE_SCRIPT, Watchdog
from tests.pgtestutil import Lab, make_root

REPO = Path(__file__).resolve().parents[1]
FENCE_ARGV = [sys.executable, "-I", "-S", str(FENCE_SCRIPT)]


# ---------------------------------------------------------------------------------------- helpers


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
        p = subprocess.Popen(["sleep", "60"])
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


# ------------------------------------------------------------------------------ real PostgreSQL


@pytest.fixture(scope="module")
def template() -> Iterator[Path]:
    lab = Lab()

    async def build() -> Path:
        ctl = lab.control("template", from_template=False)
        await ctl.initdb()
        ctl.write_config("primary", None, None)
        await ctl.start(30)
        await ctl.stop("fast")
        return ctl.data_dir

    try:
        yield asyncio.run(build())
    finally:
        asyncio.run(lab.close())


@pytest.fixture
async def lab(template: Path) -> AsyncIterator[Lab]:
    lab = Lab(template)
    try:
        yield lab
    finally:
        await lab.close()


async def primary(lab: Lab) -> tuple[PostgresControl, psycopg.AsyncConnection]:
    ctl = lab.control("pg")
    ctl.write_config("primary", None, None)
    await ctl.start(30)
    conn = await psycopg.AsyncConnection.connect(
        ctl.superuser_conninfo().dsn(ctl.passfile, connect_timeout=3), autocommit=True
    )
    await conn.execute("CREATE TABLE t (x int)")
    await conn.execute("INSERT INTO t VALUES (1)")  # it can write
    return ctl, conn


async def cannot_write(conn: psycopg.AsyncConnection) -> bool:
    try:
        await asyncio.wait_for(conn.execute("INSERT INTO t VALUES (2)"), 5)
    except psycopg.OperationalError:
        return True
    return False


def pg_log(ctl: PostgresControl) -> str:
    return ctl.log_path.read_text(errors="replace")


def shm_id(ctl: PostgresControl) -> int:
    """The SysV segment of a running postmaster (postmaster.pid line 7: key, id)."""
    return int((ctl.data_dir / "postmaster.pid").read_text().splitlines()[6].split()[1])


def drop_shm(shmid: int) -> None:
    """A SIGKILLed postmaster leaves its (56-byte) SysV segment: remove it once unattached."""
    with open("/proc/sysvipc/shm") as fh:
        for line in fh.read().splitlines()[1:]:
            f = line.split()
            if int(f[1]) == shmid and int(f[6]) == 0:
                subprocess.run(["ipcrm", "-m", str(shmid)], check=False)


@pytest.mark.integration
async def test_a_fence_process_alone_sigquits_postgres_at_the_deadline(
    lab: Lab, procs: Procs
) -> None:
    """Armed, then nothing from the agent side (frozen): fence.py fences on its own."""
    ctl, conn = await primary(lab)
    pm = ctl.postmaster_pid
    fp = FenceProc(procs)
    deadline = time.monotonic() + 1.0
    fp.arm(deadline, pm)
    await asyncio.sleep(max(0.0, deadline - time.monotonic() - 0.15))
    assert ctl.running and pid_alive(pm), "fenced before the deadline"
    rc = await asyncio.wait_for(ctl.wait_exit(), 5)
    exited = time.monotonic()
    _, fired = fp.expect("fired")
    late = float(fired[2])
    assert fired[1] == str(pm) and fired[4] == "sigquit"
    # bound: the minimum fencing margin (0.5 s) between the deadline and the earliest expiry
    assert 0 <= late < 0.5, f"SIGQUIT {late:.3f}s after the deadline"
    assert exited - deadline < 0.5, f"postmaster gone {exited - deadline:.3f}s after"
    assert rc == 0 and "received immediate shutdown request" in pg_log(ctl)
    assert await cannot_write(conn)
    print(f"\nfence.py: SIGQUIT {late * 1000:.1f} ms late, exit seen {exited - deadline:.3f}s")
    fp.send("exit")
    assert fp.p.wait(timeout=5) == 0


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


@pytest.mark.integration
async def test_b_agent_process_group_sigstopped_the_fence_process_still_fences(
    lab: Lab, procs: Procs
) -> None:
    ctl, conn = await primary(lab)
    pm = ctl.postmaster_pid
    assert pm is not None
    child, fence_pid, deadline = await asyncio.to_thread(
        start_child_agent, procs, lab.root, pm, 3.0
    )
    assert os.getsid(fence_pid) != os.getsid(child.pid)
    os.killpg(child.pid, signal.SIGSTOP)  # the agent and its whole process group
    try:
        assert wait_until(lambda: proc_state(child.pid) == "T", 2)
        assert proc_state(fence_pid) in ("S", "R")
        await conn.execute("INSERT INTO t VALUES (3)")  # still the writable master
        rc = await asyncio.wait_for(ctl.wait_exit(), deadline - time.monotonic() + 3)
        gone = time.monotonic()
        assert proc_state(child.pid) == "T", "the agent was frozen all along"
        assert rc == 0 and "received immediate shutdown request" in pg_log(ctl)
        assert gone - deadline < 0.5, f"postmaster gone {gone - deadline:.3f}s after"
        assert await cannot_write(conn)
        fence_log = (lab.root / "state" / "fence.log").read_text()
        assert f"postmaster {pm}: sigquit" in fence_log
    finally:
        os.killpg(child.pid, signal.SIGCONT)
    # once it runs again, the client learns of the fencing from the fence process
    assert child.stdout is not None
    assert child.stdout.readline().decode().strip() == "on_fired"
    child.kill()
    child.wait(timeout=5)
    # its fence process sees the end of its stdin and exits
    assert wait_until(lambda: not pid_alive(fence_pid), 5)


async def backend_pid(conn: psycopg.AsyncConnection) -> int:
    cur = await conn.execute("SELECT pg_backend_pid()")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.integration
async def test_d_postgres_backends_exit_when_the_postmaster_is_sigkilled(lab: Lab) -> None:
    """What the SIGKILL relies on, checked against PostgreSQL 15 itself: a stopped postmaster
    leaves its backends writable; once it is SIGKILLed they exit (postmaster death)."""
    ctl, conn = await primary(lab)
    pm = ctl.postmaster_pid
    assert pm is not None
    backend = await backend_pid(conn)
    shmid = shm_id(ctl)
    os.kill(pm, signal.SIGSTOP)
    try:
        await conn.execute("INSERT INTO t VALUES (4)")  # still commits
        os.kill(pm, signal.SIGQUIT)  # pending: a stopped process does not act on it
        await asyncio.sleep(0.3)
        await conn.execute("INSERT INTO t VALUES (5)")  # and still commits
        os.kill(pm, signal.SIGKILL)
        assert await asyncio.wait_for(ctl.wait_exit(), 5) == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pm, signal.SIGCONT)
    assert wait_until(lambda: not pid_alive(backend), 3), "backend outlived the postmaster"
    assert await cannot_write(conn)
    drop_shm(shmid)


@pytest.mark.integration
async def test_d_fence_kills_a_stopped_postmaster_and_its_stopped_backends(
    lab: Lab, procs: Procs
) -> None:
    ctl, conn = await primary(lab)
    pm = ctl.postmaster_pid
    assert pm is not None
    other = await psycopg.AsyncConnection.connect(
        ctl.superuser_conninfo().dsn(ctl.passfile, connect_timeout=3), autocommit=True
    )
    running, stopped = await backend_pid(conn), await backend_pid(other)
    shmid = shm_id(ctl)
    os.kill(pm, signal.SIGSTOP)
    os.kill(stopped, signal.SIGSTOP)
    try:
        await conn.execute("INSERT INTO t VALUES (4)")  # a stopped postmaster: still writable
        fp = FenceProc(procs)
        deadline = time.monotonic() + 0.3
        fp.arm(deadline, pm)
        rc = await asyncio.wait_for(ctl.wait_exit(), 5)
        gone = time.monotonic()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pm, signal.SIGCONT)
    # a stopped postmaster is SIGKILLed at once, not after the 1 s SIGQUIT gets to act
    assert rc == -signal.SIGKILL
    assert gone - deadline < 0.5, f"postmaster gone {gone - deadline:.3f}s after the deadline"
    assert wait_until(lambda: not pid_alive(running), 3), "backend outlived the postmaster"
    # the stopped backend is still stopped (nobody sent SIGCONT): it cannot exit by itself, so
    # if it is gone, SIGKILL took it (it needs a moment of CPU to die: wait for it)
    try:
        assert wait_until(lambda: not pid_alive(stopped), 3), "a stopped backend was not killed"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGKILL)
    assert await cannot_write(conn)
    with contextlib.suppress(psycopg.Error):
        await other.close()
    drop_shm(shmid)
    fp.send("exit")
    assert fp.p.wait(timeout=5) == 0
    assert f"postmaster {pm} is stopped: SIGKILL to it and its" in fp.stderr()


IGNORES_SIGQUIT = (
    "import signal, sys, time; signal.signal(signal.SIGQUIT, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)"
)


def test_a_postmaster_that_outlives_sigquit_is_sigkilled_after_a_second(procs: Procs) -> None:
    target = procs.add(
        subprocess.Popen([sys.executable, "-c", IGNORES_SIGQUIT], stdout=subprocess.PIPE)
    )
    assert target.stdout is not None and target.stdout.readline() == b"ready\n"
    fp = FenceProc(procs)
    deadline = time.monotonic() + 0.2
    fp.arm(deadline, target.pid)
    assert target.wait(timeout=5) == -signal.SIGKILL
    took = time.monotonic() - deadline
    assert fencemod.KILL_AFTER - 0.05 < took < fencemod.KILL_AFTER + 0.4


# ------------------------------------------------------------------- fence.py with a dummy target


def test_e_end_of_stdin_while_armed_fences_at_once(procs: Procs) -> None:
    target = procs.sleep()
    fp = FenceProc(procs)
    fp.arm(time.monotonic() + 60, target.pid)
    assert fp.p.stdin is not None
    fp.p.stdin.close()  # the agent is gone
    t0 = time.monotonic()
    assert target.wait(timeout=3) == -signal.SIGQUIT
    assert time.monotonic() - t0 < 0.5
    assert fp.p.wait(timeout=5) == 0


def test_e_end_of_stdin_while_disarmed_exits_without_fencing(procs: Procs) -> None:
    target = procs.sleep()
    fp = FenceProc(procs)
    fp.arm(time.monotonic() + 60, target.pid)
    n = fp.send("disarm")
    fp.expect(f"ok {n}")
    assert fp.p.stdin is not None
    fp.p.stdin.close()
    assert fp.p.wait(timeout=5) == 0
    assert target.poll() is None


def test_e_agent_sigkilled_while_armed_its_fence_process_fences(procs: Procs) -> None:
    """The realistic end of stdin: the process that owns the Watchdog dies by SIGKILL."""
    target = procs.sleep()
    root = make_root()
    try:
        child, fence_pid, _deadline = start_child_agent(procs, root, target.pid, 60.0)
        child.kill()
        t0 = time.monotonic()
        assert target.wait(timeout=3) == -signal.SIGQUIT
        assert time.monotonic() - t0 < 0.5
        child.wait(timeout=5)
        assert wait_until(lambda: not pid_alive(fence_pid), 5)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_rearm_moves_the_deadline_and_disarm_forgets_it(procs: Procs) -> None:
    target = procs.sleep()
    fp = FenceProc(procs)
    for _ in range(4):
        fp.arm(time.monotonic() + 0.3, target.pid)
        time.sleep(0.1)
    n = fp.send("disarm")
    fp.expect(f"ok {n}")
    time.sleep(0.5)
    assert target.poll() is None and not any(" fired" in f" {x}" for _, x in fp.lines)
    n = fp.send("ping")
    fp.expect(f"ok {n}")
    n = fp.send("frobnicate")
    fp.expect(f"bad {n}")
    n = fp.send("arm", "nan", target.pid)
    fp.expect(f"bad {n}")
    time.sleep(0.2)
    assert target.poll() is None


def test_a_stopped_agent_does_not_block_the_fence_process(procs: Procs) -> None:
    """Nobody reads its stdout (a frozen agent): answers are dropped, the fencing happens."""
    target = procs.sleep()
    p = procs.add(
        subprocess.Popen(
            FENCE_ARGV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            bufsize=0,
        )
    )
    stdin = p.stdin
    assert stdin is not None
    deadline = time.monotonic() + 1.5

    def agent_side() -> None:
        # far more answers than the 64 KiB pipe holds, never read; then the arm
        with contextlib.suppress(OSError):
            for chunk in range(40):
                stdin.write(b"".join(b"ping %d\n" % (chunk * 1000 + i) for i in range(1000)))
            stdin.write(f"arm 999999 {deadline:.6f} {target.pid}\n".encode())

    # (a thread: were the fence process to block on its stdout, this would block too)
    threading.Thread(target=agent_side, daemon=True).start()
    with contextlib.suppress(subprocess.TimeoutExpired):
        target.wait(timeout=deadline - time.monotonic() + 1.0)
    assert target.returncode == -signal.SIGQUIT, "not fenced: blocked on its stdout?"
    assert time.monotonic() - deadline < 0.5  # within the minimum fencing margin


# ------------------------------------------------------------------------------ pid reuse guard


def spawn_with_pid(pid: int, procs: Procs) -> subprocess.Popen[bytes] | None:
    """A new process that gets ``pid`` (through /proc/sys/kernel/ns_last_pid, as root)."""
    for _ in range(50):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as fh:
                fh.write(str(pid - 1))
        except OSError:
            return None
        p = subprocess.Popen(["sleep", "60"])
        if p.pid == pid:
            return procs.add(p)
        p.kill()
        p.wait()
    return None


def test_f_a_recycled_pid_is_never_signalled(procs: Procs) -> None:
    if not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK):
        pytest.skip("needs root: /proc/sys/kernel/ns_last_pid makes a pid be reused on purpose")
    old = procs.sleep()
    pid = old.pid
    fp = FenceProc(procs)
    deadline = time.monotonic() + 1.0
    fp.arm(deadline, pid)
    old.kill()
    old.wait()  # the postmaster died and was reaped...
    time.sleep(0.05)  # (start times count in clock ticks of 10 ms)
    new = spawn_with_pid(pid, procs)  # ...and its pid now belongs to someone else
    if new is None:
        pytest.skip(f"could not get pid {pid} again (a busy machine)")
    _, fired = fp.expect("fired", within=3)
    assert fired[1] == str(pid) and fired[4] == "gone"
    time.sleep(0.1)
    assert new.poll() is None, "the recycled pid was signalled"
    # the same pid armed now (the agent's new postmaster) is fenced
    fp.arm(time.monotonic() + 0.1, pid)
    assert new.wait(timeout=3) == -signal.SIGQUIT


def test_f_signal_if_same_checks_the_start_time(procs: Procs) -> None:
    p = procs.sleep()
    start = fencemod.start_time(p.pid)
    assert start is not None
    assert not fencemod.signal_if_same(p.pid, start + 1, signal.SIGTERM)
    assert not fencemod.signal_if_same(p.pid, None, signal.SIGTERM)
    assert p.poll() is None
    assert fencemod.signal_if_same(p.pid, start, signal.SIGTERM)
    assert p.wait(timeout=3) == -signal.SIGTERM
    assert fencemod.start_time(p.pid) is None


# ---------------------------------------------------------------------- the Watchdog client


class Fired:
    def __init__(self) -> None:
        self.times: list[float] = []
        self.event = threading.Event()

    def __call__(self) -> None:
        self.times.append(time.monotonic())
        self.event.set()


@pytest.fixture
def state_dir() -> Iterator[Path]:
    root = make_root()
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_c_fence_process_stopped_alone_the_client_fences_and_restarts_it(
    procs: Procs, state_dir: Path
) -> None:
    target = procs.sleep()
    fired = Fired()
    wd = Watchdog(
        fence=lambda: os.kill(target.pid, signal.SIGQUIT) or True,
        on_fired=fired,
        postmaster_pid=lambda: target.pid,
        state_dir=state_dir,
    )
    try:
        wd.arm(time.monotonic() + 60)
        assert wait_until(wd.fence_in_sync, 3)
        old = int((state_dir / "fence.pid").read_text())
        procs.track(old)
        os.kill(old, signal.SIGSTOP)
        t0 = time.monotonic()
        assert fired.event.wait(4)
        took = fired.times[0] - t0
        assert took < 1.5 + 0.25, f"client fenced {took:.2f}s after the fence process stopped"
        assert target.wait(timeout=3) == -signal.SIGQUIT
        assert not wd.armed_and_valid() and wd.fired_count == 1
        # the stopped one was killed and reaped; a new one runs and answers
        assert wait_until(lambda: not os.path.exists(f"/proc/{old}"), 3)
        assert wait_until(lambda: wd.fence_pid not in (None, old) and wd.fence_in_sync(), 3)
        new = int((state_dir / "fence.pid").read_text())
        assert new == wd.fence_pid and pid_alive(new)
        print(f"\nclient fenced {took:.3f}s after SIGSTOP of the fence process")
    finally:
        wd.stop()
    assert len(fired.times) == 1


def test_c_fence_process_and_postmaster_both_stopped_the_new_fence_process_kills_it(
    procs: Procs, state_dir: Path
) -> None:
    """The client's own fencing is a SIGQUIT, which a stopped postmaster ignores: the fence
    process started in place of the stopped one fences at once and SIGKILLs it."""
    target = procs.sleep()
    fired = Fired()
    wd = Watchdog(
        fence=lambda: os.kill(target.pid, signal.SIGQUIT) or True,
        on_fired=fired,
        postmaster_pid=lambda: target.pid,
        state_dir=state_dir,
    )
    try:
        wd.arm(time.monotonic() + 60)
        assert wait_until(wd.fence_in_sync, 3)
        old = wd.fence_pid
        assert old is not None
        procs.track(old)
        os.kill(target.pid, signal.SIGSTOP)
        os.kill(old, signal.SIGSTOP)
        t0 = time.monotonic()
        assert target.wait(timeout=4) == -signal.SIGKILL
        assert time.monotonic() - t0 < 1.5 + 0.5
        assert fired.event.wait(1)
        time.sleep(0.3)
        assert len(fired.times) == 1 and wd.fired_count == 1  # one on_fired for the two
        assert "is stopped: SIGKILL" in (state_dir / "fence.log").read_text()
    finally:
        wd.stop()


def test_fence_process_killed_while_armed_the_client_fences_and_restarts_it(
    procs: Procs, state_dir: Path
) -> None:
    target = procs.sleep()
    fired = Fired()
    wd = Watchdog(
        fence=lambda: os.kill(target.pid, signal.SIGQUIT) or True,
        on_fired=fired,
        postmaster_pid=lambda: target.pid,
        state_dir=state_dir,
    )
    try:
        wd.arm(time.monotonic() + 60)
        assert wait_until(wd.fence_in_sync, 3)
        old = wd.fence_pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        assert fired.event.wait(2)
        assert target.wait(timeout=3) == -signal.SIGQUIT
        assert wait_until(lambda: wd.fence_pid not in (None, old) and wd.fence_in_sync(), 3)
        assert not os.path.exists(f"/proc/{old}")  # reaped
        # killed while disarmed: restarted quietly, nothing fenced
        old = wd.fence_pid
        os.kill(old, signal.SIGKILL)
        assert wait_until(lambda: wd.fence_pid not in (None, old), 3)
        assert len(fired.times) == 1
    finally:
        wd.stop()


def test_both_sides_fire_on_fired_once(procs: Procs, state_dir: Path) -> None:
    """The thread and the fence process both see the deadline pass: one on_fired, one count;
    the fence process's own SIGQUIT is what stopped the target (the thread's fence is a no-op)."""
    target = procs.sleep()
    fired = Fired()
    fences: list[float] = []
    wd = Watchdog(
        fence=lambda: fences.append(time.monotonic()) or True,
        on_fired=fired,
        postmaster_pid=lambda: target.pid,
        state_dir=state_dir,
    )
    try:
        deadline = time.monotonic() + 0.4
        wd.arm(deadline)
        assert target.wait(timeout=3) == -signal.SIGQUIT
        assert fired.event.wait(2)
        time.sleep(0.5)
        assert len(fired.times) == 1 and wd.fired_count == 1 and len(fences) == 1
        assert fired.times[0] - deadline < 0.5  # within the minimum fencing margin
        assert not wd.armed_and_valid()
    finally:
        wd.stop()


def test_postmaster_restarted_while_armed_the_new_pid_is_fenced(
    procs: Procs, state_dir: Path
) -> None:
    first, second = procs.sleep(), procs.sleep()
    current = [first.pid]
    fired = Fired()
    wd = Watchdog(
        fence=lambda: True,  # only the fence process signals here
        on_fired=fired,
        postmaster_pid=lambda: current[0],
        state_dir=state_dir,
    )
    try:
        deadline = time.monotonic() + 1.5
        wd.arm(deadline)
        time.sleep(0.1)
        current[0] = second.pid  # PostgreSQL restarted; no renewal (no arm) before the deadline
        assert second.wait(timeout=4) == -signal.SIGQUIT
        assert first.poll() is None
        assert fired.event.wait(2)
        # with the hook, at once (pings 10 s apart here)
        third = procs.sleep()
    finally:
        wd.stop()
    current[0] = first.pid
    wd = Watchdog(
        fence=lambda: True,
        on_fired=lambda: None,
        postmaster_pid=lambda: current[0],
        state_dir=state_dir,
        ping_interval=10,
    )
    try:
        wd.arm(time.monotonic() + 0.5)
        assert wait_until(wd.fence_in_sync, 3)
        current[0] = third.pid
        wd.postmaster_started()
        assert third.wait(timeout=3) == -signal.SIGQUIT
        assert first.poll() is None
    finally:
        wd.stop()


def test_g_stop_leaves_no_child(procs: Procs, state_dir: Path) -> None:
    target = procs.sleep()
    wd = Watchdog(
        fence=lambda: True, on_fired=lambda: None, postmaster_pid=lambda: target.pid,
        state_dir=state_dir,
    )  # fmt: skip
    wd.arm(time.monotonic() + 60)
    assert wait_until(wd.fence_in_sync, 3)
    pid = wd.fence_pid
    assert pid is not None and pid in child_pid_of(os.getpid())
    t0 = time.monotonic()
    wd.stop()
    assert time.monotonic() - t0 < 2
    assert not os.path.exists(f"/proc/{pid}") and zombie_children() == []
    assert not (state_dir / "fence.pid").exists()
    assert target.poll() is None  # exit disarms: nothing fenced
    assert not any(t.name == "pgsidecar-watchdog" for t in threading.enumerate())


def test_g_stop_with_the_fence_process_stopped_is_bounded(procs: Procs, state_dir: Path) -> None:
    target = procs.sleep()
    wd = Watchdog(
        fence=lambda: True, on_fired=lambda: None, postmaster_pid=lambda: target.pid,
        state_dir=state_dir,
    )  # fmt: skip
    assert wait_until(lambda: wd.fence_pid is not None, 3)
    pid = wd.fence_pid
    assert pid is not None
    procs.track(pid)
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    wd.stop()
    assert time.monotonic() - t0 < 4
    assert not os.path.exists(f"/proc/{pid}") and zombie_children() == []


# ------------------------------------------------------------------------ the watchdog device


def test_device_write_sequence_on_a_fifo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Open, timeout ioctl, keep-alive writes, then 'V' and close (the magic close)."""
    root = make_root()
    fifo = root / "wd"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    calls: list[tuple[int, int]] = []

    def fake_ioctl(fd: int, request: int, value: int = 0) -> int:
        calls.append((request, value))
        return value

    monkeypatch.setattr(fencemod, "wd_ioctl", fake_ioctl)
    try:
        dev = fencemod.Device(str(fifo), 0.5)
        assert dev.open(9.0) == 4  # about half the time left
        assert calls == [(fencemod.WDIOC_SETTIMEOUT, 4)]
        dev.keepalive(time.monotonic())
        dev.keepalive(time.monotonic())  # not due yet: no write
        dev.close()
        assert os.read(rfd, 100) == b"\0V"
        assert os.read(rfd, 100) == b""  # closed
    finally:
        os.close(rfd)

        shutil.rmtree(root, ignore_errors=True)


FAKE_IOCTL_RUNNER = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("fence", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
m.wd_ioctl = lambda fd, request, value=0: value
sys.exit(m.main(sys.argv[2:]))
"""


def test_device_kept_alive_only_until_deadline_plus_margin_minus_timeout(procs: Procs) -> None:
    """fence.py with a FIFO for a device (ioctls stubbed): the keep-alives stop so that a
    device with timeout T would fire at deadline + safety_margin at the latest; after the
    fencing the device is closed with 'V'."""
    root = make_root()
    fifo = root / "wd"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    got: list[tuple[float, bytes]] = []

    def read() -> None:
        while True:
            select.select([rfd], [], [], 10)
            data = os.read(rfd, 100)
            got.append((time.monotonic(), data))
            if not data:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        target = procs.sleep()
        runner = root / "runner.py"
        runner.write_text(FAKE_IOCTL_RUNNER)
        margin = 0.25
        fp = FenceProc(
            procs,
            [sys.executable, str(runner), str(FENCE_SCRIPT), "--device", str(fifo),
             "--safety-margin", str(margin)],
        )  # fmt: skip
        deadline = time.monotonic() + 2.5
        fp.arm(deadline, target.pid)
        _, on = fp.expect("device on")
        timeout = int(on[2])
        assert timeout == 1  # half of the 2.75 s left
        assert target.wait(timeout=5) == -signal.SIGQUIT
        fp.expect("device off")
        reader.join(5)
        # (after the SIGQUIT it is kept alive while the postmaster is followed to its end)
        keepalives = [t for t, d in got if b"\0" in d and t < deadline]
        magic = [t for t, d in got if b"V" in d]
        last_allowed = deadline + margin - timeout
        assert len(keepalives) >= 4
        assert last_allowed - 0.3 < max(keepalives) <= last_allowed + 0.05
        assert len(magic) == 1 and magic[0] >= deadline
        assert got[-1][1] == b""  # closed after the 'V'
        assert b"".join(d for _, d in got).endswith(b"V")
    finally:
        os.close(rfd)

        shutil.rmtree(root, ignore_errors=True)


def test_device_that_is_not_a_watchdog_automatic_goes_on_required_fences(
    procs: Procs, state_dir: Path
) -> None:
    """A plain file has no watchdog ioctls: the real ioctl fails, the file gets the magic 'V'
    (the close sequence is written even then); automatic: armed without it; required: fenced."""
    target = procs.sleep()
    fake = state_dir / "not-a-watchdog"
    fake.write_bytes(b"")
    fired = Fired()
    wd = Watchdog(
        fence=lambda: True, on_fired=fired, postmaster_pid=lambda: target.pid,
        state_dir=state_dir, device=fake,
    )  # fmt: skip
    try:
        wd.arm(time.monotonic() + 60)
        assert wait_until(lambda: wd.device_state == "failed", 3)
        assert wd.armed_and_valid() and not fired.event.is_set()
        assert fake.read_bytes() == b"V"
    finally:
        wd.stop()
    wd = Watchdog(
        fence=lambda: os.kill(target.pid, signal.SIGQUIT) or True, on_fired=fired,
        postmaster_pid=lambda: target.pid, state_dir=state_dir, device=fake,
        device_required=True,
    )  # fmt: skip
    try:
        assert wd.can_lead()  # a writable file: not known to fail before it is tried
        wd.arm(time.monotonic() + 60)
        assert not wd.armed_and_valid()  # not before the device is on
        assert fired.event.wait(3)
        assert target.wait(timeout=3) == -signal.SIGQUIT
        assert not wd.armed_and_valid() and wd.device_state == "failed"
        assert not wd.can_lead()
    finally:
        wd.stop()
    missing = Watchdog(
        fence=lambda: True, on_fired=fired, device=state_dir / "missing", device_required=True
    )
    try:
        assert not missing.can_lead()
    finally:
        missing.stop()


def _nowayout() -> bool:
    for p in Path("/sys/class/watchdog").glob("watchdog*/nowayout"):
        with contextlib.suppress(OSError, ValueError):
            if int(p.read_text()):
                return True
    return False


@pytest.mark.skipif(
    not os.path.exists("/dev/watchdog"),
    reason="no /dev/watchdog: this kernel has no watchdog driver (CONFIG_SOFT_WATCHDOG is not "
    "set and modules are off, so modprobe softdog cannot help); the FIFO tests cover the "
    "write/close sequence",
)
def test_real_watchdog_device_on_and_magic_close(procs: Procs) -> None:
    if _nowayout():
        pytest.skip("the watchdog has nowayout set: a test cannot stop it again")
    target = procs.sleep()
    fp = FenceProc(procs, [*FENCE_ARGV, "--device", "/dev/watchdog"])
    fp.arm(time.monotonic() + 20, target.pid)
    _, line = fp.expect("device")
    if line[1] == "failed":
        pytest.skip(f"/dev/watchdog cannot be opened here: {line}")  # held by systemd, say
    assert line[1] == "on" and int(line[2]) >= 1
    n = fp.send("disarm")
    fp.expect(f"ok {n}")
    fp.expect("device off")
    fp.send("exit")
    assert fp.p.wait(timeout=5) == 0
    assert target.poll() is None


# ------------------------------------------------------------------------------------ config


def test_fencing_config() -> None:
    base = {"name": "a", "cluster": "c", "state_dir": "/tmp/x", "postgresql": {"data_dir": "/d"}}
    cfg = AgentConfig.model_validate(base)
    assert cfg.fencing == FencingSettings()
    assert cfg.fencing.mode == "off" and cfg.fencing.device == Path("/dev/watchdog")
    cfg = AgentConfig.model_validate(
        {**base, "fencing": {"mode": "required", "device": "/dev/watchdog1", "safety_margin": 0}}
    )
    assert cfg.fencing.mode == "required" and cfg.fencing.safety_margin == 0
    for bad in ({"mode": "on"}, {"safety_margin": 0.6}, {"devise": "/dev/x"}):
        with pytest.raises(ValueError):
            AgentConfig.model_validate({**base, "fencing": bad})
