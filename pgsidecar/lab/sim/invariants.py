"""Invariant checkers for a simulated cluster, fed by the models' own events.

:class:`Checker` observes the PostgreSQL world (``PgWorld.observers``) and is told each member's
fencing deadline by the harness (``fencing_deadline``); it checks, at the instant things happen:

* **Safety**: two members never accept writes at the same virtual instant (the world tells the
  checker every change of the writable set, synchronously, so two overlapping for zero virtual
  time still count); no member accepts a write after its fencing deadline; and (by default) none
  accepts a write with no deadline armed at all, since a master unguarded by a fence is exactly
  what fencing exists to rule out. And no two promotions name the same timeline: a standby
  on the other one could never stream, and no timeline history can tell the two apart.
* **Durability** (:meth:`Checker.check_durability`, at the end): with synchronous mode on or
  strict, the member that is master at the end holds every acknowledged commit; with it off, the
  loss (the bytes of acknowledged WAL past the point where a lost commit's timeline leaves the
  survivor's) is reported and bounded by ``maximum_lag_on_failover``.
* **Liveness** (:meth:`Checker.faults_healed`): once the last fault heals, within
  :class:`LivenessBound` exactly one member accepts writes and every other healthy member streams
  from it; that must still hold at the end of the run (:meth:`Checker.check_converged`).

A violation is recorded (``violations``) and handed to ``on_violation`` (the harness stops the
run there); with no handler it is raised, carrying the event trace up to that instant. Never
raised into the code under test: an agent catching broad exceptions would swallow it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pgsidecar.lab.sim.postgres import Commit, PgTimings, PgWorld, SimClient, common_prefix

# how much of the trace a violation keeps (the end of it: what led there)
TRACE_TAIL = 400


@dataclass(frozen=True)
class Violation:
    """Plain data (it crosses process boundaries): which invariant, what, when (virtual seconds
    since the start), and the last events before it."""

    invariant: str  # "safety", "durability", "liveness"
    message: str
    at: float
    trace: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [f"{self.invariant} violated at {self.at:.3f}s: {self.message}"]
        if self.trace:
            lines.append(f"trace (last {len(self.trace)} events):")
            lines.extend(f"  {line}" for line in self.trace)
        return "\n".join(lines)


class InvariantViolation(AssertionError):
    def __init__(self, violation: Violation) -> None:
        super().__init__(str(violation))
        self.violation = violation


@dataclass(frozen=True)
class LivenessBound:
    """How long after the last fault heals the cluster may take to have one master and every
    healthy member streaming from it:

        bound = ttl + election + (stop + promote + start) + (stop + rewind + basebackup + start)

    ``ttl``: a lease held by a member that can no longer act lapses; ``election``: the agents
    notice the free key and one wins (the agent's detection time plus its DCS round trips);
    then the winner may have to stop and start as a primary, or promote; then a replica may have
    to stop, fail a rewind, reclone and start. Each operation counts at the top of its slow range
    (an operation begun before the heal may still be slow)."""

    ttl: float
    election: float
    stop: float
    promote: float
    start: float
    rewind: float
    basebackup: float

    @property
    def seconds(self) -> float:
        master = self.stop + self.promote + self.start
        replica = self.stop + self.rewind + self.basebackup + self.start
        return self.ttl + self.election + master + replica

    @classmethod
    def of(cls, ttl: float, election: float, timings: PgTimings) -> LivenessBound:
        slow = timings.slow > 0
        return cls(
            ttl=ttl,
            election=election,
            stop=max(timings.stop[1], timings.slow_stop[1] if slow else 0.0),
            promote=max(timings.promote[1], timings.slow_promote[1] if slow else 0.0),
            start=max(timings.start[1], timings.slow_start[1] if slow else 0.0),
            rewind=timings.rewind[1],
            basebackup=timings.basebackup[1],
        )


@dataclass
class Durability:
    """What the member that is master at the end lost of the acknowledged commits."""

    master: str | None
    acknowledged: int
    lost: int = 0
    lost_bytes: int = 0  # the worst single fork: acknowledged WAL past the survivor's history
    lost_commits: list[Commit] = field(default_factory=list)


class Checker:
    def __init__(
        self,
        world: PgWorld,
        client: SimClient,
        *,
        synchronous_mode: str = "off",
        maximum_lag_on_failover: int | None = 1024 * 1024,
        writes_need_deadline: bool = True,
        trace: Callable[[], Sequence[str]] = lambda: (),
        on_violation: Callable[[Violation], None] | None = None,
        epoch: float = 0.0,
    ) -> None:
        if synchronous_mode not in ("off", "on", "strict"):
            raise ValueError(f"synchronous_mode must be off, on or strict: {synchronous_mode!r}")
        self.world = world
        self.client = client
        self.synchronous_mode = synchronous_mode
        self.maximum_lag_on_failover = maximum_lag_on_failover
        self.writes_need_deadline = writes_need_deadline
        self._trace = trace
        self._on_violation = on_violation
        self._epoch = epoch
        self.deadlines: dict[str, float | None] = {}
        # (system id, timeline number) -> (timeline id, the member whose promotion named it)
        self.timelines: dict[tuple[str, int], tuple[int, str]] = {}
        self.violations: list[Violation] = []
        self.writes = 0
        self.healed_at: float | None = None
        self.converged_at: float | None = None
        self._liveness_timer: asyncio.TimerHandle | None = None
        self._healthy: Callable[[], Sequence[str]] = lambda: sorted(world.members)
        world.observers.append(self)

    # -- reporting -------------------------------------------------------------------------------
    def violation(self, invariant: str, message: str, now: float | None = None) -> None:
        if now is None:
            now = self.world.now()
        trace = tuple(self._trace())[-TRACE_TAIL:]
        found = Violation(invariant, message, round(now - self._epoch, 6), trace)
        self.violations.append(found)
        if self._on_violation is None:
            raise InvariantViolation(found)
        self._on_violation(found)

    # -- safety ----------------------------------------------------------------------------------
    def fencing_deadline(self, member: str, deadline: float | None) -> None:
        """The harness's fence hook armed (``deadline``, on loop time) or disarmed (None)."""
        self.deadlines[member] = deadline

    def writable_changed(self, now: float, writable: tuple[str, ...]) -> None:
        if len(writable) > 1:
            self.violation(
                "safety", f"{len(writable)} members accept writes: {list(writable)}", now
            )

    def write_accepted(self, now: float, member: str, lsn: int, tli: int) -> None:
        self.writes += 1
        writable = self.world.writable_members()
        if writable != [member]:
            self.violation(
                "safety", f"{member} accepted a write while {writable} accept writes", now
            )
            return
        deadline = self.deadlines.get(member)
        if deadline is None:
            if self.writes_need_deadline:
                self.violation(
                    "safety", f"{member} accepted a write (lsn {lsn}) with no fencing deadline", now
                )
        elif now > deadline:
            self.violation(
                "safety",
                f"{member} accepted a write (lsn {lsn}) {now - deadline:.3f}s after its fencing "
                f"deadline",
                now,
            )

    def timeline_named(self, now: float, member: str, system_id: str, tli: int, uid: int) -> None:
        first = self.timelines.setdefault((system_id, tli), (uid, member))
        if first[0] != uid:
            self.violation(
                "safety",
                f"{member} named its new timeline {tli}, as {first[1]}'s promotion had named "
                f"another one",
                now,
            )

    # -- durability ------------------------------------------------------------------------------
    def durability(self) -> Durability:
        """The acknowledged commits the member accepting writes now does not hold."""
        writable = self.world.writable_members()
        report = Durability(
            master=writable[0] if len(writable) == 1 else None,
            acknowledged=len(self.client.commits),
        )
        if report.master is None:
            return report
        master = self.world.members[report.master]
        survivor = master.wal
        lost = self.client.lost_by(master)
        report.lost, report.lost_commits = len(lost), lost
        for commit in lost:
            theirs = self.world.lineage_wal(commit.uid, commit.lsn)
            kept = common_prefix(theirs, survivor) if theirs is not None and survivor else 0
            report.lost_bytes = max(report.lost_bytes, commit.lsn - kept)
        return report

    def check_durability(self) -> Durability:
        report = self.durability()
        if report.master is None or not report.lost:
            return report
        first = report.lost_commits[0]
        what = (
            f"{report.master} (master at the end) lacks {report.lost} of "
            f"{report.acknowledged} acknowledged commits (the first: #{first.seq} on "
            f"{first.member} lsn {first.lsn} tli {first.tli} at {first.at - self._epoch:.3f}s); "
            f"{report.lost_bytes} bytes past the surviving history"
        )
        if self.synchronous_mode != "off":
            self.violation("durability", f"synchronous mode {self.synchronous_mode}: {what}")
        elif (
            self.maximum_lag_on_failover is not None
            and report.lost_bytes > self.maximum_lag_on_failover
        ):
            self.violation(
                "durability",
                f"{what}: more than maximum_lag_on_failover ({self.maximum_lag_on_failover})",
            )
        return report

    # -- liveness --------------------------------------------------------------------------------
    def converged(self) -> tuple[bool, str]:
        """Exactly one member accepts writes and every other healthy one streams from it."""
        writable = self.world.writable_members()
        if len(writable) != 1:
            return False, f"{len(writable)} members accept writes: {writable}"
        master = writable[0]
        behind = []
        for name in self._healthy():
            if name == master:
                continue
            pg = self.world.members[name]
            pm = pg._pm
            upstream = pm.receiver if pm is not None and pg.running else None
            if upstream != master:
                behind.append(f"{name} streams from {upstream}")
        if behind:
            return False, f"master {master}, but " + ", ".join(behind)
        return True, f"master {master}"

    def faults_healed(
        self,
        bound: LivenessBound,
        healthy: Callable[[], Sequence[str]] | None = None,
        *,
        poll: float = 1.0,
    ) -> None:
        """The last fault healed now: within ``bound`` the cluster must converge (looked at every
        ``poll`` virtual seconds, which is the resolution of ``converged_at``)."""
        loop = asyncio.get_running_loop()
        self.healed_at = loop.time()
        self.converged_at = None
        if healthy is not None:
            self._healthy = healthy
        deadline = self.healed_at + bound.seconds

        def look() -> None:
            ok, why = self.converged()
            now = loop.time()
            if ok:
                self.converged_at = now
            elif now >= deadline:
                self.violation(
                    "liveness",
                    f"not converged {bound.seconds:.1f}s after the last fault healed "
                    f"(bound {bound}): {why}",
                    now,
                )
            else:
                self._liveness_timer = loop.call_at(min(deadline, now + poll), look)

        look()

    def check_converged(self) -> None:
        """At the end of a run: converged (after the heal) and still so."""
        if self.healed_at is None:
            return
        ok, why = self.converged()
        if not ok:
            self.violation("liveness", f"not converged at the end: {why}")

    def close(self) -> None:
        if self._liveness_timer is not None:
            self._liveness_timer.cancel()
        if self in self.world.observers:
            self.world.observers.remove(self)
