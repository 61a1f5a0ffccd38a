"""The simulated DCS on virtual time: leases expire on the virtual clock, and every fault kind of
FaultPlan (and of the store's own controls) is observable by a client as the agent would see it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from events.dcs.base import ClusterView, DCSError, SessionLost
from pgsidecar.lab.sim.clock import EPOCH, current_rng, derive_rng, run_simulation
from pgsidecar.lab.sim.dcs import NO_FAULTS, FaultPlan, SimDCS, SimStore

T = TypeVar("T")


def now() -> float:
    return round(asyncio.get_running_loop().time() - EPOCH, 6)


def sim(main: Callable[[], Coroutine[Any, Any, T]], seed: int = 1) -> T:
    return run_simulation(main, seed)


def new_store(faults: FaultPlan = NO_FAULTS) -> SimStore:
    return SimStore(derive_rng(current_rng()), faults=faults)


async def member(store: SimStore, name: str, ttl: float = 10.0) -> SimDCS:
    d = store.client("c", name)
    await d.connect()
    await d.open_session(ttl)
    return d


class Views:
    """Collects a client's watch() views in a task."""

    def __init__(self, dcs: SimDCS) -> None:
        self.views: list[tuple[float, ClusterView]] = []
        self.task = asyncio.create_task(self._run(dcs))

    async def _run(self, dcs: SimDCS) -> None:
        async for view in dcs.watch():
            self.views.append((now(), view))

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def test_a_lease_expires_on_virtual_time_with_its_keys() -> None:
    async def main() -> tuple[float, float, ClusterView]:
        store = new_store()
        observer = await member(store, "o", ttl=60)
        views = Views(observer)
        a = await member(store, "a", ttl=10)
        opened = now()
        await a.put_member("a", {"instance_id": "ia"})
        assert await a.acquire_leader("a") is not None
        await asyncio.sleep(30)
        held = next(i for i, (_t, v) in enumerate(views.views) if v.leader is not None)
        gone_at = next(t for t, v in views.views[held:] if v.leader is None)
        last = views.views[-1][1]
        await views.stop()
        with pytest.raises(SessionLost):
            await a.renew_session()
        return opened, gone_at, last

    opened, gone_at, last = sim(main)
    # the store heard the session's creation a request latency after `opened` was taken
    assert 10.0 - 0.01 <= gone_at - opened <= 10.0 + 0.05
    assert last.leader is None and "a" not in last.members


def test_request_error_is_a_dcs_error_and_changes_nothing() -> None:
    async def main() -> tuple[float, ClusterView, list[str]]:
        store = new_store(FaultPlan(request_error=1.0))
        d = store.client("c", "a")
        t0 = now()
        with pytest.raises(DCSError, match="answered with an error"):
            await d.put_config({"x": 1})
        elapsed = now() - t0
        store.faults = FaultPlan()
        view = await d.read_cluster()
        return elapsed, view, [kind for _t, kind, _what in store.trace]

    elapsed, view, kinds = sim(main)
    assert elapsed < 0.1  # an answer, not a timeout
    assert view.config is None
    assert kinds == ["fault"]


def test_request_timeout_hangs_past_the_callers_bound_and_is_not_applied() -> None:
    async def main() -> tuple[float, float, ClusterView]:
        store = new_store(FaultPlan(request_timeout=1.0))
        d = store.client("c", "a", request_timeout=1.5)
        t0 = now()
        with pytest.raises(DCSError, match="no answer within"):
            await d.put_config({"x": 1})
        elapsed = now() - t0
        store.faults = FaultPlan()
        return elapsed, d.timeout, await d.read_cluster()

    elapsed, bound, view = sim(main)
    assert elapsed == pytest.approx(bound) and bound == 1.5
    assert view.config is None


def test_a_lost_answer_is_an_error_to_the_caller_but_the_write_is_committed() -> None:
    async def main() -> tuple[Any, Any]:
        store = new_store(FaultPlan(lost_answer=1.0))
        a = store.client("c", "a")
        await a.connect()  # a read: its answer is never lost
        with pytest.raises(DCSError, match="connection lost"):
            await a.open_session(10)
        # the client has no session, though the store made one (it lapses at its TTL)
        assert a.session_ttl == 0 and len(store.sessions) == 1
        store.faults = FaultPlan()
        await a.open_session(10)
        store.faults = FaultPlan(lost_answer=1.0)
        with pytest.raises(DCSError, match="connection lost"):
            await a.acquire_leader("a")
        store.faults = FaultPlan()
        view = await a.read_cluster()
        # the retry of the acquire whose answer was lost confirms the key (the agent relies on it)
        again = await a.acquire_leader("a")
        return view.leader, again

    leader, again = sim(main)
    assert leader is not None and leader.name == "a"
    assert again == leader


def test_a_stall_times_callers_out_then_applies_their_requests_and_expires_late_leases() -> None:
    async def main() -> dict[str, Any]:
        store = new_store()
        a = await member(store, "a", ttl=3)
        b = store.client("c", "b", request_timeout=1.0)
        store.stall(5)
        t0 = now()
        with pytest.raises(DCSError, match="no answer"):
            await b.put_config({"during": "stall"})
        timed_out_after = now() - t0
        during = (dict(store.sessions), store.get(b.key("config")))
        await asyncio.sleep(5)
        after = await b.read_cluster()
        with pytest.raises(SessionLost):
            await a.renew_session()
        return {
            "timed_out_after": timed_out_after,
            "session_during": len(during[0]),
            "config_during": during[1],
            "config_after": after.config,
        }

    r = sim(main)
    assert r["timed_out_after"] == pytest.approx(1.0)
    # during the stall the lease (3 s) outlived its TTL and nothing was applied ...
    assert r["session_during"] == 1 and r["config_during"] is None
    # ... after it, the queued write is applied and the lease is gone
    assert r["config_after"] == {"during": "stall"}


def test_dropped_watch_streams_lose_no_change_and_keep_the_order() -> None:
    async def main() -> tuple[list[ClusterView], ClusterView, int]:
        store = new_store(FaultPlan(watch_drop=0.3))
        w = store.client("c", "w")
        views = Views(w)
        writer = store.client("c", "x")
        for i in range(40):
            await writer.put_config({"n": i})
            await asyncio.sleep(0.05)
        await asyncio.sleep(5)
        await views.stop()
        drops = sum(1 for _t, _k, what in store.trace if what.startswith("watch_drop"))
        return [v for _t, v in views.views], await writer.read_cluster(), drops

    views, fresh, drops = sim(main)
    assert drops > 0
    assert views[-1].config == fresh.config == {"n": 39}
    indexes = [v.index for v in views]
    assert indexes == sorted(indexes)
    seen = [v.config["n"] for v in views if v.config is not None]
    assert seen == sorted(seen)  # never back in time


def test_an_invalidated_session_raises_session_lost_on_the_next_renewal() -> None:
    async def main() -> tuple[ClusterView, ClusterView]:
        store = new_store()
        a = await member(store, "a")
        await a.put_member("a", {"instance_id": "ia"})
        assert await a.acquire_leader("a") is not None
        before = await a.read_cluster()
        store.faults = FaultPlan(session_invalidated=1.0)
        with pytest.raises(SessionLost):
            await a.renew_session()
        store.faults = FaultPlan()
        return before, await a.read_cluster()

    before, after = sim(main)
    assert before.leader is not None and "a" in before.members
    assert after.leader is None and after.members == {}


def test_a_member_cut_off_times_out_loses_its_lease_and_its_watch_resumes_after_healing() -> None:
    async def main() -> dict[str, Any]:
        store = new_store()
        a = await member(store, "a", ttl=4)
        b = await member(store, "b", ttl=60)
        assert await a.acquire_leader("a") is not None
        views = Views(a)
        await asyncio.sleep(0.5)
        store.cut("a")
        t0 = now()
        with pytest.raises(DCSError, match="cut off"):
            await a.renew_session()
        a_waited = now() - t0
        await b.put_config({"while": "cut"})  # others are unaffected
        seen_during = len(views.views)
        await asyncio.sleep(10)
        seen_still = len(views.views)
        b_view = await b.read_cluster()
        store.heal("a")
        await asyncio.sleep(3)
        with pytest.raises(SessionLost):
            await a.renew_session()
        last = views.views[-1][1]
        await views.stop()
        return {
            "a_waited": a_waited,
            "timeout": a.timeout,
            "quiet": seen_still == seen_during,
            "leader_after": b_view.leader,
            "last": last,
        }

    r = sim(main)
    assert r["a_waited"] == pytest.approx(r["timeout"])
    assert r["quiet"]  # nothing reaches a cut-off member's watch
    assert r["leader_after"] is None  # its lease lapsed on the store's side
    # after healing, its watch resumed and caught up with what it missed
    assert r["last"].config == {"while": "cut"} and r["last"].leader is None


def test_fault_episodes_are_drawn_from_the_seed() -> None:
    def run(seed: int) -> list[tuple[float, str, str]]:
        async def main() -> list[tuple[float, str, str]]:
            store = new_store(FaultPlan(stall_rate=0.02, cut_rate=0.02))
            clients = [await member(store, n, ttl=60) for n in ("a", "b", "c")]
            store.start_episodes([c.member for c in clients])
            await asyncio.sleep(600)
            await store.stop_episodes()
            return store.trace

        return sim(main, seed)

    first = run(5)
    kinds = {what.split()[0] for _t, kind, what in first if kind == "fault"}
    assert {"stall", "cut"} <= kinds
    assert run(5) == first
    assert run(6) != first
