"""The simulator's virtual-time event loop: time moves only when every task waits, asyncio's
primitives behave as on a real loop, and a seed fixes the whole run."""

from __future__ import annotations

import asyncio
import functools
import gc
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from pgsidecar.lab.sim.clock import (
    EPOCH,
    GC_THRESHOLDS,
    SimulationDeadlock,
    SimulationStalled,
    VirtualEventLoop,
    current_rng,
    run_simulation,
)


def now() -> float:
    return asyncio.get_running_loop().time() - EPOCH


def test_time_moves_only_when_every_task_waits() -> None:
    async def main() -> list[float]:
        seen = [now()]
        for _ in range(1000):  # busy: always something ready, so no time passes
            await asyncio.sleep(0)
        seen.append(now())
        await asyncio.sleep(5)
        seen.append(now())
        await asyncio.sleep(0.25)
        seen.append(now())
        return seen

    assert run_simulation(main) == [0.0, 0.0, 5.0, 5.25]


def test_the_clock_jumps_to_the_next_timer_among_many() -> None:
    async def main() -> list[tuple[float, str]]:
        order: list[tuple[float, str]] = []
        loop = asyncio.get_running_loop()

        def record(name: str) -> None:
            order.append((now(), name))

        for delay, name in ((3.0, "c"), (1.0, "a"), (2.0, "b")):
            loop.call_later(delay, functools.partial(record, name))
        await asyncio.sleep(10)
        return order

    assert run_simulation(main) == [(1.0, "a"), (2.0, "b"), (3.0, "c")]


def test_wait_for_times_out_on_virtual_time_and_cancels_the_waiter() -> None:
    async def main() -> tuple[float, bool]:
        event = asyncio.Event()
        waiter = asyncio.ensure_future(event.wait())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(waiter, 3)
        return now(), waiter.cancelled()

    assert run_simulation(main) == (3.0, True)


def test_a_cancelled_sleeper_does_not_hold_the_clock() -> None:
    async def main() -> tuple[float, bool]:
        sleeper = asyncio.create_task(asyncio.sleep(3600))
        await asyncio.sleep(1)
        sleeper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeper
        # nothing else is armed: the run ends at 1 s, not at the sleeper's hour
        return now(), sleeper.cancelled()

    assert run_simulation(main) == (1.0, True)


def test_queue_event_and_tasks_interleave_in_virtual_time() -> None:
    async def main() -> list[tuple[float, str]]:
        log: list[tuple[float, str]] = []
        queue: asyncio.Queue[int] = asyncio.Queue()
        done = asyncio.Event()

        async def producer() -> None:
            for i in range(3):
                await asyncio.sleep(1)
                await queue.put(i)
            done.set()

        async def consumer() -> None:
            while True:
                item = await queue.get()
                log.append((now(), f"got {item}"))

        tasks = [asyncio.create_task(producer()), asyncio.create_task(consumer())]
        await done.wait()
        await asyncio.sleep(0)
        log.append((now(), "done"))
        tasks[1].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return log

    assert run_simulation(main) == [
        (1.0, "got 0"),
        (2.0, "got 1"),
        (3.0, "got 2"),
        (3.0, "done"),
    ]


def _random_program() -> Callable[[], Coroutine[Any, Any, list[tuple[float, int, int]]]]:
    async def main() -> list[tuple[float, int, int]]:
        rng = current_rng()
        trace: list[tuple[float, int, int]] = []

        async def worker(n: int) -> None:
            for step in range(20):
                await asyncio.sleep(rng.expovariate(2.0))
                trace.append((round(now(), 9), n, step))

        await asyncio.gather(*(worker(n) for n in range(8)))
        return trace

    return main


def test_the_same_seed_gives_the_same_trace_and_another_seed_another() -> None:
    first = run_simulation(_random_program(), seed=7)
    again = run_simulation(_random_program(), seed=7)
    other = run_simulation(_random_program(), seed=8)
    assert len(first) == 160
    assert first == again
    assert first != other


def test_waiting_with_no_timer_armed_is_a_deadlock_not_a_hang() -> None:
    async def main() -> None:
        await asyncio.Event().wait()  # nobody will ever set it

    with pytest.raises(SimulationDeadlock, match="no timer is armed"):
        run_simulation(main)


def test_a_task_that_never_waits_is_stopped_naming_the_seed() -> None:
    async def main() -> None:
        await asyncio.sleep(2)
        while True:  # noqa: ASYNC110 (the busy loop is the point): the clock can never move
            await asyncio.sleep(0)

    with pytest.raises(SimulationStalled, match=r"seed 11: .* at virtual time 2\.000000 s"):
        run_simulation(main, seed=11, max_spins=10_000)


def test_a_timer_due_a_hair_from_now_is_a_spin_not_progress() -> None:
    # 1e-12 s is far below the resolution of a clock near EPOCH: asked to wait it, the loop
    # advances by it and its value does not change; counting jumps instead would never fire
    async def main() -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1e-12)
            assert loop.time() == EPOCH

    with pytest.raises(SimulationStalled, match="seed 4: .*without the clock advancing"):
        run_simulation(main, seed=4, max_spins=10_000)


def test_busy_work_at_one_instant_below_the_limit_is_not_a_spin() -> None:
    async def main() -> float:
        for _ in range(5_000):
            await asyncio.sleep(0)
        await asyncio.sleep(1)
        for _ in range(5_000):  # the allowance starts again once the clock has moved
            await asyncio.sleep(0)
        return now()

    assert run_simulation(main, max_spins=6_000) == 1.0


def test_a_run_past_its_wall_clock_budget_is_stopped_naming_the_seed() -> None:
    async def main() -> None:
        while True:  # noqa: ASYNC110 (time moves, too little per step to reach an end)
            await asyncio.sleep(1e-6)

    with pytest.raises(SimulationStalled, match=r"seed 9: .*real time, over its budget"):
        run_simulation(main, seed=9, wall_budget=0.3)


def test_real_io_and_threads_are_refused() -> None:
    async def reader() -> None:
        a, b = socket.socketpair()
        try:
            asyncio.get_running_loop().add_reader(a.fileno(), lambda: None)
        finally:
            a.close()
            b.close()

    async def thread() -> None:
        await asyncio.to_thread(sum, [1, 2])

    with pytest.raises(RuntimeError, match="real I/O"):
        run_simulation(reader)
    with pytest.raises(RuntimeError, match="thread"):
        run_simulation(thread)


def test_the_loop_exposes_its_seeded_generator() -> None:
    loops = [VirtualEventLoop(seed=3), VirtualEventLoop(seed=3)]
    try:
        assert loops[0].seed == 3
        assert loops[0].rng.random() == loops[1].rng.random()
    finally:
        for loop in loops:
            loop.close()


def test_a_run_collects_garbage_less_often_and_restores_the_collector_after() -> None:
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    assert before != GC_THRESHOLDS

    async def main() -> tuple[tuple[int, int, int], int]:
        return gc.get_threshold(), gc.get_freeze_count()

    during, frozen_during = run_simulation(main)
    assert during == GC_THRESHOLDS
    # what existed before the run is left out of its scans (unless the caller froze its own)
    assert frozen_during > frozen if frozen == 0 else frozen_during == frozen
    assert (gc.get_threshold(), gc.get_freeze_count()) == (before, frozen)

    def fails() -> Coroutine[Any, Any, None]:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_simulation(fails)
    assert (gc.get_threshold(), gc.get_freeze_count()) == (before, frozen)


def test_the_lean_scheduling_runs_what_asyncios_own_runs_in_the_same_order() -> None:
    """The loop's own ``_run_once``, ``call_soon`` and ``call_at`` against asyncio's (which
    run in debug mode): the same callbacks at the same virtual instants in the same order,
    through equal due times, mass cancellations (the heap's clean-up), tasks and failing
    callbacks."""

    def program() -> Callable[[], Coroutine[Any, Any, list[tuple[float, str]]]]:
        async def main() -> list[tuple[float, str]]:
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(lambda _loop, ctx: seen.append((now(), "error")))
            seen: list[tuple[float, str]] = []
            rng = current_rng()

            def note(label: str) -> None:
                seen.append((now(), label))
                if rng.random() < 0.3:
                    loop.call_soon(note, label + "'")

            def fail() -> None:
                raise ValueError("a failing callback")

            timers = [
                loop.call_later(rng.choice([0.5, 1.0, 1.5]), note, f"t{i}") for i in range(300)
            ]
            for timer in timers[::3] + timers[1::3]:  # two thirds cancelled: the heap is cleaned
                timer.cancel()
            loop.call_soon(fail)
            loop.call_at(loop.time() + 1.0, fail)

            async def worker(n: int) -> None:
                for step in range(5):
                    await asyncio.sleep(rng.uniform(0, 1))
                    note(f"w{n}.{step}")

            await asyncio.gather(*(worker(n) for n in range(10)))
            await asyncio.sleep(2)
            return seen

        return main

    ours = run_simulation(program(), seed=5)
    asyncios = run_simulation(program(), seed=5, debug=True)
    assert len(ours) > 200
    assert ("error" in {label for _t, label in ours}) and ours == asyncios
