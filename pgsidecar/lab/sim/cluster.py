"""A simulated cluster: one agent per member on the virtual loop, the DCS store, PostgreSQL
models, a network, a writing client, a schedule of faults drawn from the seed, and the
invariant checkers watching all of it.

The agent is whatever ``agent_factory(member_name, ports)`` returns: an object with ``async
run()`` and ``request_stop()``. It sees only its :class:`MemberPorts`: its own DCS client, its
PostgreSQL, its clock and its fence hook (plus the cluster's settings).

Agent kill, restart and pause. Every task an agent creates runs in a context that names its
incarnation; the loop's task factory wraps each such task so that it can be held:

* **kill**: every task of the incarnation is cancelled, its PostgreSQL crashes (the postmaster
  dies with its agent), its DCS client closes (its session lives on until its TTL), its fence
  hook stops (the postmaster it guarded is gone);
* **restart**: a fresh agent from the factory, with a fresh DCS client and fence hook, on the same
  data directory and clock;
* **pause** (SIGSTOP, a long GC pause): none of the incarnation's tasks runs until the pause
  ends. A task that was waiting (a sleep, a DCS answer, PostgreSQL) finds its wait over but is
  held before it resumes, so its timers do not act and the answers it gets arrive late; requests
  it had already sent are applied by the store meanwhile. The fence hook keeps running (it is
  the fence process's model, a separate process). What this misses: plain loop callbacks an
  agent schedules itself (``loop.call_later``) still fire during the pause; a pause cannot stop
  an agent between two awaits (it is a process stopped at an await point, never mid-step).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import heapq
import itertools
import time
from collections.abc import Callable, Coroutine, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from events.dcs import DCS
from events.tasks import bounded
from pgsidecar.agent.ports import Clock
from pgsidecar.lab.sim.clock import (
    EPOCH,
    SimulationStalled,
    VirtualEventLoop,
    derive_rng,
    run_simulation,
)
from pgsidecar.lab.sim.dcs import MAX_REQUEST_TIMEOUT, NO_FAULTS, FaultPlan, SimDCS, SimStore
from pgsidecar.lab.sim.invariants import Checker, LivenessBound, Violation
from pgsidecar.lab.sim.postgres import PgFaultPlan, PgTimings, PgWorld, SimClient, SimPostgres

CLUSTER = "sim"
# real seconds one seed may take before the watchdog ends it (SimulationStalled): a seed of ten
# virtual minutes takes a few seconds, tens on a loaded machine; past this it is stuck, not slow.
# Longer runs get half a real second per virtual second.
DEFAULT_WALL_BUDGET = 300.0
# the virtual wall clock's value when a simulation starts (2025-01-01T00:00:00Z)
WALL_EPOCH = 1_735_689_600.0
# The simulator's lease TTL, deliberately not the agent's default (fsm.snapshot.DEFAULT_TTL):
# fault durations are multiples of it, so every seed recorded in docs/simulation.md (the
# regressions, the mutants, the deep searches) was found and replays at 10 s, and `lab sim` has
# no --ttl to give a recorded seed another one.
SIM_TTL = 10.0


# -- what an agent is given ---------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterSettings:
    """The cluster-wide settings an agent needs from its configuration."""

    cluster: str
    members: tuple[str, ...]
    ttl: float
    loop_wait: float
    synchronous_mode: str  # off | on | strict
    maximum_lag_on_failover: int
    clock_drift: float  # the bound of the clock rate difference an agent must allow for


class SimClock:
    """``monotonic()`` is the loop's time (what asyncio's timers run on); ``wall()`` is a
    virtual wall clock: a fixed epoch plus elapsed virtual time at this member's ``rate``
    (1 +- the drawn skew, within the cluster's clock_drift bound)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, rate: float = 1.0) -> None:
        self._loop = loop
        self.rate = rate

    def monotonic(self) -> float:
        return self._loop.time()

    def wall(self) -> float:
        return WALL_EPOCH + (self._loop.time() - EPOCH) * self.rate


class SimFence:
    """The fence hook (the watchdog's interface). ``arm(deadline)`` (loop time) tells the
    checker and fences the member's PostgreSQL at the deadline unless moved or disarmed;
    ``on_fired`` (set by the agent, optional) is called after a fencing, as the real watchdog's
    is (after the pause, if the agent is paused)."""

    def __init__(
        self, member: str, pg: SimPostgres, checker: Checker, incarnation: Incarnation
    ) -> None:
        self.member = member
        self._pg = pg
        self._checker = checker
        self._incarnation = incarnation
        self._loop = asyncio.get_running_loop()
        self.deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = False
        self.fired_count = 0
        self.on_fired: Callable[[], None] | None = None

    def arm(self, deadline: float) -> None:
        if self._stopped:
            return
        self.deadline = deadline
        # a master re-arms on every renewal, each time a little later: the timer already set
        # for an earlier deadline stays and, when it fires, moves on to the current one
        if self._timer is not None and self._timer.when() > deadline:
            self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._fire)
        self._checker.fencing_deadline(self.member, deadline)

    def disarm(self) -> None:
        self.deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._stopped:
            self._checker.fencing_deadline(self.member, None)

    @property
    def device_state(self) -> str | None:
        """No watchdog device is modelled."""
        return None

    def can_lead(self) -> bool:
        return not self._stopped

    def armed_and_valid(self) -> bool:
        return self.deadline is not None and self._loop.time() < self.deadline

    def postmaster_started(self) -> None:
        """Nothing to pass on: the model fences whichever postmaster runs."""

    def fence(self) -> bool:
        return self._pg.fence()

    def stop(self) -> None:
        self.disarm()
        self._stopped = True

    def _fire(self) -> None:
        self._timer = None
        if self.deadline is None:
            return
        if self._loop.time() < self.deadline:
            self._timer = self._loop.call_at(self.deadline, self._fire)
            return
        self.fired_count += 1
        self._pg.world.record(f"{self.member} fence fired (deadline reached)")
        self._pg.fence()
        if self.on_fired is not None:
            self._incarnation.call_soon_unpaused(self.on_fired)


@dataclass
class MemberPorts:
    """What one agent is given: its DCS client, its PostgreSQL, its clock, its fence hook, and
    ``violation(invariant, message)`` for what only the agent's side can check (its replay).
    The DCS client and the clock are the agent's ports: the simulator gives a SimDCS and a
    SimClock, ``bench scale`` the real etcd adapter and the system clock."""

    name: str
    dcs: DCS
    postgres: SimPostgres
    clock: Clock
    fence: SimFence
    settings: ClusterSettings
    violation: Callable[[str, str], None] = lambda invariant, message: None


class SimAgent(Protocol):
    async def run(self) -> None: ...

    def request_stop(self) -> None: ...


AgentFactory = Callable[[str, MemberPorts], SimAgent]


# -- holding an agent's tasks -------------------------------------------------------------------

# an incarnation's list of tasks is pruned of finished ones when it reaches this length, or
# twice what the last pruning left
PRUNE_AT_LEAST = 64

_incarnation: contextvars.ContextVar[Incarnation | None] = contextvars.ContextVar(
    "sim_incarnation", default=None
)


class Incarnation:
    """One run of one member's agent: its tasks, and whether they are held (paused)."""

    def __init__(self, member: str, number: int) -> None:
        self.member = member
        self.number = number
        self.tasks: list[asyncio.Task[Any]] = []  # finished ones too, until the next pruning
        self.prune_at = PRUNE_AT_LEAST
        self.paused = False
        self.killed = False
        self._held: list[asyncio.Future[None]] = []
        self._deferred: list[Callable[[], None]] = []

    def hold(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._held.append(fut)
        return fut

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        held, self._held = self._held, []
        for fut in held:
            if not fut.done():
                fut.set_result(None)
        deferred, self._deferred = self._deferred, []
        for callback in deferred:
            callback()

    def call_soon_unpaused(self, callback: Callable[[], None]) -> None:
        if self.killed:
            return
        if self.paused:
            self._deferred.append(callback)
        else:
            asyncio.get_running_loop().call_soon(callback)

    def kill(self) -> None:
        self.killed = True
        self._deferred.clear()
        for task in self.tasks:
            task.cancel()
        self.resume()  # held tasks take their cancellation now


class _Gated:
    """Drives a coroutine step by step; before each step, waits while its incarnation is
    paused. A cancellation passes through at once (a kill does not wait for a pause to end)."""

    __slots__ = ("_coro", "_incarnation")

    def __init__(self, coro: Coroutine[Any, Any, Any], incarnation: Incarnation) -> None:
        self._coro = coro
        self._incarnation = incarnation

    def __await__(self) -> Generator[Any, None, Any]:
        coro, inc = self._coro, self._incarnation
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                yielded = coro.send(value) if error is None else coro.throw(error)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            try:
                value = yield yielded
            except BaseException as exc:  # a cancellation thrown in by the task
                error = exc
                continue
            while inc.paused:
                try:
                    yield from inc.hold().__await__()
                except BaseException as exc:
                    error = exc
                    break


async def _gated(coro: Coroutine[Any, Any, Any], incarnation: Incarnation) -> Any:
    return await _Gated(coro, incarnation)


def _task_factory(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, Any],
    context: contextvars.Context | None = None,
) -> asyncio.Task[Any]:
    incarnation = context.get(_incarnation) if context is not None else _incarnation.get()
    if incarnation is None:
        return asyncio.Task(coro, loop=loop, context=context)
    task = asyncio.Task(_gated(coro, incarnation), loop=loop, context=context)
    # a task cancelled before its first step (a kill right after an effect was spawned) never
    # starts ``coro``: close it, or the collector warns that it was never awaited. A no-op
    # for a coroutine that ran; the callback runs after the task's own, changing no order.
    task.add_done_callback(lambda _task: coro.close())
    tasks = incarnation.tasks
    tasks.append(task)
    if len(tasks) >= incarnation.prune_at:
        # finished tasks are dropped when the list has doubled, not on every new task (an agent
        # starts a few per input): the same list in the same order, at a constant cost per task
        incarnation.tasks = tasks = [t for t in tasks if not t.done()]
        incarnation.prune_at = max(PRUNE_AT_LEAST, 2 * len(tasks))
    return task


def use_incarnation_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Make every task started inside an incarnation (``start_incarnation``) belong to it, so
    that ``Incarnation.kill`` and ``pause`` reach all of them."""
    loop.set_task_factory(_task_factory)  # type: ignore[arg-type]


def start_incarnation(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], incarnation: Incarnation
) -> asyncio.Task[Any]:
    """Run ``coro`` as ``incarnation``'s first task: with ``use_incarnation_tasks`` on the loop,
    it and every task it starts are held by a pause and cancelled by a kill."""
    context = contextvars.copy_context()
    context.run(_incarnation.set, incarnation)
    return loop.create_task(coro, context=context)


# -- faults -------------------------------------------------------------------------------------

FAULT_KINDS = (
    "dcs_flaky",  # a window of request errors, timeouts, lost answers, dropped watch streams
    "dcs_stall",  # the whole store stops answering
    "dcs_cut",  # one member cannot reach the store
    "session_invalidated",  # one member's session dropped by the store
    "net_cut",  # two members cannot talk
    "net_isolate",  # one member reaches no other member and no client
    "pg_crash",  # one member's postmaster dies
    "pg_flaky",  # a window of start, promote, rewind and basebackup failures
    "slow_ops",  # a window of slow start, stop and promote
    "agent_kill",  # one member's agent is killed (its postmaster dies with it), restarted later
    "agent_pause",  # one member's agent is stopped (SIGSTOP, a GC pause), resumed later
)


@dataclass(frozen=True)
class Fault:
    """One fault: ``at`` virtual seconds after the start, on ``members`` (none for store-wide
    ones), lasting ``duration`` (0 for instant ones: a crash, an invalidated session)."""

    at: float
    kind: str
    members: tuple[str, ...] = ()  # names, or @master / @other1 / @other2 ... (at injection)
    duration: float = 0.0

    @property
    def heals_at(self) -> float:
        return self.at + self.duration

    def __str__(self) -> str:
        on = f" {'-'.join(self.members)}" if self.members else ""
        lasting = f" for {self.duration:.3f}s" if self.duration else ""
        return f"{self.kind}{on}{lasting}"


@dataclass(frozen=True)
class FaultMix:
    """How a seed draws its faults: ``count`` of them, of the kinds weighted by ``weights``,
    starting uniformly in the fault window; durations in units of the TTL where a fault is
    meant to outlast a lease (stalls, cuts, pauses), in seconds otherwise."""

    count: tuple[int, int] = (20, 40)
    weights: Mapping[str, float] = field(
        default_factory=lambda: {
            "dcs_flaky": 1.0,
            "dcs_stall": 1.0,
            "dcs_cut": 1.5,
            "session_invalidated": 0.5,
            "net_cut": 1.5,
            "net_isolate": 1.0,
            "pg_crash": 1.5,
            "pg_flaky": 0.5,
            "slow_ops": 0.5,
            "agent_kill": 1.5,
            "agent_pause": 1.5,
        }
    )
    ttl_multiple: tuple[float, float] = (0.2, 2.5)  # stalls, DCS cuts, pauses, kills
    window: tuple[float, float] = (1.0, 30.0)  # network cuts and flaky windows
    dcs_flaky: FaultPlan = FaultPlan(
        request_error=0.05, request_timeout=0.02, lost_answer=0.02, watch_drop=0.05
    )
    pg_flaky: PgFaultPlan = PgFaultPlan(
        start_failure=0.2,
        promote_failure=0.2,
        rewind_failure=0.3,
        rewind_corrupts=0.3,
        basebackup_failure=0.2,
    )
    slow: float = 0.5

    def draw(
        self, rng: Any, members: Sequence[str], ttl: float, start: float, end: float
    ) -> list[Fault]:
        kinds = [k for k in FAULT_KINDS if self.weights.get(k, 0) > 0]
        weights = [self.weights[k] for k in kinds]
        faults = []
        for _ in range(rng.randint(*self.count)):
            kind = rng.choices(kinds, weights)[0]
            at = round(rng.uniform(start, end), 6)
            chosen: tuple[str, ...] = ()
            duration = 0.0
            if kind in ("dcs_stall", "dcs_cut", "agent_kill", "agent_pause"):
                duration = rng.uniform(*self.ttl_multiple) * ttl
            elif kind in ("dcs_flaky", "net_cut", "net_isolate", "pg_flaky", "slow_ops"):
                duration = rng.uniform(*self.window)
            if kind == "net_cut":
                chosen = tuple(sorted(rng.sample(list(members), 2)))
            elif kind == "session_invalidated":
                # never the master's: a lease revoked on the store's side ends at once, and no
                # agent can stop its PostgreSQL before a peer takes the free key (etcd has no
                # lock-delay); aimed at a replica it tests re-registration and the race
                chosen = (f"@other{rng.randint(1, max(1, len(members) - 1))}",)
            elif kind in (
                "dcs_cut",
                "net_isolate",
                "pg_crash",
                "agent_kill",
                "agent_pause",
            ):
                chosen = (rng.choice(list(members)),)
            duration = min(round(duration, 6), end - at)
            faults.append(Fault(at, kind, chosen, duration))
        faults.sort(key=lambda f: (f.at, f.kind, f.members))
        return faults


NO_FAULT_MIX = FaultMix(count=(0, 0))


# -- the result ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimResult:
    """What one seed did. Plain data: results come back from worker processes."""

    seed: int
    members: int
    synchronous_mode: str
    violation: Violation | None
    faults: dict[str, int]
    virtual_seconds: float
    wall_seconds: float
    cpu_seconds: float  # this process's CPU time for the run (unlike wall time, not load-bound)
    commits: int
    lost_commits: int
    lost_bytes: int
    healed_at: float | None
    converged_after: float | None  # virtual seconds from the last heal to convergence
    trace: tuple[str, ...] | None = None

    @property
    def ok(self) -> bool:
        return self.violation is None


# -- the harness --------------------------------------------------------------------------------


class SimCluster:
    """Build the world for ``seed``, run ``agent_factory``'s agents on it for ``duration``
    virtual seconds under ``fault_plan`` (a :class:`FaultMix` drawn from the seed, or an explicit
    list of :class:`Fault`), check the invariants, return a :class:`SimResult`."""

    def __init__(
        self,
        seed: int,
        members: int = 3,
        synchronous_mode: str = "off",
        fault_plan: FaultMix | Sequence[Fault] | None = None,
        duration: float = 600.0,
        *,
        agent_factory: AgentFactory,
        ttl: float = SIM_TTL,
        loop_wait: float = 1.0,
        maximum_lag_on_failover: int = 1024 * 1024,
        clock_drift: float = 0.01,
        election: float | None = None,
        warmup: float = 20.0,
        client_interval: tuple[float, float] = (0.5, 1.5),
        timings: PgTimings | None = None,
        writes_need_deadline: bool = True,
        keep_trace: bool = False,
        wall_budget: float | None = None,
    ) -> None:
        if members < 1:
            raise ValueError("a cluster needs a member")
        self.seed = seed
        self.names = tuple(f"m{i + 1}" for i in range(members))
        self.synchronous_mode = synchronous_mode
        self.fault_plan: FaultMix | Sequence[Fault] = (
            FaultMix() if fault_plan is None else fault_plan
        )
        self.duration = duration
        self.agent_factory = agent_factory
        self.ttl = ttl
        self.loop_wait = loop_wait
        self.maximum_lag_on_failover = maximum_lag_on_failover
        self.clock_drift = clock_drift
        self.election = (
            election if election is not None else 2 * loop_wait + 2 * MAX_REQUEST_TIMEOUT
        )
        self.warmup = warmup
        self.client_interval = client_interval
        self.base_timings = timings or PgTimings(slow=0.0)
        self.writes_need_deadline = writes_need_deadline
        self.keep_trace = keep_trace
        self.wall_budget = (
            wall_budget if wall_budget is not None else max(DEFAULT_WALL_BUDGET, duration / 2)
        )
        self.settings = ClusterSettings(
            cluster=CLUSTER,
            members=self.names,
            ttl=ttl,
            loop_wait=loop_wait,
            synchronous_mode=synchronous_mode,
            maximum_lag_on_failover=maximum_lag_on_failover,
            clock_drift=clock_drift,
        )
        self.events: list[tuple[float, str]] = []  # the harness's own: faults, agents
        self.faults: list[Fault] = []

    # -- the bound the liveness check uses --------------------------------------------------------
    def liveness_bound(self) -> LivenessBound:
        slow = isinstance(self.fault_plan, FaultMix) and self.fault_plan.weights.get("slow_ops", 0)
        explicit_slow = not isinstance(self.fault_plan, FaultMix) and any(
            f.kind == "slow_ops" for f in self.fault_plan
        )
        timings = self.base_timings
        if slow or explicit_slow:
            timings = dataclasses.replace(timings, slow=1.0)
        return LivenessBound.of(self.ttl, self.election, timings)

    # -- the trace ------------------------------------------------------------------------------
    def _record(self, what: str) -> None:
        self.events.append((round(self._loop.time(), 6), what))

    def trace(self) -> list[str]:
        """Every event of the run so far, in virtual-time order: the harness's, the store's
        and the PostgreSQL world's."""
        harness = ((t, 0, f"sim {what}") for t, what in self.events)
        store = ((t, 1, f"dcs {kind} {what}") for t, kind, what in self.store.trace)
        world = ((t, 2, f"pg {what}") for t, what in self.world.trace)
        merged = heapq.merge(harness, store, world, key=lambda e: (e[0], e[1]))
        return [f"{t - EPOCH:12.6f} {what}" for t, _source, what in merged]

    # -- running --------------------------------------------------------------------------------
    def run(self) -> SimResult:
        started, cpu = time.perf_counter(), time.process_time()
        try:
            result = run_simulation(self._main, self.seed, wall_budget=self.wall_budget)
        except SimulationStalled as exc:
            raise SimulationStalled(
                f"{exc} ({len(self.names)} members, synchronous mode {self.synchronous_mode})"
            ) from exc
        return dataclasses.replace(
            result,
            wall_seconds=time.perf_counter() - started,
            cpu_seconds=time.process_time() - cpu,
        )

    async def _main(self) -> SimResult:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualEventLoop)
        self._loop = loop
        use_incarnation_tasks(loop)
        rng = loop.rng
        self.store = SimStore(derive_rng(rng), min_ttl=1.0)
        self.world = PgWorld(derive_rng(rng), timings=self.base_timings)
        self.client = SimClient(self.world)
        fault_rng = derive_rng(rng)
        clock_rng = derive_rng(rng)
        self._stopped: asyncio.Future[Violation] = loop.create_future()

        def on_violation(violation: Violation) -> None:
            if not self._stopped.done():
                self._stopped.set_result(violation)

        self.checker = Checker(
            self.world,
            self.client,
            synchronous_mode=self.synchronous_mode,
            maximum_lag_on_failover=self.maximum_lag_on_failover,
            writes_need_deadline=self.writes_need_deadline,
            trace=self.trace,
            on_violation=on_violation,
            epoch=EPOCH,
        )
        self.pgs = {name: self.world.member(name) for name in self.names}
        self.clocks = {
            name: SimClock(loop, 1.0 + clock_rng.uniform(-self.clock_drift, self.clock_drift))
            for name in self.names
        }
        self.agents: dict[str, tuple[Incarnation, SimAgent, SimDCS, SimFence]] = {}
        self._incarnations = itertools.count(1)
        for name in self.names:
            self._start_agent(name)

        healed_at = self.duration - self.liveness_bound().seconds - 5.0
        if isinstance(self.fault_plan, FaultMix):
            self.faults = self.fault_plan.draw(
                fault_rng, self.names, self.ttl, self.warmup, max(self.warmup, healed_at)
            )
        else:
            self.faults = sorted(self.fault_plan, key=lambda f: (f.at, f.kind, f.members))
        last_heal = max((f.heals_at for f in self.faults), default=0.0)
        self._windows: dict[str, int] = {}
        for fault in self.faults:
            loop.call_at(EPOCH + fault.at, self._inject, fault)
        loop.call_at(EPOCH + last_heal, self._all_healed)

        writer = loop.create_task(self.client.run(self.client_interval))
        try:
            violation = await bounded(asyncio.shield(self._stopped), self.duration)
        except TimeoutError:
            violation = None
        durability = None
        if violation is None:
            self.checker.check_converged()
            durability = self.checker.check_durability()
            if self._stopped.done():
                violation = self._stopped.result()
        if durability is None:
            durability = self.checker.durability()
        writer.cancel()
        await self._stop_agents()
        self.checker.close()
        counts: dict[str, int] = {}
        for fault in self.faults:
            counts[fault.kind] = counts.get(fault.kind, 0) + 1
        healed = self.checker.healed_at
        converged = self.checker.converged_at
        return SimResult(
            seed=self.seed,
            members=len(self.names),
            synchronous_mode=self.synchronous_mode,
            violation=violation,
            faults=counts,
            virtual_seconds=round(loop.elapsed, 6),
            wall_seconds=0.0,
            cpu_seconds=0.0,
            commits=len(self.client.commits),
            lost_commits=durability.lost,
            lost_bytes=durability.lost_bytes,
            healed_at=round(healed - EPOCH, 6) if healed is not None else None,
            converged_after=(
                round(converged - healed, 6)
                if converged is not None and healed is not None
                else None
            ),
            trace=tuple(self.trace()) if self.keep_trace else None,
        )

    async def _stop_agents(self) -> None:
        for name in self.names:
            incarnation, agent, _dcs, fence = self.agents[name]
            if not incarnation.killed:
                incarnation.resume()
                agent.request_stop()
        await asyncio.sleep(self.loop_wait * 2)
        for name in self.names:
            incarnation, _agent, _dcs, fence = self.agents[name]
            incarnation.kill()
            fence.stop()
        await asyncio.sleep(0)

    # -- agents ---------------------------------------------------------------------------------
    def _start_agent(self, name: str) -> None:
        incarnation = Incarnation(name, next(self._incarnations))
        dcs = self.store.client(CLUSTER, name)
        fence = SimFence(name, self.pgs[name], self.checker, incarnation)
        ports = MemberPorts(
            name,
            dcs,
            self.pgs[name],
            self.clocks[name],
            fence,
            self.settings,
            lambda invariant, message: self.checker.violation(invariant, message),
        )
        agent = self.agent_factory(name, ports)
        start_incarnation(self._loop, self._run_agent(name, agent), incarnation)
        self.agents[name] = (incarnation, agent, dcs, fence)
        self._record(f"agent {name} #{incarnation.number} started")

    async def _run_agent(self, name: str, agent: SimAgent) -> None:
        try:
            await agent.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an agent that dies of its own error: record it, as a crash
            self._record(f"agent {name} died: {type(exc).__name__}: {exc}")

    def _kill_agent(self, name: str) -> None:
        incarnation, _agent, dcs, fence = self.agents[name]
        if incarnation.killed:
            return
        incarnation.kill()
        fence.stop()
        self.pgs[name].crash()
        self._loop.create_task(dcs.close())
        self._record(f"agent {name} #{incarnation.number} killed")

    # -- faults ---------------------------------------------------------------------------------
    def _resolve(self, members: tuple[str, ...]) -> tuple[str, ...]:
        """``@master`` is the member accepting writes now (the first if none does), ``@otherN``
        the N-th of the others by name: explicit plans aim at roles, not names."""
        writable = self.world.writable_members()
        master = writable[0] if writable else self.names[0]
        others = [name for name in self.names if name != master]
        resolved = []
        for member in members:
            if member == "@master":
                resolved.append(master)
            elif member.startswith("@other"):
                resolved.append(others[int(member[len("@other") :]) - 1])
            else:
                resolved.append(member)
        return tuple(resolved)

    def _inject(self, fault: Fault) -> None:
        fault = dataclasses.replace(fault, members=self._resolve(fault.members))
        self._record(f"fault {fault}")
        loop = self._loop
        members = fault.members
        heal_at = EPOCH + fault.heals_at
        kind = fault.kind
        if kind == "dcs_stall":
            self.store.stall(fault.duration)
        elif kind == "dcs_cut":
            self.store.cut(members[0])
            loop.call_at(heal_at, self._heal_dcs_cut, members[0])
        elif kind == "session_invalidated":
            self.store.invalidate_session(members[0])
        elif kind == "net_cut":
            a, b = members
            self.world.network.cut(a, b)
            loop.call_at(heal_at, self.world.network.heal, a, b)
        elif kind == "net_isolate":
            self.world.network.isolate(members[0])
            loop.call_at(heal_at, self.world.network.heal, members[0])
        elif kind == "pg_crash":
            self.pgs[members[0]].crash()
        elif kind == "agent_kill":
            self._kill_agent(members[0])
            loop.call_at(heal_at, self._restart_agent, members[0])
        elif kind == "agent_pause":
            incarnation = self.agents[members[0]][0]
            if not incarnation.killed and not incarnation.paused:
                incarnation.pause()
                loop.call_at(heal_at, self._resume_agent, incarnation)
        elif kind in ("dcs_flaky", "pg_flaky", "slow_ops"):
            self._windows[kind] = self._windows.get(kind, 0) + 1
            self._apply_windows()
            loop.call_at(heal_at, self._close_window, kind)
        else:
            raise ValueError(f"unknown fault kind {kind!r}")

    def _heal_dcs_cut(self, member: str) -> None:
        self.store.heal(member)

    def _restart_agent(self, name: str) -> None:
        if self.agents[name][0].killed:
            self._start_agent(name)

    def _resume_agent(self, incarnation: Incarnation) -> None:
        if not incarnation.killed:
            incarnation.resume()
            self._record(f"agent {incarnation.member} #{incarnation.number} resumed")

    def _close_window(self, kind: str) -> None:
        self._windows[kind] -= 1
        self._apply_windows()

    def _apply_windows(self) -> None:
        mix = self.fault_plan if isinstance(self.fault_plan, FaultMix) else FaultMix()
        self.store.faults = mix.dcs_flaky if self._windows.get("dcs_flaky") else NO_FAULTS
        self.world.faults = mix.pg_flaky if self._windows.get("pg_flaky") else PgFaultPlan()
        slow = mix.slow if self._windows.get("slow_ops") else 0.0
        if slow != self.world.timings.slow:
            self.world.timings = dataclasses.replace(self.world.timings, slow=slow)

    def _all_healed(self) -> None:
        self._record("every fault healed")
        self.checker.faults_healed(self.liveness_bound())


# -- many seeds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedRun:
    """The arguments of one seed's run (picklable: sent to a worker process)."""

    seed: int
    members: int
    synchronous_mode: str
    faults: FaultMix | tuple[Fault, ...] | None
    agent_factory: AgentFactory
    duration: float
    options: tuple[tuple[str, Any], ...] = ()


def run_one(run: SeedRun) -> SimResult:
    return SimCluster(
        run.seed,
        run.members,
        run.synchronous_mode,
        run.faults,
        run.duration,
        agent_factory=run.agent_factory,
        **dict(run.options),
    ).run()


@dataclass(frozen=True)
class SeedsReport:
    results: tuple[SimResult, ...]
    wall_seconds: float
    jobs: int

    @property
    def failures(self) -> list[SimResult]:
        return [r for r in self.results if not r.ok]

    @property
    def virtual_seconds(self) -> float:
        return sum(r.virtual_seconds for r in self.results)

    @property
    def simulated_per_wall_second(self) -> float:
        """Virtual seconds simulated per wall second, all workers together."""
        return self.virtual_seconds / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def simulated_per_cpu_second(self) -> float:
        """Virtual seconds per CPU second of the runs (what one core does, load aside)."""
        busy = sum(r.cpu_seconds for r in self.results)
        return self.virtual_seconds / busy if busy else 0.0


def run_seeds(
    seeds: Sequence[int],
    members: int | Sequence[int] = 3,
    synchronous_mode: str = "off",
    faults: FaultMix | Sequence[Fault] | None = None,
    agent_factory: AgentFactory | None = None,
    jobs: int = 2,
    *,
    duration: float = 600.0,
    **options: Any,
) -> SeedsReport:
    """Run every seed (``members`` may list sizes, taken in turn by seed) in ``jobs`` worker
    processes (in this process when 1). ``agent_factory`` must be picklable by reference (a
    module-level function or class) for worker processes to import it."""
    if agent_factory is None:
        raise ValueError("run_seeds needs an agent_factory")
    sizes = [members] if isinstance(members, int) else list(members)
    plan = faults if faults is None or isinstance(faults, FaultMix) else tuple(faults)
    runs = [
        SeedRun(
            seed,
            sizes[i % len(sizes)],
            synchronous_mode,
            plan,
            agent_factory,
            duration,
            tuple(sorted(options.items())),
        )
        for i, seed in enumerate(seeds)
    ]
    started = time.perf_counter()
    if jobs <= 1:
        results = [run_one(r) for r in runs]
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            # one seed at a time: seeds differ in cost by a factor of two or three, and with
            # larger chunks one worker could be left with the last few while the other idles
            results = list(pool.imap_unordered(run_one, runs, chunksize=1))
    results.sort(key=lambda r: (r.seed, r.members))
    return SeedsReport(tuple(results), time.perf_counter() - started, max(1, jobs))


def replay(
    seed: int,
    members: int = 3,
    synchronous_mode: str = "off",
    faults: FaultMix | Sequence[Fault] | None = None,
    agent_factory: AgentFactory | None = None,
    *,
    duration: float = 600.0,
    out: Callable[[str], Any] = print,
    **options: Any,
) -> SimResult:
    """Run one seed again in this process and print its whole trace, then its verdict."""
    if agent_factory is None:
        raise ValueError("replay needs an agent_factory")
    result = SimCluster(
        seed,
        members,
        synchronous_mode,
        faults,
        duration,
        agent_factory=agent_factory,
        keep_trace=True,
        **options,
    ).run()
    for line in result.trace or ():
        out(line)
    out(str(result.violation) if result.violation else f"seed {seed}: ok")
    return result


__all__ = [
    "AgentFactory",
    "ClusterSettings",
    "Fault",
    "FaultMix",
    "MemberPorts",
    "SeedsReport",
    "SimClock",
    "SimCluster",
    "SimFence",
    "SimResult",
    "replay",
    "run_seeds",
]
