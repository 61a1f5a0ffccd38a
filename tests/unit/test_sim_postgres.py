"""The simulator's model of PostgreSQL members: timelines, rewind, who may write, and when a
commit is acknowledged; all on virtual time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from fsm.snapshot import DataState
from pgsidecar.config import slot_name
from pgsidecar.lab.sim.clock import current_rng, derive_rng, run_simulation
from pgsidecar.lab.sim.invariants import Checker
from pgsidecar.lab.sim.postgres import (
    PORT,
    PgFaultPlan,
    PgWorld,
    SimClient,
    SimPostgres,
    contains,
)
from pgsidecar.postgres.control import PostgresError

T = TypeVar("T")


def sim(main: Callable[[], Coroutine[Any, Any, T]], seed: int = 1) -> T:
    return run_simulation(main, seed)


async def cluster(
    names: tuple[str, ...] = ("a", "b", "c"), sync: str = "", faults: PgFaultPlan | None = None
) -> tuple[PgWorld, list[SimPostgres]]:
    """A primary (the first name) and streaming standbys (the others), each with its slot."""
    world = PgWorld(derive_rng(current_rng()), faults=faults)
    primary = world.member(names[0])
    await primary.initdb()
    primary.write_config("primary", None, None, {"synchronous_standby_names": sync})
    await primary.start(60)
    await primary.ensure_roles()
    await primary.ensure_slots(set(names))
    members = [primary]
    for name in names[1:]:
        pg = world.member(name)
        await pg.basebackup(pg.replication_conninfo(primary.name, PORT))
        pg.write_config("standby", pg.replication_conninfo(primary.name, PORT), slot_name(name))
        await pg.start(60)
        members.append(pg)
    await asyncio.sleep(1)
    return world, members


def test_a_cluster_streams_and_a_standby_is_never_writable() -> None:
    async def main() -> dict[str, Any]:
        world, (a, b, c) = await cluster()
        client = SimClient(world)
        writer = asyncio.create_task(client.run())
        await asyncio.sleep(10)
        writer.cancel()
        await asyncio.sleep(1)
        with pytest.raises(PostgresError, match="does not accept writes"):
            await b.execute_write(100)
        facts_b = await b.probe()
        return {
            "writable": world.writable_members(),
            "committed_on": {x.member for x in client.commits},
            "n": len(client.commits),
            "b": facts_b,
            "b_has_all": not client.lost_by(b) and not client.lost_by(c),
        }

    r = sim(main)
    assert r["writable"] == ["a"]
    assert r["committed_on"] == {"a"} and r["n"] > 20
    assert r["b"].in_recovery and r["b"].receiver_streaming and r["b"].receiver_upstream == "a:5432"
    assert r["b_has_all"]


def test_promotion_raises_the_timeline_and_records_the_switch_point() -> None:
    async def main() -> dict[str, Any]:
        world, (a, b, c) = await cluster()
        client = SimClient(world)
        for _ in range(5):
            await client.write()
        await asyncio.sleep(1)
        a.crash()
        switch = b.data.wal.lsn if b.data else None
        await b.promote()
        b.write_config("primary", None, None)
        await b.ensure_slots({"a", "c"})
        c.write_config("standby", c.replication_conninfo("b", PORT), slot_name("c"))
        await c.reload()
        await asyncio.sleep(1)
        return {
            "b": await b.probe(),
            "history": await c.timeline_history(c.superuser_conninfo("b", PORT)),
            "switch": switch,
            "c": await c.probe(),
            "writable": world.writable_members(),
        }

    r = sim(main)
    assert r["b"].timeline == 2 and r["b"].in_recovery is False
    assert r["history"] == [(1, r["switch"])]
    # c had not received past the switch point: it follows b onto the new timeline
    assert r["c"].timeline == 2 and r["c"].receiver_upstream == "b:5432"
    assert r["writable"] == ["b"]


def promote_two_from_the_same_point(*, placeholders: bool) -> dict[str, Any]:
    """a dies; b and c hold the same WAL; b promotes (its lease then lost), then c promotes;
    d, still on timeline 1, follows c."""

    async def main() -> dict[str, Any]:
        world, (a, b, c, d) = await cluster(("a", "b", "c", "d"))
        checker = Checker(world, SimClient(world), on_violation=lambda v: None)
        a.crash()
        await b.promote()
        b.crash()  # fenced: its lease was lost
        if placeholders:
            assert c.next_timeline(1) == 2
            assert c.reserve_timelines(1, 3) == [2]
            assert c.next_timeline(1) == 3
        await c.promote()
        await c.ensure_slots({"b", "d"})
        d.write_config("standby", d.replication_conninfo("c", PORT), slot_name("d"))
        await d.reload()
        await asyncio.sleep(2)
        assert b.data is not None and c.data is not None and d.data is not None
        return {
            "b": b.data.wal.tli,
            "c": c.data.wal.tli,
            "d": await d.probe(),
            "d_files": sorted(d.data.history_files()),
            "violations": [v.message for v in checker.violations],
        }

    return sim(main)


def test_two_promotions_from_the_same_point_name_one_timeline_as_postgres_does() -> None:
    """The model picks a promotion's timeline as PostgreSQL does (one above the newest
    history file): both name 2, and the checker calls that a safety violation."""
    r = promote_two_from_the_same_point(placeholders=False)
    assert (r["b"], r["c"]) == (2, 2)
    assert r["violations"] == ["c named its new timeline 2, as b's promotion had named another one"]


def test_a_placeholder_history_file_makes_the_promotion_skip_its_number() -> None:
    r = promote_two_from_the_same_point(placeholders=True)
    assert (r["b"], r["c"]) == (2, 3)
    assert r["violations"] == []
    # d followed from timeline 1 and fetched every history file up to 3, the placeholder too
    assert r["d"].receiver_upstream == "c:5432" and r["d"].timeline == 3
    assert r["d_files"] == [2, 3]


def test_a_forked_former_primary_cannot_stream_until_rewound() -> None:
    async def main() -> dict[str, Any]:
        world, (a, b) = await cluster(("a", "b"))
        client = SimClient(world)
        await client.write()
        await asyncio.sleep(1)
        world.network.cut("a", "b")  # b stops receiving; a goes on writing on timeline 1
        for _ in range(5):
            await client.write()
        await b.promote()
        await b.ensure_slots({"a"})
        await a.stop("fast")
        forked = not contains(b.data.wal, a.data.wal) if a.data and b.data else None
        world.network.heal("a", "b")
        a.write_config("standby", a.replication_conninfo("b", PORT), slot_name("a"))
        await a.start(60)
        await asyncio.sleep(2)
        before = await a.probe()
        await a.stop("fast")
        result = await a.rewind(a.superuser_conninfo("b", PORT))
        again = await a.rewind(a.superuser_conninfo("b", PORT))
        cd = await a.controldata()
        await a.start(60)
        await asyncio.sleep(2)
        return {
            "forked": forked,
            "before": before,
            "result": result,
            "again": again,
            "cd": cd,
            "after": await a.probe(),
            "lost": len(client.lost_by(b)),
        }

    r = sim(main)
    assert r["forked"] is True
    assert r["before"].running and not r["before"].receiver_streaming
    assert r["result"] == "rewound" and r["again"] == "not_needed"
    assert r["cd"].data_state == DataState.STANDBY
    assert r["after"].receiver_streaming and r["after"].timeline == 2
    assert r["lost"] == 5  # what a wrote while cut off is gone (asynchronous mode)


def test_a_failed_rewind_raises_and_may_leave_the_data_unusable() -> None:
    async def main() -> tuple[str, DataState]:
        world, (a, b) = await cluster(
            ("a", "b"), faults=PgFaultPlan(rewind_failure=1.0, rewind_corrupts=1.0)
        )
        world.network.cut("a", "b")
        await SimClient(world).write()
        await b.promote()
        await a.stop("immediate")
        world.network.heal("a", "b")
        with pytest.raises(PostgresError, match="pg_rewind") as failed:
            await a.rewind(a.superuser_conninfo("b", PORT))
        return str(failed.value), (await a.controldata()).data_state

    _message, state = sim(main)
    assert state == DataState.INVALID


def test_a_fenced_or_stopped_member_refuses_writes_at_once() -> None:
    async def main() -> dict[str, Any]:
        world, (a, b) = await cluster(("a", "b"))
        assert a.writable
        assert a.fence() is True
        fenced_writable = a.writable
        with pytest.raises(PostgresError):
            await a.execute_write(10)
        code = await a.wait_exit()
        cd = await a.controldata()
        a.write_config("primary", None, None)
        await a.start(60)
        stopping = asyncio.create_task(a.stop("fast"))
        await asyncio.sleep(0)
        writable_while_stopping = a.writable
        await stopping
        return {
            "fenced_writable": fenced_writable,
            "code": code,
            "cd": cd.data_state,
            "writable_while_stopping": writable_while_stopping,
            "after_stop": (await a.controldata()).data_state,
            "fence_stopped": a.fence(),
        }

    r = sim(main)
    assert r["fenced_writable"] is False and r["code"] == -3
    assert r["cd"] == DataState.PRIMARY_CRASHED  # fenced = immediate shutdown: crashed
    assert r["writable_while_stopping"] is False
    assert r["after_stop"] == DataState.PRIMARY_CLEAN
    assert r["fence_stopped"] is False


def test_synchronous_commits_are_acknowledged_only_once_a_sync_standby_has_them() -> None:
    async def main() -> dict[str, Any]:
        world, (a, b) = await cluster(("a", "b"), sync='FIRST 1 ("b")')
        client = SimClient(world, timeout=1.0)
        held: list[bool] = []
        for _ in range(10):
            commit = await client.write()
            assert commit is not None
            held.append(b.has(commit))  # at the instant of the acknowledgement
        world.network.cut("a", "b")
        t0 = world.now()
        blocked = await client.write()
        waited = world.now() - t0
        acked_during_cut = len(client.commits)
        world.network.heal("a", "b")
        after = await client.write()
        return {
            "held": held,
            "blocked": blocked,
            "waited": waited,
            "acked_during_cut": acked_during_cut,
            "after": after is not None and b.has(after),
            "lost_by_b": client.lost_by(b),
        }

    r = sim(main)
    assert r["held"] == [True] * 10
    assert r["blocked"] is None and r["waited"] == pytest.approx(1.0, abs=0.1)
    assert r["acked_during_cut"] == 10
    assert r["after"] and r["lost_by_b"] == []


def test_asynchronous_commits_are_acknowledged_before_the_standby_has_them() -> None:
    async def main() -> tuple[int, int]:
        world, (a, b) = await cluster(("a", "b"))
        client = SimClient(world)
        world.network.cut("a", "b")
        for _ in range(5):
            assert await client.write() is not None
        a.crash()
        await b.promote()
        return len(client.commits), len(client.lost_by(b))

    acked, lost = sim(main)
    assert acked == 5 and lost == 5


def test_a_standby_cut_off_from_its_upstream_reports_the_stream_until_the_silence_limit() -> None:
    """As the real probe: the walreceiver of a standby cut off from a running upstream still
    says 'streaming', and the probe counts the stream until nothing has arrived for
    wal_receiver_timeout / 2 + the slack (here 2 s + 1 s), then names the upstream until the
    timeout ends the walreceiver (4 s). A crashed upstream closes the connection: no silence."""

    async def main() -> dict[str, Any]:
        world, (a, b, c) = await cluster()
        for pg in (b, c):
            pg.write_config(
                "standby",
                pg.replication_conninfo("a", PORT),
                slot_name(pg.name),
                {"wal_receiver_timeout": "4s"},
            )
            await pg.reload()
        await asyncio.sleep(1)
        loop = asyncio.get_running_loop()
        world.network.cut("a", "b")
        cut_at = loop.time()
        seen: list[tuple[float, bool, str | None]] = []
        while loop.time() < cut_at + 5:
            f = await b.probe()
            seen.append((round(loop.time() - cut_at, 2), f.receiver_streaming, f.receiver_upstream))
            await asyncio.sleep(0.25)
        world.network.heal("a", "b")
        await asyncio.sleep(1)
        healed = await b.probe()
        a.crash()
        await asyncio.sleep(0)
        return {"seen": seen, "healed": healed, "after_crash": await c.probe()}

    r = sim(main)
    streaming = [t for t, s, _u in r["seen"] if s]
    named = [t for t, _s, u in r["seen"] if u == "a:5432"]
    assert streaming and max(streaming) < 3.0 and min(t for t, s, _u in r["seen"] if not s) >= 3.0
    assert max(named) < 4.0 and all(u is None for t, _s, u in r["seen"] if t >= 4.0)
    assert r["healed"].receiver_streaming and r["healed"].receiver_upstream == "a:5432"
    assert not r["after_crash"].receiver_streaming


def test_streaming_needs_the_replication_role_and_the_slot() -> None:
    async def main() -> dict[str, Any]:
        world = PgWorld(derive_rng(current_rng()))
        a = world.member("a")
        await a.initdb()
        a.write_config("primary", None, None)
        await a.start(60)
        b = world.member("b")
        with pytest.raises(PostgresError, match="role"):
            await b.basebackup(b.replication_conninfo("a", PORT))
        await a.ensure_roles()
        await b.basebackup(b.replication_conninfo("a", PORT))
        b.write_config("standby", b.replication_conninfo("a", PORT), slot_name("b"))
        await b.start(60)
        await asyncio.sleep(1)
        without_slot = (await b.probe()).receiver_streaming
        await a.ensure_slots({"a", "b"})
        await asyncio.sleep(1)
        return {"without_slot": without_slot, "with_slot": (await b.probe()).receiver_streaming}

    r = sim(main)
    assert r == {"without_slot": False, "with_slot": True}


def test_the_same_seed_gives_the_same_world_trace() -> None:
    def run(seed: int) -> list[tuple[float, str]]:
        async def main() -> list[tuple[float, str]]:
            world, (a, b, c) = await cluster()
            client = SimClient(world)
            writer = asyncio.create_task(client.run())
            await asyncio.sleep(5)
            a.crash()
            await b.promote()
            await asyncio.sleep(1)
            writer.cancel()
            return world.trace

        return sim(main, seed)

    first = run(11)
    assert run(11) == first
    assert run(12) != first
