"""The fencing watchdog: a thread, not a coroutine, so a stuck asyncio loop cannot delay it.

The master arms it with a deadline on its own monotonic clock each time a lease renewal succeeds:

    deadline = t_sent + ttl * (1 - clock_drift) - fence_margin

where ``t_sent`` is when the successful renewal request was *sent* (the DCS extended the lease at
some moment after that, so the lease is valid at least until t_sent + ttl on the DCS's clock).
``clock_drift`` bounds how much slower our clock may run than the DCS's, and ``fence_margin``
covers the time an immediate shutdown of PostgreSQL takes. If the deadline passes without a new
renewal, the thread sends SIGQUIT to the postmaster (immediate shutdown: no new commit can be
acknowledged after it) and tells the loop, which records ``lease_lost``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Watchdog:
    def __init__(self, fence: Callable[[], bool], on_fired: Callable[[], None]) -> None:
        self._fence = fence
        self._on_fired = on_fired
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._deadline: float | None = None
        self._stopped = False
        self.fired_count = 0
        self._thread = threading.Thread(target=self._run, name="pgsidecar-watchdog", daemon=True)
        self._thread.start()

    @property
    def deadline(self) -> float | None:
        with self._lock:
            return self._deadline

    def armed_and_valid(self) -> bool:
        d = self.deadline
        return d is not None and time.monotonic() < d

    def arm(self, deadline: float) -> None:
        """Set (or move) the fencing deadline, monotonic seconds."""
        with self._lock:
            self._deadline = deadline
        self._wake.set()

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None
        self._wake.set()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._deadline = None
        self._wake.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopped:
                    return
                deadline = self._deadline
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            woke = self._wake.wait(timeout=timeout if timeout is None else min(timeout, 1.0))
            self._wake.clear()
            if woke:
                continue
            with self._lock:
                deadline = self._deadline
                due = deadline is not None and time.monotonic() >= deadline
                if due:
                    self._deadline = None
            if due:
                self.fired_count += 1
                try:
                    self._fence()
                finally:
                    self._on_fired()
