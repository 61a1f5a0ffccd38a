"""Bounded waits and task stops that keep a cancellation: on Python 3.11, ``asyncio.wait_for``
returns the awaited thing's result when a cancellation arrives just as it completes, and swallows
the cancellation. A loop that is stopped by cancelling it (a watch, the Kafka sender) would then
run on, and whoever awaits it after the cancel waits for ever: a watch in the contract suite held
a teardown for 300 s that way. Use ``bounded`` inside such loops, and ``stop_task`` to stop one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def bounded(aw: Awaitable[T], seconds: float) -> T:
    """``await aw`` for at most ``seconds`` (TimeoutError after). Not asyncio.wait_for: on
    Python 3.11 it can swallow a cancellation that arrives just as the awaited thing
    completes, and a close() would then wait for a whole watch to end."""
    async with asyncio.timeout(seconds):
        return await aw


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it is really done (cancelling again if it was swallowed)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    if not task.cancelled():
        task.exception()  # retrieved: an error while stopping is of no further interest
