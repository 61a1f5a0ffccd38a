"""An asyncio event loop on virtual time, for deterministic simulation in one process.

Time advances only when every task waits: when the ready queue is empty, the loop jumps straight
to its next timer. Nothing real happens in between, so a simulated minute costs what its callbacks
cost, and a run is a pure function of its seed.

Why a loop of our own rather than PyPI's ``looptime`` or ``aiotools``' ``VirtualClock``: both are
built to fast-forward tests that still do real I/O. ``looptime`` polls the real selector on every
cycle, spins a number of no-op cycles before each jump, and on an idle loop (no timer) waits in
small steps of real time; ``VirtualClock`` patches ``loop.time`` inside a context and leaves the
real selector in place. Here there must be no real I/O at all: the loop below is the standard
``SelectorEventLoop`` given a selector that never reports a ready file descriptor and, when asked
to wait ``timeout`` seconds, moves the virtual clock by that much instead. That is about forty
lines, costs no system call per iteration, and turns the one thing a simulation must never do -
wait with no timer armed (every task blocked on something no one will ever deliver) - into an
immediate :class:`SimulationDeadlock` instead of a hang. Registering a real file descriptor or
running code in a thread raises at once, so nondeterminism cannot leak in unnoticed.

The opposite failure, a program that never waits (a task that keeps yielding with
``asyncio.sleep(0)``, callbacks that keep rescheduling one another, a wait recomputed to a hair
above zero that cannot move a clock of this magnitude), would spin forever at one virtual
instant, and no outside timeout can stop it: pytest-timeout's signal lands between callbacks of
a loop that never returns to it. So the loop is its own watchdog: a
:class:`SimulationStalled` naming the seed ends the run when the clock's value has not changed
for ``max_spins`` loop iterations, or when the run has used more than ``wall_budget`` seconds of
real time.

Determinism: the ready queue is FIFO and the timer heap is ordered by due time, then by the heap's
deterministic history, so the same program run twice does the same thing. What the loop cannot
fix is code that iterates over sets of objects hashed by identity (``asyncio.wait`` returns
such sets): order those by something stable before acting on them. Every random draw comes from
the loop's ``rng`` (seeded) or from generators derived from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import heapq
import random
import selectors
import time
from asyncio import base_events, format_helpers
from asyncio.events import Handle, TimerHandle
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

# the virtual clock's value when a simulation starts: not 0, so that code treating 0 as "unset"
# is not fooled, and far from any real monotonic clock value, so that mixing the two shows
EPOCH = 1_000_000.0

# loop iterations at one virtual instant before the watchdog calls it a spin: a whole cluster's
# agents reacting to one event take a few hundred; a spin reaches this within a second or two
MAX_SPINS = 200_000
# how often (loop iterations) the wall-clock budget is looked at: reading the clock is a call
WALL_CHECK_EVERY = 4096
# the garbage collector's thresholds during a run. A seed allocates millions of objects that die
# young, many of them in reference cycles (tasks, futures, exceptions and their tracebacks): at
# the default (700, 10, 10) the collector made about 140 passes per seed and took a tenth of
# its CPU. Collecting every 10,000 allocations instead finds the same garbage (a cycle's objects
# are already dead when it runs) in a third of the passes, and fewer survivors reach the older
# generations. Garbage collection decides nothing the run does: no code under simulation
# depends on when a cycle is freed.
GC_THRESHOLDS = (10_000, 10, 10)


class SimulationDeadlock(RuntimeError):
    """Every task waits and no timer is armed: nothing can ever happen again."""


class SimulationStalled(RuntimeError):
    """The watchdog ended a run: virtual time stopped advancing while the loop kept running (a
    spin), or the run went past its wall-clock budget."""


class VirtualSelector(selectors.BaseSelector):
    """A selector that never reports I/O; waiting moves the loop's virtual clock instead."""

    def __init__(self) -> None:
        self._map: dict[Any, selectors.SelectorKey] = {}
        self.loop: VirtualEventLoop | None = None
        self.sealed = False  # after the loop's own self-pipe: no real file descriptor allowed

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        if self.sealed:
            raise RuntimeError(
                f"real I/O in the simulation (file object {fileobj!r}): simulated components "
                f"talk through objects, never through sockets or files"
            )
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._map[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return self._map.pop(fd)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        self.unregister(fileobj)
        sealed, self.sealed = self.sealed, False
        try:
            return self.register(fileobj, events, data)
        finally:
            self.sealed = sealed

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        loop = self.loop
        assert loop is not None
        if timeout is None:
            raise SimulationDeadlock(
                f"at virtual time {loop.time() - EPOCH:.3f} s every task waits and no timer is "
                f"armed: nothing can ever happen again"
            )
        if timeout > 0:
            loop.advance(timeout)
        loop.watchdog()
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._map

    def close(self) -> None:
        self._map.clear()


class VirtualEventLoop(asyncio.SelectorEventLoop):
    """``loop.time()`` is virtual; ``loop.rng`` is the simulation's seeded random source."""

    def __init__(
        self, seed: int = 0, *, max_spins: int = MAX_SPINS, wall_budget: float | None = None
    ) -> None:
        self._now = EPOCH
        selector = VirtualSelector()
        super().__init__(selector)
        selector.loop = self
        selector.sealed = True
        self.seed = seed
        self.rng = random.Random(seed)
        self.wakeups = 0  # how many times the clock jumped (a measure of the work done)
        # the watchdog: iterations since the clock's value last changed, and the real-time limit
        self.max_spins = max_spins
        self.wall_budget = wall_budget
        self._spins = 0
        self._spun_at = EPOCH
        self._iterations = 0
        self._started = time.perf_counter()

    def watchdog(self) -> None:
        """Called once per loop iteration (by the selector). Compares the clock's value, not
        whether it was asked to move: a jump of 1e-12 s leaves a clock near 1e6 where it was."""
        if self._now != self._spun_at:
            self._spun_at = self._now
            self._spins = 0
        else:
            self._spins += 1
            if self._spins > self.max_spins:
                self._spins = 0  # the cancellation of what is left gets a fresh allowance
                raise SimulationStalled(
                    f"seed {self.seed}: the simulation spun {self.max_spins} loop iterations at "
                    f"virtual time {self.elapsed:.6f} s without the clock advancing (a task or "
                    f"callback that never waits: a busy loop, or a timer due a hair from now)"
                )
        self._iterations += 1
        if self.wall_budget is not None and self._iterations % WALL_CHECK_EVERY == 0:
            used = time.perf_counter() - self._started
            if used > self.wall_budget:
                self.wall_budget = None  # once: the cancellation of what is left may finish
                raise SimulationStalled(
                    f"seed {self.seed}: the simulation used {used:.1f} s of real time, over its "
                    f"budget, and had reached virtual time {self.elapsed:.3f} s"
                )

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds
        self.wakeups += 1

    # -- asyncio's scheduling, leaner ------------------------------------------------------------
    # A seed runs tens of thousands of loop iterations and callbacks; asyncio's own
    # ``_run_once`` asks the selector to wait (here: to move the clock), processes its I/O
    # events (never any), and runs each callback through ``Handle._run``; every ``call_soon``
    # passes through three more methods before a ``Handle`` is made. The methods below do the
    # same steps in the same order with the same arithmetic, so the same callbacks run in the
    # same order at the same virtual instants; in debug mode asyncio's own run instead (debug
    # is set before a run starts, never during it).
    #
    # The timer heap holds (when, handle) pairs rather than handles: every comparison of two
    # handles was a call of TimerHandle.__lt__ (over a hundred thousand per seed), where a pair
    # compares its floats in C. The order is the same: a pair is less than another exactly when
    # its handle is (when equal, TimerHandle.__lt__ is false, and so is the pairs' comparison,
    # whether their handles then compare equal or not), so the heap makes the same moves.

    def _run_once(self) -> None:
        # asyncio's private attributes are read through ``loop``, typed Any
        loop: Any = self
        if loop._debug:
            super()._run_once()  # type: ignore[misc]
            return
        scheduled: list[Any] = loop._scheduled
        count = len(scheduled)
        if (
            count > _MIN_SCHEDULED_TIMER_HANDLES
            and loop._timer_cancelled_count / count > _MIN_CANCELLED_TIMER_HANDLES_FRACTION
        ):
            kept = []
            for entry in scheduled:
                if entry[1]._cancelled:
                    entry[1]._scheduled = False
                else:
                    kept.append(entry)
            heapq.heapify(kept)
            loop._scheduled = scheduled = kept
            loop._timer_cancelled_count = 0
        else:
            while scheduled and scheduled[0][1]._cancelled:
                loop._timer_cancelled_count -= 1
                _when, timer = heapq.heappop(scheduled)
                timer._scheduled = False

        ready = loop._ready
        # the selector's wait: move the clock to the next timer, or find nothing can happen
        if not ready and not loop._stopping:
            if not scheduled:
                raise SimulationDeadlock(
                    f"at virtual time {self._now - EPOCH:.3f} s every task waits and no timer "
                    f"is armed: nothing can ever happen again"
                )
            timeout = min(max(0, scheduled[0][0] - self._now), _MAXIMUM_SELECT_TIMEOUT)
            if timeout > 0:
                self._now += timeout
                self.wakeups += 1
        self.watchdog()

        end_time = self._now + loop._clock_resolution
        while scheduled:
            if scheduled[0][0] >= end_time:
                break
            _when, timer = heapq.heappop(scheduled)
            timer._scheduled = False
            ready.append(timer)

        popleft = ready.popleft
        for _ in range(len(ready)):
            handle = popleft()
            if handle._cancelled:
                continue
            try:  # Handle._run
                handle._context.run(handle._callback, *handle._args)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._callback_failed(handle, exc)
        handle = None  # break the cycle through an exception's traceback, as asyncio does

    def _callback_failed(self, handle: Any, exc: BaseException) -> None:
        """What ``Handle._run`` does when its callback raises."""
        source = format_helpers._format_callback_source(handle._callback, handle._args)
        context: dict[str, Any] = {
            "message": f"Exception in callback {source}",
            "exception": exc,
            "handle": handle,
        }
        if handle._source_traceback:
            context["source_traceback"] = handle._source_traceback
        self.call_exception_handler(context)

    def call_soon(  # type: ignore[override]
        self, callback: Callable[..., Any], *args: Any, context: contextvars.Context | None = None
    ) -> Handle:
        loop: Any = self
        if loop._debug:
            return super().call_soon(callback, *args, context=context)
        if loop._closed:
            raise RuntimeError("Event loop is closed")
        handle: Any = _new_handle(Handle)
        handle._callback = callback
        handle._args = args
        handle._loop = self
        handle._context = context if context is not None else contextvars.copy_context()
        handle._cancelled = False
        handle._repr = None
        handle._source_traceback = None
        loop._ready.append(handle)
        return handle  # type: ignore[no-any-return]

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., Any],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> TimerHandle:
        loop: Any = self
        if loop._debug or when is None:
            return super().call_at(when, callback, *args, context=context)
        if loop._closed:
            raise RuntimeError("Event loop is closed")
        timer: Any = _new_handle(TimerHandle)
        timer._callback = callback
        timer._args = args
        timer._loop = self
        timer._context = context if context is not None else contextvars.copy_context()
        timer._cancelled = False
        timer._repr = None
        timer._source_traceback = None
        timer._when = when
        heapq.heappush(loop._scheduled, (when, timer))
        timer._scheduled = True
        return timer  # type: ignore[no-any-return]

    def call_later(  # type: ignore[override]
        self,
        delay: float,
        callback: Callable[..., Any],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> TimerHandle:
        loop: Any = self
        if loop._debug or delay is None:
            return super().call_later(delay, callback, *args, context=context)
        return self.call_at(self._now + delay, callback, *args, context=context)

    @property
    def elapsed(self) -> float:
        """Virtual seconds since the loop was made."""
        return self._now - EPOCH

    def run_in_executor(self, executor: Any, func: Any, *args: Any) -> Any:  # type: ignore[override]
        raise RuntimeError(
            f"a thread in the simulation ({func!r}): threads run on real time and make a run "
            f"depend on the OS scheduler"
        )

    def add_signal_handler(self, sig: int, callback: Any, *args: Any) -> None:  # type: ignore[override]
        raise RuntimeError("signal handlers in the simulation: post the event as an input")


_new_handle: Any = object.__new__  # a Handle whose slots the loop fills in (no __init__)
# asyncio's own constants for the steps the loop above repeats
_base: Any = base_events
_MIN_SCHEDULED_TIMER_HANDLES: int = _base._MIN_SCHEDULED_TIMER_HANDLES
_MIN_CANCELLED_TIMER_HANDLES_FRACTION: float = _base._MIN_CANCELLED_TIMER_HANDLES_FRACTION
_MAXIMUM_SELECT_TIMEOUT: float = _base.MAXIMUM_SELECT_TIMEOUT


def derive_rng(parent: random.Random) -> random.Random:
    """A generator of its own for one component, seeded from ``parent``: the draws of one
    component do not shift those of another made after it."""
    return random.Random(parent.getrandbits(64))


def current_rng() -> random.Random:
    """The running virtual loop's seeded generator (a fixed-seed one on an ordinary loop)."""
    loop = asyncio.get_running_loop()
    rng = getattr(loop, "rng", None)
    if isinstance(rng, random.Random):
        return rng
    return random.Random(0)


def run_simulation(
    main: Callable[[], Coroutine[Any, Any, T]] | Awaitable[T],
    seed: int = 0,
    *,
    debug: bool = False,
    max_spins: int = MAX_SPINS,
    wall_budget: float | None = None,
) -> T:
    """Run ``main`` (a coroutine, or a function returning one, called inside the loop) on a fresh
    :class:`VirtualEventLoop` seeded with ``seed``; cancel what is left when it returns, as
    ``asyncio.run`` does. Raises :class:`SimulationDeadlock` if every task waits forever, and
    :class:`SimulationStalled` (naming the seed) if the loop runs ``max_spins`` iterations
    without the virtual clock moving, or past ``wall_budget`` seconds of real time."""
    runner = asyncio.Runner(
        debug=debug,
        loop_factory=lambda: VirtualEventLoop(seed, max_spins=max_spins, wall_budget=wall_budget),
    )

    async def entry() -> T:
        if callable(main):
            return await main()
        return await main

    with fewer_collections():
        try:
            return runner.run(entry())
        except SimulationStalled:
            # cancelling what is left may spin again: the first verdict is the one to report
            with contextlib.suppress(SimulationStalled):
                runner.close()
            raise
        finally:
            runner.close()


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """Run the block with the collector at :data:`GC_THRESHOLDS`, and with every object that
    exists before it (the imported modules, the caller's) frozen out of the collector's scans,
    unless the caller froze objects of its own; restored afterwards."""
    thresholds = gc.get_threshold()
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        if freeze:
            gc.unfreeze()
