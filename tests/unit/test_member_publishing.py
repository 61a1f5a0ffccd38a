"""What a member costs the DCS: its member key is written only when a peer would act on what
changed, and its lease is renewed at the rate its role needs."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from events.dcs import Leader
from fsm.machine import Role
from fsm.snapshot import DataState, LeaseFacts, PgFacts
from pgsidecar.agent.membership import LSN_STEP_MAX
from tests.support.agent_fakes import Rig, peer, put, see


@pytest.fixture
async def rig(tmp_path: Path) -> Rig:
    r = Rig(tmp_path)
    r.dcs.ttl = 4.0
    return r


def at(rig: Rig, lsn: int, timeline: int = 1) -> None:
    st = rig.agent.state
    st.snapshot = replace(
        st.snapshot, pg=PgFacts(running=True, accepting=True, timeline=timeline, lsn=lsn)
    )


async def puts(rig: Rig) -> int:
    await asyncio.sleep(0.01)  # let the spawned writes run
    return len(rig.dcs.called("put_member"))


# -- the member key -------------------------------------------------------------------------------


async def test_a_position_moved_by_a_checkpoint_record_is_not_written(rig: Rig) -> None:
    put(rig, Role.MASTER, lease=LeaseFacts(held=True, term=3))
    members = rig.agent.members
    at(rig, 50_000_000)
    members.publish()
    assert await puts(rig) == 1
    # an idle master's WAL: a checkpoint record, a running-transactions snapshot
    for lsn in (50_000_120, 50_000_240, 50_000_400):
        at(rig, lsn)
        members.publish()
    assert await puts(rig) == 1, "records that carry no client write are not news"
    step = members.lsn_step()
    assert step == 1024 * 1024 // 8, "an eighth of the default maximum_lag_on_failover"
    at(rig, 50_000_000 + step)
    members.publish()
    assert await puts(rig) == 2, "a move the lag check can notice is written"
    assert rig.dcs.members["pg1"]["lsn"] == 50_000_000 + step


async def test_anything_else_a_peer_reads_is_written_at_once(rig: Rig) -> None:
    put(rig, Role.REPLICA)
    members = rig.agent.members
    at(rig, 1000)
    members.publish()
    at(rig, 1010, timeline=2)
    members.publish()
    assert await puts(rig) == 2, "a new timeline"
    put(rig, Role.CANDIDATE)
    at(rig, 1010, timeline=2)
    members.publish()
    assert await puts(rig) == 3, "a new role"
    assert [d["role"] for _, d in rig.dcs.called("put_member")] == [
        "replica",
        "replica",
        "candidate",
    ]


async def test_a_replica_that_reaches_the_masters_position_says_so(rig: Rig) -> None:
    rig.dcs.leader = Leader("pg2", 4)
    rig.dcs.members["pg2"] = peer("pg2", lsn=2000, timeline=1)
    put(rig, Role.REPLICA)
    see(rig)
    members = rig.agent.members
    at(rig, 1900)
    members.publish()
    at(rig, 1950)
    members.publish()
    assert await puts(rig) == 1, "still behind the master's published position: not news"
    at(rig, 2000)
    members.publish()
    assert await puts(rig) == 2, "caught up: `pgsidecar list` must show lag 0"
    at(rig, 2100)
    members.publish()
    assert await puts(rig) == 2, "past it by a checkpoint record: not news"


async def test_with_maximum_lag_on_failover_0_every_byte_is_news(tmp_path: Path) -> None:
    rig = Rig(tmp_path, maximum_lag_on_failover=0)
    put(rig, Role.MASTER, lease=LeaseFacts(held=True, term=3))
    members = rig.agent.members
    assert members.lsn_step() == 0
    for lsn in (1000, 1001, 1002):
        at(rig, lsn)
        members.publish()
    assert await puts(rig) == 3


async def test_the_step_is_capped(tmp_path: Path) -> None:
    rig = Rig(tmp_path, maximum_lag_on_failover=1 << 40)
    assert rig.agent.members.lsn_step() == LSN_STEP_MAX


async def test_a_failed_write_is_retried_on_the_next_publish(rig: Rig) -> None:
    from events.dcs import DCSError

    put(rig, Role.REPLICA)
    at(rig, 1000)
    rig.dcs.fail["put_member"] = DCSError("down")
    rig.agent.members.publish()
    await puts(rig)
    del rig.dcs.fail["put_member"]
    rig.agent.members.publish()
    assert await puts(rig) == 2


async def test_what_the_probe_saw_is_published_once_the_loop_has_it(rig: Rig) -> None:
    """The member key is what `switchover`, `list` and the peers' elections read: a replica's
    key must say it streams as soon as its agent knows, not one probe later."""
    from fsm.inputs import Input

    put(rig, Role.REPLICA)
    rig.pg.data = DataState.STANDBY
    rig.pg.write_config("standby", None, None)
    await rig.pg.start(timeout=1)
    await rig.agent.watch.probe_now()
    for kind, data in rig.posted():
        rig.agent.handle(Input(kind, rig.clock.monotonic(), data))
    await puts(rig)
    assert rig.dcs.members["pg1"]["streaming"] is False
    rig.pg.receiver_streaming = True
    await rig.agent.watch.probe_now()
    ((kind, data),) = rig.posted()
    assert kind == "pg" and data["receiver_streaming"] is True
    rig.agent.handle(Input(kind, rig.clock.monotonic(), data))
    await puts(rig)
    assert rig.dcs.members["pg1"]["streaming"] is True, "published with the facts it saw"
    before = await puts(rig)
    await rig.agent.watch.probe_now()
    assert rig.posted() == [] and await puts(rig) == before, "nothing new: nothing written"


# -- lease renewal cadence --------------------------------------------------------------------------


async def test_who_may_lead_renews_every_quarter_ttl_the_others_every_third(rig: Rig) -> None:
    renewal = rig.agent.renewal
    put(rig, Role.REPLICA)
    assert renewal.interval(down=False) == pytest.approx(4.0 / 3)
    assert renewal.interval(down=True) == pytest.approx(1.0), "the DCS's return seen as soon"
    put(rig, Role.CANDIDATE)
    assert renewal.interval(down=False) == pytest.approx(1.0)
    put(rig, Role.MASTER, lease=LeaseFacts(held=True, term=3))
    assert renewal.interval(down=False) == pytest.approx(1.0)
    put(rig, Role.DEMOTED, lease=LeaseFacts(held=True, term=3))
    assert renewal.interval(down=False) == pytest.approx(1.0), "still holds the lease"
    # a renewal that times out at ttl/4 still leaves another before the fence's deadline
    sent = 0.0
    deadline = renewal.fence_deadline(sent)
    assert sent + 2 * renewal.interval(down=False) + 0.5 < deadline


async def test_a_member_that_may_now_lead_renews_at_once(rig: Rig) -> None:
    rig.dcs.ttl = 1.2  # replica: every 0.4 s; candidate: every 0.3 s
    renewal = rig.agent.renewal
    put(rig, Role.REPLICA)
    task = asyncio.ensure_future(renewal.run())
    try:
        await asyncio.sleep(0.05)
        assert rig.dcs.called("renew_session") == []
        await asyncio.sleep(0.4)
        assert len(rig.dcs.called("renew_session")) == 1, "a replica at ttl/3"
        t_first = rig.agent.state.lease_sent
        await asyncio.sleep(0.32)  # past ttl/4 since the renewal, before ttl/3
        assert len(rig.dcs.called("renew_session")) == 1
        put(rig, Role.CANDIDATE)
        renewal.cadence_changed()
        await asyncio.sleep(0.02)
        assert len(rig.dcs.called("renew_session")) == 2, "renewed at once, not at ttl/3"
        assert rig.agent.state.lease_sent - t_first < 0.4
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"role": "replica", "lsn": 1}, {"role": "replica", "lsn": 2}),
        ({"role": "replica", "lsn": 1}, {"role": "master", "lsn": 1}),
        ({"role": "replica"}, {"role": "replica", "lsn": 2}),
        ({"role": "replica", "lsn": 1}, {"state": "replica", "lsn": 1}),
        ({"role": "replica", "tags": {"x": 1}}, {"role": "replica", "tags": {"x": 2}}),
        ({"role": "replica", "extra": None}, {"role": "replica", "lsn": None}),
    ],
)
def test_member_keys_compare_as_the_dicts_without_their_lsn(
    a: dict[str, object], b: dict[str, object]
) -> None:
    from pgsidecar.agent.membership import _equal_but_lsn

    def without_lsn(d: dict[str, object]) -> dict[str, object]:
        return {k: v for k, v in d.items() if k != "lsn"}

    assert _equal_but_lsn(a, b) is (without_lsn(a) == without_lsn(b))
    assert _equal_but_lsn(b, a) is (without_lsn(a) == without_lsn(b))
