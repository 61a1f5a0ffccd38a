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

Determinism: the ready queue is FIFO and the timer heap is ordered by due time, then by the heap's
deterministic history, so the same program run twice does the same thing. What the loop cannot
fix is code that iterates over sets of objects hashed by identity (``asyncio.wait`` returns
such sets): order those by something stable before acting on them. Every random draw comes from
the loop's ``rng`` (seeded) or from generators derived from it.
"""

from __future__ import annotations

import asyncio
import random
import selectors
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

# the virtual clock's value when a simulation starts: not 0, so that code treating 0 as "unset"
# is not fooled, and far from any real monotonic clock value, so that mixing the two shows
EPOCH = 1_000_000.0


class SimulationDeadlock(RuntimeError):
    """Every task waits and no timer is armed: nothing can ever happen again."""


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
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._map

    def close(self) -> None:
        self._map.clear()


class VirtualEventLoop(asyncio.SelectorEventLoop):
    """``loop.time()`` is virtual; ``loop.rng`` is the simulation's seeded random source."""

    def __init__(self, seed: int = 0) -> None:
        self._now = EPOCH
        selector = VirtualSelector()
        super().__init__(selector)
        selector.loop = self
        selector.sealed = True
        self.seed = seed
        self.rng = random.Random(seed)
        self.wakeups = 0  # how many times the clock jumped (a measure of the work done)

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds
        self.wakeups += 1

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
) -> T:
    """Run ``main`` (a coroutine, or a function returning one, called inside the loop) on a fresh
    :class:`VirtualEventLoop` seeded with ``seed``; cancel what is left when it returns, as
    ``asyncio.run`` does. Raises :class:`SimulationDeadlock` if every task waits forever."""
    with asyncio.Runner(debug=debug, loop_factory=lambda: VirtualEventLoop(seed)) as runner:

        async def entry() -> T:
            if callable(main):
                return await main()
            return await main

        return runner.run(entry())
