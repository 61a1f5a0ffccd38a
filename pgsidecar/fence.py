"""pgsidecar's fence process: SIGQUIT the postmaster when the lease deadline passes.

The agent starts this file as its child, in its own session, with ``python -I -S fence.py``; it
imports nothing from pgsidecar and nothing outside the standard library. It exists because the
agent's fencing thread is frozen with the agent (SIGSTOP, a debugger, a long pause); this process
is not, and it needs nothing from the agent to act: the deadline is on CLOCK_MONOTONIC, which is
the same clock in every process of the machine.

Protocol: one ASCII line per message on stdin (agent -> fence) and stdout (fence -> agent).

    arm <n> <deadline> <pid|->   fence at <deadline> (monotonic seconds) unless re-armed;
                                 <pid> is the postmaster, '-' if none is running
    disarm <n>                   forget the deadline
    ping <n>                     liveness check
    exit <n>                     disarm and exit
    -> ok <n>                    the answer to each of the above, in order
    -> bad <n|-> <reason>        an unparsable line

Unsolicited lines:

    -> hello <pid> <mlocked 0|1>              at start
    -> fired <pid|-> <late> <n> <result>      the deadline of arm <n> passed: <late> seconds after
                                              it the postmaster got SIGQUIT (<result> 'sigquit'),
                                              or there was nothing to signal ('nopid', 'gone')
    -> device on <timeout> | device off | device failed <reason>

Fencing: SIGQUIT (immediate shutdown), then SIGKILL to the postmaster and its children if it
still exists 1 s later, or at once if it is stopped (a stopped postmaster does not act on SIGQUIT;
running backends exit once it is dead, stopped ones must never run again). A pid is only
signalled while its start time (/proc/<pid>/stat field 22) is the one it had when it was armed,
so a recycled pid is never hit. End of stdin (the agent died) while armed fences at once.
stdout is non-blocking: an answer that does not fit in the pipe (the agent is frozen and not
reading) is dropped, never waited for.

Watchdog device (``--device``): opened at the first arm, its timeout set to about half the time
left, kept alive only while ``now <= deadline + safety_margin - timeout``, so if this process
stops (a freeze of the whole node) the node is reset at the latest ``safety_margin`` seconds after
the deadline. After fencing it is kept alive while the postmaster is being killed, then closed
with the magic 'V' (a disarm does the same). A postmaster that survives SIGKILL leaves the device
running: the node resets.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import select
import signal
import struct
import sys
import time

KILL_AFTER = 1.0  # SIGKILL if the postmaster still exists this long after SIGQUIT
GIVE_UP_AFTER = 1.0  # stop following it this long after SIGKILL

# linux/watchdog.h
WDIOC_SETTIMEOUT = 0xC0045706  # _IOWR('W', 6, int)
WDIOC_GETTIMEOUT = 0x80045707  # _IOR('W', 7, int)


def log(msg: str) -> None:
    try:
        print(f"{time.time():.3f} fence[{os.getpid()}] {msg}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) from /proc/<pid>/stat: fields 3, 4 and 22 (the start
    time in clock ticks after boot); None if the process is gone or a zombie (nothing left to
    fence)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        state = fields[0].decode()
        return None if state in ("Z", "X") else (state, int(fields[1]), int(fields[19]))
    except (OSError, IndexError, ValueError):
        return None


def start_time(pid: int) -> int | None:
    st = proc_stat(pid)
    return st[2] if st else None


def children(pid: int) -> list[tuple[int, int]]:
    """The live children of ``pid`` (the postmaster's backends), with their start times."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st and st[1] == pid:
                out.append((int(name), st[2]))
    return out


def signal_if_same(pid: int, start: int | None, sig: int) -> bool:
    """Send ``sig`` to ``pid`` only if it is still the process that had ``start``."""
    if start is None or start_time(pid) != start:
        return False
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def wd_ioctl(fd: int, request: int, value: int = 0) -> int:
    """The only ioctl call (tests replace it: a FIFO or a plain file has no watchdog ioctls)."""
    out = fcntl.ioctl(fd, request, struct.pack("i", value))
    return int(struct.unpack("i", out)[0])


class Device:
    """/dev/watchdog: open = started, any write = keep-alive, 'V' then close = stopped."""

    def __init__(self, path: str, margin: float) -> None:
        self.path = path
        self.margin = margin
        self.fd: int | None = None
        self.timeout = 0
        self.next_keepalive = 0.0

    def open(self, seconds_left: float) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        want = max(1, min(60, int(seconds_left // 2)))
        try:
            try:
                got = wd_ioctl(fd, WDIOC_SETTIMEOUT, want)
            except OSError:
                got = wd_ioctl(fd, WDIOC_GETTIMEOUT)  # a device with a fixed timeout
            if got <= 0 or got > seconds_left:
                # a longer timeout (a device's minimum) would reset the node between renewals
                raise OSError(errno.EINVAL, f"device timeout {got}s, {seconds_left:.1f}s left")
        except OSError:
            self._magic_close(fd)
            raise
        self.fd, self.timeout, self.next_keepalive = fd, got, 0.0
        return got

    def keepalive(self, now: float) -> None:
        if self.fd is not None and now >= self.next_keepalive:
            os.write(self.fd, b"\0")
            self.next_keepalive = now + max(0.05, min(0.5, self.timeout / 4))

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            self._magic_close(fd)

    @staticmethod
    def _magic_close(fd: int) -> None:
        try:
            os.write(fd, b"V")
        except OSError:
            pass
        os.close(fd)


class Fence:
    def __init__(self, out_fd: int, device: Device | None) -> None:
        self.out_fd = out_fd
        os.set_blocking(out_fd, False)
        self.dropped = 0
        self.device = device
        self.deadline: float | None = None
        self.arm_n = "-"
        self.pid: int | None = None
        self.start: int | None = None
        # the postmaster being fenced: pid, start time, SIGKILL at, give up at (None: not yet)
        self.victim: tuple[int, int | None, float, float | None] | None = None
        self.device_error = ""
        self.stuck = False  # it survived SIGKILL: the device (if any) is left to reset the node

    def say(self, line: str) -> None:
        try:
            os.write(self.out_fd, (line + "\n").encode())
        except BlockingIOError:
            self.dropped += 1  # the agent is not reading: never wait for it
        except OSError:
            pass  # the agent is gone: stdin's end of file comes next

    def handle(self, words: list[str]) -> bool:
        """One command; False when it was ``exit``."""
        n = words[1] if len(words) > 1 else "-"
        try:
            cmd = words[0]
            if cmd == "arm":
                deadline = float(words[2])
                if deadline != deadline or deadline in (float("inf"), float("-inf")):
                    raise ValueError(f"deadline {words[2]!r}")
                self.arm(deadline, None if words[3] == "-" else int(words[3]), n)
            elif cmd == "disarm":
                self.deadline = None
            elif cmd == "exit":
                self.deadline = None
                self.say(f"ok {n}")
                return False
            elif cmd != "ping":
                raise ValueError(f"unknown command {cmd!r}")
        except (ValueError, IndexError) as exc:
            self.say(f"bad {n} {str(exc).replace(chr(10), ' ')}")
            return True
        self.say(f"ok {n}")
        return True

    def arm(self, deadline: float, pid: int | None, n: str) -> None:
        self.deadline, self.arm_n, self.stuck = deadline, n, False
        self.pid = pid
        # the start time now: the agent sends the pid of the postmaster it runs at this moment
        self.start = start_time(pid) if pid else None
        if self.device is not None and self.device.fd is None:
            left = deadline + self.device.margin - time.monotonic()
            try:
                got = self.device.open(left)
                self.say(f"device on {got}")
                log(f"watchdog device {self.device.path} on, timeout {got}s")
                self.device_error = ""
            except OSError as exc:
                reason = (exc.strerror or str(exc)).replace(" ", "_")
                self.say(f"device failed {reason}")  # each arm retries it
                if reason != self.device_error:
                    log(f"watchdog device {self.device.path} failed: {exc}")
                self.device_error = reason

    def fire(self, now: float) -> None:
        assert self.deadline is not None
        late, self.deadline = now - self.deadline, None
        pid, start = self.pid, self.start
        if pid is None:
            result = "nopid"
        elif signal_if_same(pid, start, signal.SIGQUIT):
            result = "sigquit"
            self.victim = (pid, start, now + KILL_AFTER, None)
        else:
            result = "gone"
        self.say(f"fired {pid or '-'} {late:.4f} {self.arm_n} {result}")
        log(f"deadline of arm {self.arm_n} passed {late:.4f}s ago: postmaster {pid}: {result}")
        if self.victim is not None:
            self.follow_victim(now)

    def kill(self, pid: int, start: int, why: str) -> None:
        """SIGKILL the postmaster and the children it has (a stopped postmaster cannot pass
        SIGQUIT on to its backends; stopped backends must never run again)."""
        kids = children(pid)
        # the backends first: once the postmaster is seen gone, every backend is already on its
        # way out (and a stopped postmaster cannot fork new ones meanwhile)
        for kid, kid_start in kids:
            signal_if_same(kid, kid_start, signal.SIGKILL)
        signal_if_same(pid, start, signal.SIGKILL)
        log(f"postmaster {pid} {why}: SIGKILL to it and its {len(kids)} children")

    def follow_victim(self, now: float) -> None:
        assert self.victim is not None
        pid, start, kill_at, give_up_at = self.victim
        st = proc_stat(pid)
        if start is None or st is None or st[2] != start:
            log(f"postmaster {pid} is gone")
            self.victim = None
        elif give_up_at is None and (now >= kill_at or st[0] in ("T", "t")):
            why = (
                "is stopped" if st[0] in ("T", "t") else f"still there {KILL_AFTER}s after SIGQUIT"
            )
            self.kill(pid, start, why)
            self.victim = (pid, start, kill_at, now + GIVE_UP_AFTER)
        elif give_up_at is not None and now >= give_up_at:
            log(f"postmaster {pid} survives SIGKILL")
            self.victim, self.stuck = None, True

    def tend_device(self, now: float) -> None:
        dev = self.device
        if dev is None or dev.fd is None:
            return
        try:
            if self.deadline is not None:
                if now <= self.deadline + dev.margin - dev.timeout:
                    dev.keepalive(now)
            elif self.victim is not None:
                dev.keepalive(now)  # we are alive and killing it
            elif not self.stuck:
                dev.close()
                self.say("device off")
        except OSError as exc:
            # it cannot be kept alive: closed (the next arm tries again) rather than left to
            # reset a healthy node; a required device makes the agent fence on this line
            with contextlib.suppress(OSError):
                dev.close()
            dev.fd = None
            self.say(f"device failed {(exc.strerror or str(exc)).replace(' ', '_')}")
            log(f"watchdog device keep-alive failed: {exc}")

    def tick(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline:
            self.fire(now)
        if self.victim is not None:
            self.follow_victim(now)
        self.tend_device(now)

    def wait_time(self, now: float) -> float | None:
        wake: list[float] = []
        if self.deadline is not None:
            wake.append(self.deadline)
        if self.victim is not None:
            wake.append(now + 0.02)
        dev = self.device
        if dev is not None and dev.fd is not None:
            if self.deadline is not None:
                last = self.deadline + dev.margin - dev.timeout
                if now <= last:
                    wake.append(min(dev.next_keepalive, last))
            elif self.victim is not None:
                wake.append(dev.next_keepalive)
        return max(0.0, min(wake) - now) if wake else None

    def finish(self) -> None:
        """Follow a postmaster being fenced to its end (bounded), then stop the device."""
        while self.victim is not None:
            self.tick(time.monotonic())
            time.sleep(0.02)
        self.tend_device(time.monotonic())


def lock_memory() -> bool:
    """mlockall, only where it cannot make later allocations fail (root with CAP_IPC_LOCK, or
    no RLIMIT_MEMLOCK): this process must not wait for swap when it has to fence."""
    try:
        import ctypes
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        with open("/proc/self/status") as fh:
            cap = next((int(x.split()[1], 16) for x in fh if x.startswith("CapEff:")), 0)
        if soft != resource.RLIM_INFINITY and not cap & (1 << 14):  # CAP_IPC_LOCK
            return False
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.mlockall(1 | 2) == 0)  # MCL_CURRENT | MCL_FUTURE
    except Exception:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="pgsidecar fence process (started by the agent)")
    ap.add_argument("--device", help="watchdog device, e.g. /dev/watchdog")
    ap.add_argument("--safety-margin", type=float, default=0.5)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    mlocked = lock_memory()
    fence = Fence(1, Device(args.device, args.safety_margin) if args.device else None)
    fence.say(f"hello {os.getpid()} {int(mlocked)}")
    buf = b""
    while True:
        timeout = fence.wait_time(time.monotonic())
        readable, _, _ = select.select([0], [], [], timeout)
        for _ in range(16 if readable else 0):
            # everything already sent before the deadline is checked: a pending re-arm counts
            data = os.read(0, 65536)
            if not data:
                if fence.deadline is not None:
                    log("stdin closed (the agent is gone) while armed: fencing now")
                    fence.deadline = min(fence.deadline, time.monotonic())
                    fence.tick(time.monotonic())
                fence.deadline = None
                fence.finish()
                return 0
            buf += data
            *lines, buf = buf.split(b"\n")
            buf = buf[-4096:]
            for line in lines:
                words = line.decode("ascii", "replace").split()
                if words and not fence.handle(words):
                    fence.finish()
                    return 0
            if not select.select([0], [], [], 0)[0]:
                break
        fence.tick(time.monotonic())


if __name__ == "__main__":
    sys.exit(main())
