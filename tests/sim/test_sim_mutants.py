"""The simulator catches broken agents: each mutant of the real agent, applied in-process
(monkeypatch), must produce a violation within its stated seed budget (seeds run in this
process, first violation ends the search)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

import fsm.inputs
import fsm.machine
from fsm.machine import Effect, Role
from fsm.snapshot import Snapshot
from pgsidecar.agent import effects
from pgsidecar.agent.pgconfig import PgConfig, leader_conninfo
from pgsidecar.lab.sim.agent import agent_factory
from pgsidecar.lab.sim.cluster import FaultMix, SimCluster, SimFence
from pgsidecar.lab.sim.dcs import FaultPlan


def first_violation(
    seeds: Iterable[int],
    members: int = 3,
    mode: str = "off",
    faults: FaultMix | None = None,
    invariant: str | None = None,
) -> str | None:
    """The first seed that violates an invariant (``invariant``: that one), as "seed N: name";
    None when every seed passes. Violations of other invariants are passed over."""
    for seed in seeds:
        result = SimCluster(seed, members, mode, faults, agent_factory=agent_factory).run()
        violation = result.violation
        if violation is not None and invariant in (None, violation.invariant):
            return f"seed {seed}: {violation.invariant}"
    return None


# elections that meet failing DCS calls: windows of a flaky DCS around crashes and agent kills
FLAKY_ELECTIONS = FaultMix(
    count=(10, 20),
    weights={"dcs_flaky": 2.0, "agent_kill": 1.0, "pg_crash": 1.0},
    dcs_flaky=FaultPlan(request_error=0.3, request_timeout=0.1, lost_answer=0.1, watch_drop=0.05),
)


# the seeds searched with FLAKY_ELECTIONS; the control below runs all of them unmutated
FLAKY_SEEDS = range(1, 61)


def test_the_real_agent_passes_the_flaky_election_seeds() -> None:
    """The control for the mutants below that use FLAKY_ELECTIONS: the same seeds, unmutated."""
    assert first_violation(FLAKY_SEEDS, faults=FLAKY_ELECTIONS) is None


def test_a_master_that_keeps_mastership_without_the_lease_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """decide() without the master's lease check: a master stays master without the lease."""
    real = fsm.machine._decide

    def mutant(role: Role, s: Snapshot) -> fsm.machine.Decision:
        d = real(role, s)
        if role is Role.MASTER and d.trigger == "lease_lost":
            return fsm.machine._wait("effect")
        return d

    monkeypatch.setattr(fsm.machine, "_decide", mutant)
    assert first_violation(range(1, 6)) is not None


def test_fencing_that_does_nothing_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fencing skipped: the fence hook's deadline passes without fencing, and the agent's own
    fence effect leaves PostgreSQL running."""

    def fire(self: SimFence) -> None:
        self._timer = None

    async def fence_pg(*args: object) -> None:
        state, _pg, fence, _runner, watch, report = args
        fence.disarm()  # type: ignore[attr-defined]
        if state.snapshot.lease.held:  # type: ignore[attr-defined]
            report.post("lease", held=False, term=None)  # type: ignore[attr-defined]
        report.outcome(Effect.FENCE, ok=True)  # type: ignore[attr-defined]

    monkeypatch.setattr(SimFence, "_fire", fire)
    monkeypatch.setattr(effects, "fence_pg", fence_pg)
    assert first_violation(range(1, 6)) is not None


def test_a_lagging_replica_allowed_to_race_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The candidate ignores every position check: the synchronous set, maximum_lag_on_failover
    and better-placed peers. A member without the latest acknowledged commits then wins an
    election in synchronous mode, and the commits it lacks are lost."""
    import dataclasses

    real_eligible = fsm.machine.eligible

    def eligible(s: Snapshot) -> tuple[bool, str]:
        unbounded = dataclasses.replace(s.settings, maximum_lag_on_failover=1 << 62)
        return real_eligible(dataclasses.replace(s, settings=unbounded))

    monkeypatch.setattr(fsm.machine, "sync_allows", lambda s, name: True)
    monkeypatch.setattr(fsm.machine, "_ahead", lambda peer, s: False)
    monkeypatch.setattr(fsm.machine, "eligible", eligible)
    # the first seeds to show it: 9 and 11 (since the record's compare-and-set; seed 2 before)
    found = first_violation(range(1, 21), mode="on")
    assert found is not None and "durability" in found, found


def test_an_acquire_failure_taken_for_a_win_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The acquire effect reports a win whatever happened: a refused acquire (another member
    holds the key) or a call that failed (the DCS may never have seen it). The member promotes
    without the key: while the real holder does too (two writable members), or alone, and then
    no replica can follow it (no key names it) and the cluster never converges. Both must be
    seen: the split brain is the harm this mutant stands for. Elections must meet failing DCS calls for
    this to show (with the default mix, 20 seeds did not), so the faults drawn are windows of
    a flaky DCS (30 % errors, 10 % timeouts, 10 % lost answers) around crashes and agent kills.
    A member whose fake win names a term is stopped by the master's own check (a view newer
    than its term without its key), so the mutant reports none, as a failed call would."""

    async def acquire(
        state: Any, dcs: Any, fence: Any, fence_deadline: Any, report: Any, **_: Any
    ) -> None:
        try:
            leader = await dcs.acquire_leader(state.name)
        except Exception:  # any failed call, as the runner would have posted ``ok: false``
            leader = None
        won_for_real = leader is not None and leader.name == state.name
        term = leader.term if won_for_real else None  # a failed call has no term to report
        fence.arm(fence_deadline(state.lease_sent))
        report.post("lease", held=True, term=term)
        report.outcome(Effect.ACQUIRE, ok=True, won=True, term=term)

    monkeypatch.setattr(effects, "acquire", acquire)
    # caught at once: the keyless master wedges the cluster (no key to follow), in seed 10
    assert first_violation(range(1, 11), faults=FLAKY_ELECTIONS) is not None
    # and the split brain it stands for shows within the searched seeds (seed 46; each agent
    # change that reorders callbacks moves it: 24 before the member key was published by the loop)
    found = first_violation(FLAKY_SEEDS, faults=FLAKY_ELECTIONS, invariant="safety")
    assert found is not None, "no seed showed two writable members"


def test_reverting_the_retry_of_failed_effects_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fix for the cluster that never elected a master again after a DCS outage: an effect
    whose call failed is retried after a bounded back-off. Reverted (a failed effect is never
    tried again: the machine waits with no wake-up that will come), the cluster wedges and the
    liveness invariant fails."""
    monkeypatch.setattr(
        fsm.inputs, "retry_delay", lambda failures, ttl: 0.0 if failures <= 0 else 1e9
    )
    found = first_violation(range(1, 6))
    assert found is not None and "liveness" in found, found


def test_reverting_the_kept_upstream_of_a_parameters_rewrite_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fix found by seeds 2324 and 3060: a replica's rewrite for new cluster parameters
    keeps the upstream the machine chose. Reverted (the rewrite names the view's leader, none
    in a view without one), the standby follows nobody for good: liveness, on the seed that
    found it."""
    real = PgConfig.apply_cluster_parameters

    async def mutant(self: PgConfig) -> None:
        self.standby_upstream = leader_conninfo(self.state, self.pg, replication=True)
        await real(self)

    monkeypatch.setattr(PgConfig, "apply_cluster_parameters", mutant)
    found = first_violation([2324], mode="on")
    assert found is not None and "liveness" in found, found
