"""The agent's loop, built entirely from in-memory ports: a whole life (init, bootstrap, master,
stop), an effect that raises, an effect cancelled by a lease loss, and the tasks beside it."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

from events.dcs import Leader
from fsm.inputs import Input
from fsm.machine import Effect, Role
from fsm.snapshot import DataState, LeaseFacts
from pgsidecar.agent.state import TaskSet
from pgsidecar.postgres.control import PostgresError
from tests.support.agent_fakes import Rig, peer, put, see


def transitions(rig: Rig) -> list[tuple[str, str, str]]:
    return [(r.body["from"], r.body["trigger"], r.body["to"]) for r in rig.sink.of("transition")]


async def until(cond: Any, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not cond():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_an_agent_of_in_memory_ports_bootstraps_leads_and_hands_off(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    run = asyncio.ensure_future(rig.agent.run())
    try:
        await until(lambda: rig.agent.state.role is Role.MASTER and not rig.agent.snapshot.busy)
        assert transitions(rig) == [
            ("init", "bootstrap", "init"),
            ("init", "start_replica", "replica"),
            ("replica", "leader_lost", "candidate"),
            ("candidate", "race", "candidate"),
            ("candidate", "won_lease", "master"),
        ]
        assert rig.dcs.leader is not None and rig.dcs.leader.name == "pg1"
        assert rig.pg.running and not rig.pg.in_recovery and rig.pg.timeline == 2
        assert rig.fence.armed_and_valid()
        # every record is stamped by the one recorder: seq strictly increasing, our term
        seqs = [r.seq for r in rig.sink.records]
        assert seqs == sorted(set(seqs))
        assert rig.sink.of("transition")[-1].term == rig.dcs.leader.term
        await until(lambda: rig.dcs.members.get("pg1", {}).get("role") == "master")
        rig.agent.request_stop()
        assert await asyncio.wait_for(run, 10) == 0
    finally:
        run.cancel()
    assert transitions(rig)[-1] == ("master", "shutdown", "demoted")
    assert rig.dcs.leader is None, "the hand-off released the key"
    assert not rig.pg.running and rig.fence.stopped
    assert rig.dcs.called("close_session")


async def test_an_effect_that_raises_posts_a_failure_and_frees_the_machine(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    rig.pg.fail["initdb"] = PostgresError("initdb: no space left on device")
    run = asyncio.ensure_future(rig.agent.run())
    try:
        await until(lambda: rig.agent.snapshot.failed_effect == "bootstrap")
        s = rig.agent.snapshot
        assert s.busy is None and s.retry_at is not None
        failed = [r.body for r in rig.sink.of("action") if r.body["name"] == "bootstrap"]
        assert failed[0]["outcome"] == "failed" and "no space" in failed[0]["error"]
        outcome = [
            r.body["data"]
            for r in rig.sink.of("input")
            if r.body["type"] == "effect" and r.body["data"]["name"] == "bootstrap"
        ]
        assert outcome[0]["ok"] is False
        assert rig.agent.state.last_error is not None
        # the initialize key went back, and the machine tries again after its back-off
        rig.pg.fail.clear()
        await until(lambda: rig.agent.state.role is Role.MASTER)
    finally:
        rig.agent.request_stop()
        await asyncio.wait_for(run, 10)


async def test_lease_lost_cancels_the_running_effect_and_fences(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.pg.data, rig.pg.timeline, rig.pg.lsn = DataState.PRIMARY_CLEAN, 2, 100
    rig.pg.write_config("primary", None, None)
    await rig.pg.start(timeout=1)
    rig.dcs.leader = Leader("pg1", 8)
    rig.dcs.members["pg1"] = peer("pg1")
    see(rig)
    put(rig, Role.MASTER, lease=LeaseFacts(held=True, term=8), pg=await rig.pg.probe())
    rig.fence.arm(1e12)
    rig.pg.start_gate = asyncio.Event()  # the restart below hangs in start()
    now = rig.clock.monotonic
    rig.agent.handle(Input("command", now(), {"name": "restart"}))
    assert rig.agent.snapshot.busy == Effect.RESTART_PG
    await until(lambda: rig.pg.called("start")[1:] != [])
    rig.agent.handle(Input("lease", now(), {"held": False, "term": None}))
    assert transitions(rig)[-1] == ("master", "lease_lost", "demoted")
    assert rig.agent.snapshot.busy == Effect.FENCE
    got: list[tuple[str, dict[str, Any]]] = []

    def fence_done() -> bool:
        got.extend(rig.posted())
        return any(t == "effect" for t, _ in got)

    await until(fence_done)
    await asyncio.sleep(0.05)
    got.extend(rig.posted())
    actions = {(r.body["name"], r.body["outcome"]) for r in rig.sink.of("action")}
    assert ("restart_pg", "cancelled") in actions
    outcomes = [d for t, d in got if t == "effect"]
    assert [o["name"] for o in outcomes] == [Effect.FENCE], "the cancelled restart posts nothing"
    assert rig.fence.deadline is None
    rig.pg.start_gate.set()
    await rig.agent.tasks.cancel_all()


async def test_every_task_beside_the_loop_is_kept_and_its_failure_observed() -> None:
    loop = asyncio.get_running_loop()
    unobserved: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: unobserved.append(ctx))
    tasks = TaskSet()

    async def boom() -> None:
        raise RuntimeError("side task failed")

    tasks.spawn(boom(), "boom")
    assert len(tasks) == 1, "referenced while it runs"
    await asyncio.sleep(0.01)
    assert len(tasks) == 0, "let go once it ended"
    gc.collect()
    assert unobserved == [], "its exception was retrieved (and logged)"

    blocked = asyncio.Event()
    waiting = tasks.spawn(blocked.wait(), "wait")
    await tasks.cancel_all()
    assert waiting.cancelled() and len(tasks) == 0


async def test_the_postmasters_exit_watch_is_a_kept_task(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.pg.data = DataState.STANDBY
    rig.pg.write_config("standby", None, None)
    await rig.pg.start(timeout=1)
    await rig.agent.watch.probe_now()
    waiter = rig.agent.watch._exit_waiter
    assert waiter is not None and waiter in rig.agent.tasks
    rig.posted()
    rig.pg.crash()
    await until(lambda: not rig.inbox.queue.empty())
    ((kind, data),) = rig.posted()
    assert kind == "pg" and data["crashed"] is True and data["running"] is False
    await asyncio.sleep(0)
    assert waiter.done() and waiter not in rig.agent.tasks


def test_the_agent_reads_time_only_through_its_clock() -> None:
    """A simulator runs the agent on virtual time: no part but the real Clock may import
    ``time`` (time.monotonic / time.time would bypass it)."""
    import ast

    package = Path(__file__).resolve().parents[2] / "pgsidecar" / "agent"
    for path in sorted(package.glob("*.py")):
        if path.name == "ports.py":  # SystemClock, the real Clock
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert "time" not in names, f"{path.name} imports time"
