"""events.tasks: a cancellation that arrives just as the awaited thing completes is kept (the
loop that was cancelled stops), which ``asyncio.wait_for`` on Python 3.11 does not guarantee."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from events.tasks import bounded, stop_task


async def _cancel_as_it_completes(wait: Callable[[Awaitable[int]], Awaitable[int]]) -> Any:
    """A task waiting through ``wait`` on a future; the future completes and the task is
    cancelled in the same turn of the loop. The task's outcome: its result, or "cancelled"."""
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(wait(fut))
    await asyncio.sleep(0)  # the task is now waiting
    fut.set_result(1)
    task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        return "cancelled"


async def test_bounded_keeps_a_cancellation_that_arrives_as_the_awaited_completes() -> None:
    assert await _cancel_as_it_completes(lambda aw: bounded(aw, 10.0)) == "cancelled"


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for was rewritten in 3.12")
async def test_wait_for_on_this_python_swallows_it_which_is_why_bounded_exists() -> None:
    assert await _cancel_as_it_completes(lambda aw: asyncio.wait_for(aw, 10.0)) == 1


async def test_bounded_times_out() -> None:
    with pytest.raises(TimeoutError):
        await bounded(asyncio.sleep(5), 0.01)


async def test_stop_task_stops_a_loop_that_swallows_one_cancellation() -> None:
    swallowed = []

    async def loop() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed.append(True)  # as a 3.11 wait_for may do once

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_task(task), 5)
    assert task.cancelled() and swallowed == [True]
