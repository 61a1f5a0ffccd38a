"""Watching a DCS in a test: every view ``dcs.watch()`` delivers, recorded with its arrival time,
and the wait for the first view that satisfies a predicate. The ``watchers`` fixture starts them
and stops them at teardown (the contract suite and the etcd and Consul backend tests)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import pytest

from events.dcs.base import DCS, ClusterView
from events.tasks import stop_task


class Watcher:
    """Runs ``dcs.watch()`` in a task and records (arrival time, view) of every view."""

    def __init__(self, dcs: DCS) -> None:
        self.dcs = dcs
        self.views: list[tuple[float, ClusterView]] = []
        self._new = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        gen = self.dcs.watch()
        try:
            async for view in gen:
                self.views.append((time.monotonic(), view))
                self._new.set()
        finally:
            await gen.aclose()  # type: ignore[attr-defined]

    @property
    def last(self) -> ClusterView | None:
        return self.views[-1][1] if self.views else None

    async def wait_for(
        self, pred: Callable[[ClusterView], bool], within: float = 1.0, after: int = 0
    ) -> tuple[float, ClusterView]:
        """The first view (from position ``after`` on) that satisfies ``pred``."""
        deadline = time.monotonic() + within
        pos = after
        while True:
            while pos < len(self.views):
                at, view = self.views[pos]
                pos += 1
                if pred(view):
                    return at, view
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no matching view within {within} s; last view: {self.last!r}"
                )
            if self.task.done():
                raise AssertionError(f"watch ended: {self.task!r}")
            self._new.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), remaining)

    async def stop(self) -> None:
        await stop_task(self.task)


@pytest.fixture
async def watchers() -> AsyncIterator[Callable[[DCS], Watcher]]:
    """``start(dcs) -> Watcher``; every watch started is stopped at teardown."""
    started: list[Watcher] = []

    def start(dcs: DCS) -> Watcher:
        w = Watcher(dcs)
        started.append(w)
        return w

    yield start
    for w in started:
        await w.stop()
