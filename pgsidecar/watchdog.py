"""The fencing watchdog: a thread of the agent plus a fence *process* (``pgsidecar/fence.py``).

The master arms it with a deadline on its own monotonic clock each time a lease renewal succeeds:

    deadline = t_sent + ttl * (1 - clock_drift) - fence_margin

where ``t_sent`` is when the successful renewal request was *sent* (the DCS extended the lease at
some moment after that, so the lease is valid at least until t_sent + ttl on the DCS's clock).
``clock_drift`` bounds how much slower our clock may run than the DCS's, and ``fence_margin``
covers the time an immediate shutdown of PostgreSQL takes. If the deadline passes without a new
renewal, PostgreSQL gets SIGQUIT (immediate shutdown: no new commit can be acknowledged after it)
and the loop is told (``on_fired``), which records ``lease_lost``.

Two things fence, independently:

- this thread (not a coroutine, so a stuck asyncio loop cannot delay it) calls ``fence``;
- the fence process, the agent's child in its own session, gets every arm (deadline and the
  postmaster's pid) over a pipe and fences on the same CLOCK_MONOTONIC deadline by itself. A
  frozen agent (SIGSTOP of it or of its process group, a debugger, a long pause) freezes the
  thread, not the fence process. It can also hold the Linux watchdog device (``device``) for a
  freeze of the whole node.

The thread pings the fence process every ``ping_interval`` while armed; an arm or ping left
unanswered for ``answer_timeout`` while armed is treated as a failure of fencing: the thread
fences PostgreSQL itself, calls ``on_fired`` and restarts the fence process (so does a fence
process that dies while armed). A postmaster restarted while armed is passed on at once: the
thread compares ``postmaster_pid()`` with the pid it last sent at every ping and re-sends the arm
when it changed (``postmaster_started()`` makes it look at once). ``on_fired`` is called at most
once per arm, whichever side fenced first.
"""

from __future__ import annotations

import collections
import math
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from events.rotation import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES, rotate_if_larger

log = structlog.get_logger("pgsidecar.watchdog")

FENCE_SCRIPT = Path(__file__).with_name("fence.py")


class Watchdog:
    def __init__(
        self,
        fence: Callable[[], bool],
        on_fired: Callable[[], None],
        *,
        postmaster_pid: Callable[[], int | None] | None = None,
        fence_process: bool = True,
        state_dir: Path | None = None,
        device: Path | None = None,
        device_required: bool = False,
        safety_margin: float = 0.5,
        ping_interval: float = 0.5,
        answer_timeout: float = 1.0,
        log_max_bytes: int = DEFAULT_MAX_BYTES,
        log_backups: int = DEFAULT_BACKUPS,
    ) -> None:
        if device is not None and not fence_process:
            raise ValueError("the watchdog device is held by the fence process: enable it")
        if device_required and device is None:
            raise ValueError("device_required needs a device")
        self._fence = fence
        self._on_fired = on_fired
        self._postmaster_pid = postmaster_pid
        self._use_process = fence_process
        self._state_dir = Path(state_dir) if state_dir is not None else None
        self._device = device
        self._device_required = device_required
        self._safety_margin = safety_margin
        self._ping_interval = ping_interval
        self._answer_timeout = answer_timeout
        self._log_max_bytes = log_max_bytes
        self._log_backups = log_backups

        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_fds: tuple[int, int] | None = (self._wake_r, self._wake_w)
        self._deadline: float | None = None
        self._stopped = False
        self.fired_count = 0
        # every message to the fence process has a number n, answered by "ok n"
        self._seq = 0
        self._pending: collections.deque[tuple[int, float]] = collections.deque()
        self._arm_seq = 0  # n of the latest arm: one arm, at most one on_fired
        self._fired_for = 0
        self._sent_pid: int | None = None
        self._recheck_pid = False
        self._fence_now = False  # the next fence process starts with an immediate fencing
        self._next_ping = 0.0
        self._child: subprocess.Popen[bytes] | None = None
        self._child_started = 0.0
        self._child_buf = b""
        self._next_spawn = 0.0
        self._spawn_failures = 0
        self.fence_restarts = 0
        # None: no device configured; else "off" (closed), "on" (held), "failed"
        self.device_state: str | None = None if device is None else "off"
        if self._use_process:
            with self._lock:
                self._spawn()
        self._thread = threading.Thread(target=self._run, name="pgsidecar-watchdog", daemon=True)
        self._thread.start()

    # -- the interface the agent uses ------------------------------------------------------------

    @property
    def deadline(self) -> float | None:
        with self._lock:
            return self._deadline

    @property
    def fence_pid(self) -> int | None:
        child = self._child
        return child.pid if child is not None else None

    def fence_in_sync(self) -> bool:
        """The fence process runs and has answered every message sent to it."""
        with self._lock:
            return self._child is not None and not self._pending

    def can_lead(self) -> bool:
        """False when ``device_required`` and the device is missing or its last use failed: a
        check for the agent before it races for the lease (the arm would fence at once)."""
        if not self._device_required:
            return True
        assert self._device is not None
        with self._lock:
            failed = self.device_state == "failed"
        return not failed and os.access(self._device, os.W_OK)

    def armed_and_valid(self) -> bool:
        with self._lock:
            d = self._deadline
            device_ok = not self._device_required or self.device_state == "on"
        return d is not None and time.monotonic() < d and device_ok

    def arm(self, deadline: float) -> None:
        """Set (or move) the fencing deadline, monotonic seconds."""
        pid = self._pm_pid()
        with self._lock:
            self._deadline = deadline
            self._send_arm(pid)
        self._wake()

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None
            self._send("disarm")
        self._wake()

    def postmaster_started(self) -> None:
        """A new postmaster runs: pass its pid to the fence process now, not at the next ping."""
        with self._lock:
            self._recheck_pid = True
        self._wake()

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._deadline = None
        self._wake()
        self._thread.join(timeout=3)
        with self._lock:
            child, self._child = self._child, None
            if child is not None:
                self._write(child, f"exit {self._seq + 1}\n")
        if child is not None:
            self._reap(child, wait=2.0)
            self._remove_pid_file(child.pid)
        if not self._thread.is_alive():
            with self._lock:
                fds, self._wake_fds = self._wake_fds, None
            for fd in fds or ():
                os.close(fd)

    # -- the fence process: talking to it (callers hold self._lock) ------------------------------

    def _pm_pid(self) -> int | None:
        if self._postmaster_pid is None:
            return None
        try:
            return self._postmaster_pid()
        except Exception:
            return None

    def _send(self, cmd: str, *args: str) -> int:
        self._seq += 1
        n = self._seq
        if self._use_process:
            self._pending.append((n, time.monotonic()))
            if self._child is not None:
                # unwritten (a full pipe: it does not read) means unanswered: that is caught
                self._write(self._child, " ".join((cmd, str(n), *args)) + "\n")
        return n

    def _send_arm(self, pid: int | None) -> None:
        assert self._deadline is not None
        self._arm_seq = self._send("arm", f"{self._deadline:.6f}", str(pid) if pid else "-")
        self._sent_pid = pid
        self._recheck_pid = False

    @staticmethod
    def _write(child: subprocess.Popen[bytes], line: str) -> None:
        assert child.stdin is not None
        try:
            os.write(child.stdin.fileno(), line.encode())  # non-blocking; a line is atomic
        except OSError:
            pass  # full (EAGAIN) or dead (EPIPE): unanswered, or end of file on its stdout

    def _spawn(self) -> None:
        argv = [sys.executable, "-I", "-S", str(FENCE_SCRIPT)]
        if self._device is not None:
            argv += ["--device", str(self._device), "--safety-margin", repr(self._safety_margin)]
        err: Any = subprocess.DEVNULL
        if self._state_dir is not None:
            fence_log = self._state_dir / "fence.log"
            try:
                # the fence process writes a line per event to its stderr, a file that no
                # frozen reader can block; bounded by rotating it at each start of the process
                rotate_if_larger(fence_log, self._log_max_bytes, self._log_backups)
                err = open(fence_log, "ab")  # noqa: SIM115
            except OSError:
                pass
        now = time.monotonic()
        try:
            # its own session: a stop of the agent's process group does not freeze it
            child = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
                bufsize=0,
            )
        except OSError as exc:
            self._spawn_failures += 1
            self._next_spawn = now + min(5.0, 0.1 * 2**self._spawn_failures)
            log.error("fence_process_start_failed", error=str(exc))
            return
        finally:
            if err is not subprocess.DEVNULL:
                err.close()
        assert child.stdin is not None and child.stdout is not None
        os.set_blocking(child.stdin.fileno(), False)
        os.set_blocking(child.stdout.fileno(), False)
        self._child, self._child_started, self._child_buf = child, now, b""
        self._pending.clear()
        self._next_ping = now + self._ping_interval
        if self._state_dir is not None:
            try:
                tmp = self._state_dir / "fence.pid.tmp"
                tmp.write_text(f"{child.pid}\n")
                os.replace(tmp, self._state_dir / "fence.pid")
            except OSError as exc:
                log.warning("fence_pid_file_failed", error=str(exc))
        log.info("fence_process_started", pid=child.pid, device=str(self._device or ""))
        if self._fence_now:
            # its predecessor failed while armed and we fenced with SIGQUIT only: this one
            # fences too, escalating to SIGKILL (a stopped postmaster) and taking over the
            # device from the dead one (open, then the magic close once PostgreSQL is gone)
            self._fence_now = False
            pid = self._pm_pid()
            n = self._send("arm", f"{now:.6f}", str(pid) if pid else "-")
            self._fired_for = max(self._fired_for, n)  # on_fired was called for it already
        elif self._deadline is not None:
            self._send_arm(self._pm_pid())

    def _remove_pid_file(self, pid: int) -> None:
        if self._state_dir is None:
            return
        path = self._state_dir / "fence.pid"
        try:
            if path.read_text().strip() == str(pid):
                path.unlink()
        except OSError:
            pass

    @staticmethod
    def _reap(child: subprocess.Popen[bytes], wait: float = 1.0) -> int | None:
        """Wait for it (bounded), SIGKILL if it does not go; no zombie is left."""
        try:
            rc: int | None = child.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            child.kill()  # works on a stopped process too
            try:
                rc = child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                rc = None
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        return rc

    # -- the thread ------------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._lock:
            if self._wake_fds is None:
                return  # stopped, and the pipe closed: never write to a reused fd number
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass  # full: it wakes anyway

    def _timeout(self, now: float) -> float:
        wake = [now + 1.0]
        if self._deadline is not None:
            wake.append(self._deadline)
        if self._use_process:
            if self._child is None:
                wake.append(self._next_spawn)
            elif self._deadline is not None:
                wake.append(self._next_ping)
            if self._pending:
                wake.append(self._pending[0][1] + self._answer_timeout + 0.001)
        return max(0.0, min(wake) - now)

    def _run(self) -> None:
        while True:
            try:
                if not self._run_once():
                    return
            except Exception:  # the thread must outlive any surprise
                log.exception("watchdog_thread_error")
                time.sleep(0.1)

    def _run_once(self) -> bool:
        with self._lock:
            if self._stopped:
                return False
            now = time.monotonic()
            if self._use_process and self._child is None and now >= self._next_spawn:
                self._spawn()
            child = self._child
            timeout = self._timeout(now)
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        if child is not None:
            assert child.stdout is not None
            poller.register(child.stdout.fileno(), select.POLLIN)
        events = poller.poll(math.ceil(timeout * 1000))
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass
        if child is not None and any(fd != self._wake_r for fd, _ in events):
            self._read_child(child)
        self._check(time.monotonic())
        return True

    def _check(self, now: float) -> None:
        pid = self._pm_pid() if self._deadline is not None else None
        fire: int | None = None
        unanswered = False
        with self._lock:
            if self._stopped:
                return
            if self._deadline is not None and now >= self._deadline:
                self._deadline = None
                fire = self._arm_seq
            if self._pending and now - self._pending[0][1] > self._answer_timeout:
                unanswered = True
            elif self._child is not None and self._deadline is not None:
                if pid != self._sent_pid or self._recheck_pid:
                    self._send_arm(pid)
                if now >= self._next_ping:
                    self._send("ping")
                    self._next_ping = now + self._ping_interval
        if fire is not None:
            log.error("fencing_deadline_passed_thread")
            self._fire(fire)
        if unanswered:
            self._restart("fence process does not answer")

    def _read_child(self, child: subprocess.Popen[bytes]) -> None:
        assert child.stdout is not None
        try:
            data = os.read(child.stdout.fileno(), 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._child_died(child)
            return
        with self._lock:
            if child is not self._child:
                return
            *lines, self._child_buf = (self._child_buf + data).split(b"\n")
        for line in lines:
            self._on_line(line.decode("ascii", "replace").split())

    def _on_line(self, words: list[str]) -> None:
        if not words:
            return
        kind = words[0]
        try:
            if kind == "ok":
                n = int(words[1])
                with self._lock:
                    while self._pending and self._pending[0][0] <= n:
                        self._pending.popleft()
                    self._spawn_failures = 0
            elif kind == "fired":
                n = int(words[3])
                log.error(
                    "fence_process_fired",
                    postmaster=words[1],
                    late=float(words[2]),
                    result=words[4] if len(words) > 4 else "",
                )
                with self._lock:
                    if n == self._arm_seq:
                        self._deadline = None
                self._fire(n)
            elif kind == "device":
                self._on_device(words[1], " ".join(words[2:]))
            elif kind == "hello":
                log.info("fence_process_ready", pid=int(words[1]), mlocked=words[2] == "1")
            elif kind == "bad":
                log.warning("fence_process_protocol_error", line=" ".join(words))
        except (IndexError, ValueError):
            log.warning("fence_process_unparsable", line=" ".join(words))

    def _on_device(self, state: str, detail: str) -> None:
        with self._lock:
            changed, self.device_state = state != self.device_state, state
            fire = None
            if state == "failed" and self._device_required and self._deadline is not None:
                # required: no master without the device
                fire, self._deadline = self._arm_seq, None
                self._send("disarm")
        if state == "failed":
            if changed or fire is not None:
                log.error("watchdog_device_failed", device=str(self._device), error=detail)
        else:
            log.info("watchdog_device", device=str(self._device), state=state, timeout=detail)
        if fire is not None:
            self._fire(fire)

    def _child_died(self, child: subprocess.Popen[bytes]) -> None:
        rc = self._reap(child)
        now = time.monotonic()
        with self._lock:
            if child is not self._child:
                return
            self._child = None
            self._pending.clear()
            quick = now - self._child_started < 2.0
            self._spawn_failures = self._spawn_failures + 1 if quick else 0
            self._next_spawn = now + (min(5.0, 0.1 * 2**self._spawn_failures) if quick else 0.0)
            fire = self._arm_seq if self._deadline is not None else None
            self._deadline = None
            self._fence_now = fire is not None
            self.fence_restarts += 1
        self._remove_pid_file(child.pid)
        log.error("fence_process_died", pid=child.pid, returncode=rc, armed=fire is not None)
        if fire is not None:
            self._fire(fire)

    def _restart(self, reason: str) -> None:
        """The fence process cannot be relied on: if armed, fence ourselves; start a new one."""
        with self._lock:
            child, self._child = self._child, None
            self._pending.clear()
            self._next_spawn = time.monotonic()
            fire = self._arm_seq if self._deadline is not None else None
            self._deadline = None
            self._fence_now = fire is not None
            self.fence_restarts += 1
        log.error("fence_process_unsafe", reason=reason, pid=child and child.pid, armed=bool(fire))
        if fire is not None:
            self._fire(fire)
        if child is not None:
            child.kill()
            self._reap(child)
            self._remove_pid_file(child.pid)
        self._wake()

    def _fire(self, arm_seq: int) -> None:
        """Fence and tell the loop, once per arm (the thread and the process may both fire)."""
        with self._lock:
            if arm_seq <= self._fired_for:
                return
            self._fired_for = arm_seq
            self.fired_count += 1
        try:
            self._fence()
        except Exception:
            log.exception("fence_failed")
        try:
            self._on_fired()
        except Exception:
            log.exception("on_fired_failed")
