"""A scheduled switchover's time is checked before anything is written: in the past, not a finite
number, or further ahead than MAX_SWITCHOVER_DELAY is refused, and the DCS keeps no command."""

from __future__ import annotations

import time

import pytest

from events.dcs import Leader
from pgsidecar.ops import MAX_SWITCHOVER_DELAY, SwitchoverError, request_switchover
from tests.support.agent_fakes import FakeDCS, peer


def cluster() -> FakeDCS:
    dcs = FakeDCS()
    dcs.leader = Leader("pg1", 3)
    dcs.members["pg1"] = peer("pg1")
    dcs.members["pg2"] = peer("pg2", role="replica", streaming=True)
    return dcs


@pytest.mark.parametrize(
    "at, words",
    [
        (float("inf"), "out of range"),
        (float("nan"), "out of range"),
        (time.time() + MAX_SWITCHOVER_DELAY + 3600, "out of range"),
        (time.time() - 60, "in the past"),
    ],
    # ids that do not hold the time of collection: every collection (each worker's too) names
    # the same tests
    ids=["inf", "nan", "beyond-the-maximum-delay", "a-minute-ago"],
)
async def test_a_switchover_time_out_of_range_is_refused_and_nothing_written(
    at: float, words: str
) -> None:
    dcs = cluster()
    with pytest.raises(SwitchoverError, match=words):
        await request_switchover(dcs, "pg2", at=at)
    assert (await dcs.read_cluster()).switchover is None


async def test_a_switchover_within_range_is_written() -> None:
    dcs = cluster()
    at = time.time() + 3600
    cmd = await request_switchover(dcs, "pg2", at=at)
    assert cmd["at"] == at and (await dcs.read_cluster()).switchover == cmd
