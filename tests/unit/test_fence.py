"""The fence process (pgsidecar/fence.py) and the Watchdog client that drives it.

Real processes throughout: ``sleep 60`` as a stand-in postmaster where a target is enough, real
PostgreSQL 15 where what matters is that writes stop. Every test picks its own /tmp directory and
ports, and kills and reaps every process it started, by pid.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgsidecar import fence as fencemod
from pgsidecar.config import AgentConfig, FencingSettings
from pgsidecar.procutil import pid_alive
from pgsidecar.watchdog import FENCE_SCRIPT, Watchdog
from tests.support.fenceutil import (
    FENCE_ARGV,
    FenceProc,
    Procs,
    SchedulingLag,
    child_pid_of,
    interpreter_start_time,
    sleep_standin,
    start_child_agent,
    wait_until,
    zombie_children,
)
from tests.support.pgtestutil import make_root

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
        p = sleep_standin()
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


@contextlib.contextmanager
def armed_watchdog(
    target: subprocess.Popen[bytes], fired: Fired, state_dir: Path
) -> Iterator[Watchdog]:
    """A Watchdog whose own fencing SIGQUITs ``target`` (the postmaster's stand-in), armed for
    a minute, its fence process answering; stopped at the end."""
    wd = Watchdog(
        fence=lambda: os.kill(target.pid, signal.SIGQUIT) or True,
        on_fired=fired,
        postmaster_pid=lambda: target.pid,
        state_dir=state_dir,
    )
    try:
        wd.arm(time.monotonic() + 60)
        assert wait_until(wd.fence_in_sync, 3)
        yield wd
    finally:
        wd.stop()


def test_c_fence_process_stopped_alone_the_client_fences_and_restarts_it(
    procs: Procs, state_dir: Path
) -> None:
    target = procs.sleep()
    fired = Fired()
    with armed_watchdog(target, fired, state_dir) as wd:
        old = int((state_dir / "fence.pid").read_text())
        procs.track(old)
        with SchedulingLag() as lag:
            os.kill(old, signal.SIGSTOP)
            t0 = time.monotonic()
            assert fired.event.wait(4)
        took = fired.times[0] - t0
        # ping interval 0.5 + answer timeout 1.0, once the OS runs the watchdog thread
        bound = 1.5 + 0.25 + lag.worst
        assert took < bound, (
            f"client fenced {took:.2f}s after the fence process stopped (> {bound:.2f})"
        )
        assert target.wait(timeout=3) == -signal.SIGQUIT
        assert not wd.armed_and_valid() and wd.fired_count == 1
        # the stopped one was killed and reaped; a new one runs and answers
        assert wait_until(lambda: not os.path.exists(f"/proc/{old}"), 3)
        assert wait_until(lambda: wd.fence_pid not in (None, old) and wd.fence_in_sync(), 3)
        new = int((state_dir / "fence.pid").read_text())
        assert new == wd.fence_pid and pid_alive(new)
        print(f"\nclient fenced {took:.3f}s after SIGSTOP of the fence process")
    assert len(fired.times) == 1


def test_c_fence_process_and_postmaster_both_stopped_the_new_fence_process_kills_it(
    procs: Procs, state_dir: Path
) -> None:
    """The client's own fencing is a SIGQUIT, which a stopped postmaster ignores: the fence
    process started in place of the stopped one fences at once and SIGKILLs it."""
    target = procs.sleep()
    fired = Fired()
    with armed_watchdog(target, fired, state_dir) as wd:
        old = wd.fence_pid
        assert old is not None
        procs.track(old)
        with SchedulingLag() as lag:
            os.kill(target.pid, signal.SIGSTOP)
            os.kill(old, signal.SIGSTOP)
            t0 = time.monotonic()
            assert target.wait(timeout=6) == -signal.SIGKILL
        took = time.monotonic() - t0
        # detection (1.5), then a new fence process started (an interpreter), once the OS runs them
        bound = 1.5 + 0.25 + 2 * interpreter_start_time() + 2 * lag.worst
        assert took < bound, f"stopped postmaster killed {took:.2f}s after (> {bound:.2f})"
        assert fired.event.wait(1)
        time.sleep(0.3)
        assert len(fired.times) == 1 and wd.fired_count == 1  # one on_fired for the two
        assert "is stopped: SIGKILL" in (state_dir / "fence.log").read_text()


def test_fence_process_killed_while_armed_the_client_fences_and_restarts_it(
    procs: Procs, state_dir: Path
) -> None:
    target = procs.sleep()
    fired = Fired()
    with armed_watchdog(target, fired, state_dir) as wd:
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
