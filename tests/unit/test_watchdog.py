"""The fencing watchdog: a thread that fences on its own clock and tells the loop (regression:
the loop notification once raised in the thread, which died after its first fencing)."""

from __future__ import annotations

import asyncio
import functools
import threading
import time

from pgsidecar.agent.loop import Inbox
from pgsidecar.agent.ports import SystemClock
from pgsidecar.agent.sources import watchdog_fired
from pgsidecar.watchdog import Watchdog


async def test_watchdog_fences_then_the_loop_gets_lease_lost_and_the_thread_lives_on() -> None:
    """Wired as the factory wires it: the watchdog's thread posts to the agent's inbox."""
    inbox = Inbox(SystemClock())
    inbox.loop = asyncio.get_running_loop()
    fenced: list[float] = []

    wd = Watchdog(
        fence=lambda: fenced.append(time.monotonic()) or True,
        on_fired=functools.partial(watchdog_fired, inbox.post_threadsafe),
    )
    try:
        t0 = time.monotonic()
        wd.arm(t0 + 0.2)
        inp = await asyncio.wait_for(inbox.queue.get(), timeout=3)
        assert (inp.type, inp.data) == ("lease", {"held": False, "term": None})
        assert inp.now >= t0 + 0.19  # stamped on the loop's clock when it arrived
        assert len(fenced) == 1 and fenced[0] - t0 >= 0.19
        assert not wd.armed_and_valid()
        # the thread survived its first firing: it fences again when re-armed
        wd.arm(time.monotonic() + 0.1)
        await asyncio.wait_for(inbox.queue.get(), timeout=3)
        assert len(fenced) == 2 and wd.fired_count == 2
        assert any(t.name == "pgsidecar-watchdog" and t.is_alive() for t in threading.enumerate())
    finally:
        wd.stop()


def test_renewal_moves_the_deadline_and_disarm_stops_it() -> None:
    fired: list[int] = []
    wd = Watchdog(fence=lambda: fired.append(1) or True, on_fired=lambda: None)
    try:
        for _ in range(5):  # renewals keep pushing the deadline out: no fencing
            wd.arm(time.monotonic() + 0.15)
            time.sleep(0.05)
        assert fired == [] and wd.armed_and_valid()
        wd.disarm()
        time.sleep(0.3)
        assert fired == [] and not wd.armed_and_valid()
    finally:
        wd.stop()
