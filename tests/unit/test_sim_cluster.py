"""The simulated-cluster harness and its invariant checkers, driven by a small scripted agent
(``ScriptedAgent``, below: a test double, not the real agent). A correct script survives a
seed's drawn faults; deliberately broken scripts make each checker fire."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from events.dcs.base import ClusterView, DCSError, SessionLost
from fsm.snapshot import DataState
from pgsidecar.config import slot_name
from pgsidecar.lab.sim.clock import (
    EPOCH,
    SimulationStalled,
    current_rng,
    derive_rng,
    run_simulation,
)
from pgsidecar.lab.sim.cluster import (
    NO_FAULT_MIX,
    Fault,
    FaultMix,
    MemberPorts,
    SimCluster,
    SimResult,
    replay,
    run_seeds,
)
from pgsidecar.lab.sim.invariants import Checker, InvariantViolation
from pgsidecar.lab.sim.postgres import PORT, PgWorld, SimClient
from pgsidecar.postgres.control import PostgresError

FENCE_MARGIN = 0.5


class ScriptedAgent:
    """A minimal HA agent for the harness's tests: every ``loop_wait`` it renews its session,
    reads the cluster, publishes its WAL position; the leader-key holder arms its fence from
    the renewal's send time and runs PostgreSQL as the primary; with no leader, the most advanced
    member with data races; the others follow the leader (rewinding, or recloning when rewind
    fails). Reads the model's WAL position directly (``postgres.wal``). Asynchronous replication
    only. The switches break it on purpose."""

    def __init__(
        self,
        name: str,
        ports: MemberPorts,
        *,
        never_fails_over: bool = False,
        promotes_without_lease_at: float | None = None,
    ) -> None:
        self.name = name
        self.ports = ports
        self.settings = ports.settings
        self.never_fails_over = never_fails_over
        self.promotes_without_lease_at = promotes_without_lease_at
        self.stopping = False
        self.renewed_at: float | None = None
        self.following: str | None = None
        self.not_streaming = 0
        self.steps = 0

    def request_stop(self) -> None:
        self.stopping = True

    async def run(self) -> None:
        while not self.stopping:
            self.steps += 1
            try:
                await self.step()
            except (DCSError, PostgresError):
                pass
            await asyncio.sleep(self.settings.loop_wait)

    # -- one step ---------------------------------------------------------------------------------
    async def renew(self) -> bool:
        dcs, clock = self.ports.dcs, self.ports.clock
        sent = clock.monotonic()
        try:
            if dcs.session_ttl == 0:
                await dcs.connect()
                await dcs.open_session(self.settings.ttl)
            else:
                await dcs.renew_session()
        except SessionLost:
            sent = clock.monotonic()
            await dcs.open_session(self.settings.ttl)
        self.renewed_at = sent
        return True

    def arm(self) -> None:
        assert self.renewed_at is not None
        ttl = self.settings.ttl
        self.ports.fence.arm(self.renewed_at + ttl * (1 - self.settings.clock_drift) - FENCE_MARGIN)

    def position(self) -> int:
        wal = self.ports.postgres.wal
        return wal.lsn if wal is not None else 0

    async def step(self) -> None:
        dcs, pg = self.ports.dcs, self.ports.postgres
        renewed = await self.renew()
        view = await dcs.read_cluster()
        await dcs.put_member(self.name, {"lsn": self.position(), "data": pg.data is not None})
        if self.promotes_without_lease_at is not None:
            if self.ports.clock.monotonic() - EPOCH >= self.promotes_without_lease_at:
                facts = await pg.probe()
                if facts.in_recovery:
                    self.ports.fence.arm(self.ports.clock.monotonic() + 3600)
                    await pg.promote()
                    return
        if view.initialize is None:
            if pg.data is None and await dcs.try_initialize(self.name):
                await pg.initdb()
            return
        leader = view.leader
        if leader is not None and leader.name == self.name:
            if await dcs.acquire_leader(self.name) is None:
                await self.step_down()  # the key is a previous incarnation's: wait for it
                return
            if renewed:
                self.arm()
                await self.lead()
        elif leader is None:
            if self.may_race(view) and await dcs.acquire_leader(self.name) is not None:
                self.arm()
                await self.lead()
        else:
            await self.follow(leader.name)

    def may_race(self, view: ClusterView) -> bool:
        pg = self.ports.postgres
        if pg.data is None or pg.data.invalid:
            return False
        mine = self.position()
        if self.never_fails_over and pg.data.wal.lsn > 0x1000000:
            return False  # races only to bootstrap (nothing written yet)
        others = [int(m.get("lsn", 0)) for n, m in view.members.items() if n != self.name]
        return mine >= max(others, default=0)

    async def step_down(self) -> None:
        pg = self.ports.postgres
        if pg.running and pg.writable:
            await pg.stop("immediate")
        if not pg.writable:
            self.ports.fence.disarm()

    async def lead(self) -> None:
        pg = self.ports.postgres
        if pg.data is None:
            return
        if not pg.running:
            cd = await pg.controldata()
            if cd.data_state == DataState.STANDBY:
                pg.write_config("standby", None, None)
                await pg.start(60)
                await pg.promote(30)
            else:
                pg.write_config("primary", None, None)
                await pg.start(60)
        elif (await pg.probe()).in_recovery:
            await pg.promote(30)
        pg.write_config("primary", None, None)
        self.following = None
        await pg.ensure_roles()
        await pg.ensure_slots(set(self.settings.members))

    async def follow(self, leader: str) -> None:
        pg = self.ports.postgres
        await self.step_down()
        upstream = pg.replication_conninfo(leader, PORT)
        if pg.data is None:
            await pg.basebackup(upstream)
        elif pg.data.invalid:
            await pg.wipe_data()
            return
        if pg.running and self.following == leader:
            facts = await pg.probe()
            self.not_streaming = 0 if facts.receiver_streaming else self.not_streaming + 1
            if self.not_streaming < 5:
                return
        if pg.running:
            await pg.stop("fast")
        try:
            await pg.rewind(pg.superuser_conninfo(leader, PORT))
        except PostgresError:
            if (await pg.controldata()).data_state == DataState.INVALID:
                await pg.wipe_data()
            return
        pg.write_config("standby", upstream, slot_name(self.name))
        await pg.start(60)
        self.following, self.not_streaming = leader, 0


def scripted(name: str, ports: MemberPorts) -> ScriptedAgent:
    return ScriptedAgent(name, ports)


def never_fails_over(name: str, ports: MemberPorts) -> ScriptedAgent:
    return ScriptedAgent(name, ports, never_fails_over=True)


def promotes_without_lease(name: str, ports: MemberPorts) -> ScriptedAgent:
    # every standby promotes itself 60 virtual seconds in, without the leader key
    return ScriptedAgent(name, ports, promotes_without_lease_at=60.0)


def run(seed: int, **kwargs: Any) -> SimResult:
    kwargs.setdefault("agent_factory", scripted)
    return SimCluster(seed, **kwargs).run()


# -- a correct agent --------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "members"), [(1, 3), (2, 5)])
def test_a_correct_agent_survives_a_seeds_drawn_faults(seed: int, members: int) -> None:
    result = run(seed, members=members, duration=600.0)
    assert result.ok, result.violation
    assert sum(result.faults.values()) >= 20 and len(result.faults) >= 6
    assert result.virtual_seconds == pytest.approx(600.0 + 2.0, abs=0.1)  # + the stop grace
    assert result.commits > 200
    assert result.converged_after is not None


def test_the_same_seed_gives_the_same_trace_byte_for_byte() -> None:
    def trace(seed: int) -> tuple[str, ...]:
        result = run(seed, members=3, duration=300.0, keep_trace=True)
        assert result.trace is not None
        return result.trace

    first = trace(7)
    assert len(first) > 300
    assert trace(7) == first
    assert trace(8) != first


# -- each checker catches its violation -------------------------------------------------------------


def test_promoting_without_the_lease_is_caught_by_the_safety_check() -> None:
    result = run(3, members=3, fault_plan=NO_FAULT_MIX, duration=200.0,
                 agent_factory=promotes_without_lease)  # fmt: skip
    assert result.violation is not None and result.violation.invariant == "safety"
    assert "accept writes" in result.violation.message
    assert result.violation.at == pytest.approx(60.0, abs=2.0)
    assert any("promoted" in line for line in result.violation.trace)


def test_an_agent_that_never_fails_over_is_caught_by_the_liveness_check() -> None:
    kill = Fault(40.0, "agent_kill", ("@master",), 30.0)
    ok = run(4, members=3, fault_plan=[kill], duration=300.0)
    assert ok.ok, ok.violation  # the correct script fails over and converges
    result = run(4, members=3, fault_plan=[kill], duration=300.0, agent_factory=never_fails_over)
    assert result.violation is not None and result.violation.invariant == "liveness"
    assert "0 members accept writes" in result.violation.message


def loss_scenario() -> list[Fault]:
    """The master is cut from both replicas for a while, writes on, then its agent is killed:
    the replica that takes over never had the last commits."""
    return [
        Fault(30.0, "net_cut", ("@master", "@other1"), 60.0),
        Fault(30.0, "net_cut", ("@master", "@other2"), 60.0),
        Fault(36.0, "agent_kill", ("@master",), 60.0),
    ]


def test_a_lost_acknowledged_commit_in_synchronous_mode_is_caught_by_the_durability_check() -> None:
    # the scripted agent replicates asynchronously: in synchronous mode that is a violation
    result = run(5, members=3, synchronous_mode="on", fault_plan=loss_scenario(), duration=300.0)
    assert result.violation is not None and result.violation.invariant == "durability"
    assert "synchronous mode on" in result.violation.message
    assert result.lost_commits >= 3


def test_the_same_loss_in_asynchronous_mode_is_reported_and_bounded() -> None:
    result = run(5, members=3, synchronous_mode="off", fault_plan=loss_scenario(), duration=300.0)
    assert result.ok, result.violation
    assert result.lost_commits >= 3 and 0 < result.lost_bytes < 1024 * 1024
    small = run(5, members=3, fault_plan=loss_scenario(), duration=300.0,
                maximum_lag_on_failover=100)  # fmt: skip
    assert small.violation is not None and small.violation.invariant == "durability"
    assert "maximum_lag_on_failover (100)" in small.violation.message


def test_writes_after_the_fencing_deadline_or_without_one_are_safety_violations() -> None:
    async def main() -> list[str]:
        world = PgWorld(derive_rng(current_rng()))
        client = SimClient(world)
        checker = Checker(world, client, on_violation=lambda v: None)
        a = world.member("a")
        await a.initdb()
        a.write_config("primary", None, None)
        await a.start(60)
        await client.write()  # no deadline armed
        now = world.now()
        checker.fencing_deadline("a", now + 5)
        await client.write()  # within it: fine
        await asyncio.sleep(6)
        await client.write()  # past it
        return [v.message for v in checker.violations]

    messages = run_simulation(main, 1)
    assert len(messages) == 2
    assert "no fencing deadline" in messages[0]
    assert "after its fencing deadline" in messages[1]


def test_an_unchecked_violation_raises_with_the_trace() -> None:
    async def main() -> None:
        world = PgWorld(derive_rng(current_rng()))
        Checker(world, SimClient(world), trace=lambda: ["one", "two"])
        for name in ("a", "b"):
            pg = world.member(name)
            await pg.initdb()
            pg.write_config("primary", None, None)
            await pg.start(60)

    with pytest.raises(InvariantViolation, match="2 members accept writes") as raised:
        run_simulation(main, 1)
    assert raised.value.violation.trace == ("one", "two")


# -- kill, restart, pause ---------------------------------------------------------------------------


class Ticker:
    """Counts its steps (in the run task and in a task of its own) and holds a session."""

    made: list[Ticker] = []

    def __init__(self, name: str, ports: MemberPorts) -> None:
        self.name, self.ports = name, ports
        self.ticks: list[float] = []
        self.side: list[float] = []
        Ticker.made.append(self)

    def request_stop(self) -> None:
        pass

    async def _side(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.side.append(self.ports.clock.monotonic() - EPOCH)

    async def run(self) -> None:
        asyncio.create_task(self._side())  # noqa: RUF006 (the harness holds the agent's tasks)
        await self.ports.dcs.connect()
        await self.ports.dcs.open_session(5.0)
        while True:
            self.ticks.append(self.ports.clock.monotonic() - EPOCH)
            try:
                await self.ports.dcs.renew_session()
            except DCSError:
                pass
            await asyncio.sleep(1.0)


def test_a_paused_agent_runs_nothing_until_resumed_and_a_killed_one_is_replaced() -> None:
    Ticker.made.clear()
    faults = [Fault(10.0, "agent_pause", ("m1",), 20.0), Fault(50.0, "agent_kill", ("m1",), 5.0)]
    result = SimCluster(1, 1, fault_plan=faults, duration=80.0, agent_factory=Ticker,
                        writes_need_deadline=False, keep_trace=True).run()  # fmt: skip
    first, second = Ticker.made
    during = [t for t in first.ticks + first.side if 10.0 < t < 30.0]
    assert during == []
    assert any(30.0 <= t < 31.5 for t in first.ticks)  # resumed at the end of the pause
    assert max(first.ticks + first.side) < 50.0  # killed: nothing of it runs again
    assert second.ticks and min(second.ticks) >= 55.0
    trace = "\n".join(result.trace or ())
    assert "dcs session expired m1 #1" in trace  # paused past its TTL
    assert "agent m1 #2 started" in trace


class SpinsAfterAWhile(ScriptedAgent):
    """The scripted agent, except that m2 stops waiting 30 virtual seconds in: it loops on
    ``asyncio.sleep(0)``, which no timeout of the test run could interrupt."""

    async def run(self) -> None:
        if self.name != "m2":
            await super().run()
            return
        await asyncio.sleep(30.0)
        while True:  # noqa: ASYNC110 (the busy loop is the point)
            await asyncio.sleep(0)


def test_a_seed_whose_agent_spins_ends_with_an_error_naming_the_seed() -> None:
    with pytest.raises(SimulationStalled, match=r"seed 5: .* at virtual time 30\.0+ s.*3 members"):
        SimCluster(
            5, 3, fault_plan=NO_FAULT_MIX, duration=100.0, agent_factory=SpinsAfterAWhile
        ).run()


def test_a_seed_past_its_wall_clock_budget_ends_with_an_error_naming_the_seed() -> None:
    cluster = SimCluster(6, 3, duration=600.0, agent_factory=scripted, wall_budget=0.05)
    with pytest.raises(SimulationStalled, match=r"seed 6: .*over its budget.*3 members"):
        cluster.run()
    assert SimCluster(6, duration=600.0, agent_factory=scripted).wall_budget == 300.0
    assert SimCluster(6, duration=7200.0, agent_factory=scripted).wall_budget == 3600.0


# -- many seeds, replay -----------------------------------------------------------------------------


def test_run_seeds_in_two_workers_and_replay_one() -> None:
    mix = FaultMix(count=(5, 8))
    report = run_seeds(range(4), [3, 5], "off", mix, scripted, jobs=2, duration=200.0)
    assert [r.seed for r in report.results] == [0, 1, 2, 3]
    assert [r.members for r in report.results] == [3, 5, 3, 5]
    assert report.failures == [], [str(r.violation) for r in report.failures]
    assert report.virtual_seconds > 4 * 200 and report.simulated_per_wall_second > 0
    alone = run(1, members=5, fault_plan=mix, duration=200.0)
    assert alone.commits == report.results[1].commits  # a worker's run is the same run
    lines: list[str] = []
    replayed = replay(1, 5, "off", mix, scripted, duration=200.0, out=lines.append)
    assert replayed.commits == alone.commits
    assert lines[-1] == "seed 1: ok" and len(lines) > 100


# -- the real agent's replay check ------------------------------------------------------------------


def test_the_replay_check_of_a_new_run_starts_at_its_start_input() -> None:
    from fsm.records import Record
    from pgsidecar.lab.sim.agent import unchecked_run

    def rec(kind: str, seq: int, body: dict[str, Any]) -> Record:
        return Record(kind, "sim", "m1", seq, 0.0, None, body)  # type: ignore[arg-type]

    first_run = [
        rec("input", 1, {"type": "start", "now": 0.0, "data": {}}),
        rec("input", 2, {"type": "timer", "now": 1.0, "data": {}}),
    ]
    action = rec("action", 3, {"name": "open_session", "outcome": "ok"})
    second_start = rec("input", 4, {"type": "start", "now": 5.0, "data": {}})
    records = [*first_run, action, second_start]
    assert unchecked_run(records, 0) == 0
    assert unchecked_run(records, 2) == 3  # actions before the new start are not compared
    # an input between what was checked and the next start: the whole journal again
    stray = rec("input", 3, {"type": "timer", "now": 2.0, "data": {}})
    assert unchecked_run([*first_run, stray, second_start], 2) == 0
