"""Simulated-DCS fixtures: a factory of SimDCS clients of one SimStore per test.

The store runs on the test's ordinary asyncio loop, so its clock is ``loop.time()`` (real time):
the contract suite's expiry and latency bounds hold as they do for etcd and the Consul emulator.
No process is started. ``make_dcs.store`` is the SimStore, for tests that inject its faults.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Callable

import pytest

from pgsidecar.lab.sim.dcs import SimDCS, SimStore

# the simulated store grants any TTL from this up; small, so the contract suite's expiry tests
# take about a second
SIM_MIN_TTL = 1.0


@pytest.fixture
async def sim_dcs_factory() -> AsyncIterator[Callable[..., SimDCS]]:
    store = SimStore(random.Random(0), min_ttl=SIM_MIN_TTL)
    made: list[SimDCS] = []

    def make_dcs(cluster: str | None = None, **kwargs: object) -> SimDCS:
        dcs = store.client(cluster or f"c-{len(made) + 1}", **kwargs)  # type: ignore[arg-type]
        made.append(dcs)
        return dcs

    make_dcs.min_ttl = SIM_MIN_TTL  # type: ignore[attr-defined]
    make_dcs.store = store  # type: ignore[attr-defined]
    yield make_dcs
    for dcs in made:
        with contextlib.suppress(Exception):
            await dcs.close_session()
        await dcs.close()
