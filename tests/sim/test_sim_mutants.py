"""The simulator catches broken agents: each mutant of the real agent, applied in-process
(monkeypatch), must produce a violation within its stated seed budget (seeds run in this
process, first violation ends the search)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

import fsm.machine
from fsm.machine import Effect, Role
from fsm.snapshot import Snapshot
from pgsidecar.agent import effects
from pgsidecar.lab.sim.agent import agent_factory
from pgsidecar.lab.sim.cluster import SimCluster, SimFence


def first_violation(seeds: Iterable[int], members: int = 3, mode: str = "off") -> str | None:
    for seed in seeds:
        result = SimCluster(seed, members, mode, agent_factory=agent_factory).run()
        if result.violation is not None:
            return f"seed {seed}: {result.violation.invariant}"
    return None


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
