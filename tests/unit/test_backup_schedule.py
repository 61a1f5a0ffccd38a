"""Scheduled backups: slot computation, and the claim in the DCS that makes each slot run once
however many members race for it (pgsidecar/backup/schedule.py, pgsidecar/agent/backups.py),
against the in-memory DCS of tests/support/agent_fakes.py, whose reads and writes yield to the
loop so racing members interleave between their read and their compare-and-set."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from events.dcs import ClusterView, DCSError, Leader
from pgsidecar.agent.backups import BackupScheduleMetrics, BackupScheduler, Taken
from pgsidecar.agent.state import TaskSet
from pgsidecar.backup import BackupError, Schedule
from pgsidecar.backup.schedule import SlotRecord, covered, decide, due_slot, parse_slot
from tests.support.agent_fakes import FakeDCS

T0 = datetime(2026, 12, 6, 2, 0, 0, tzinfo=UTC)  # a Sunday, 02:00 UTC


def at(**delta: float) -> datetime:
    return T0 + timedelta(**delta)


# -- slots -------------------------------------------------------------------------------------


def test_the_last_slot_of_a_cron_schedule_is_at_or_before_now() -> None:
    s = Schedule(full="0 2 * * 0", diff="0 2 * * 1-6")
    assert s.last_slot("full", T0) == T0  # exactly at the slot: that slot
    assert s.last_slot("full", at(seconds=59)) == T0
    assert s.last_slot("full", at(seconds=-1)) == T0 - timedelta(days=7)
    assert s.last_slot("diff", T0) == T0 - timedelta(days=1)  # Saturday's
    assert s.last_slot("incr", T0) is None
    # every member computes the same slot from any moment in it
    assert {s.last_slot("full", at(hours=h)) for h in (0, 1, 30, 100)} == {T0}


def test_the_last_slot_of_an_interval_counts_from_the_epoch() -> None:
    s = Schedule(full="6h")
    assert s.last_slot("full", at(hours=1, minutes=5)) == T0 - timedelta(hours=2)
    assert s.next_slot("full", s.last_slot("full", at(minutes=1))) == at(hours=4)


def test_a_slot_is_due_only_within_the_grace_window() -> None:
    s = Schedule(full="0 2 * * 0", grace="30m")
    assert due_slot(s, "full", at(minutes=29)) == T0
    assert due_slot(s, "full", at(minutes=31)) is None  # missed for good: the next one runs
    with pytest.raises(ValueError, match="at least 1m"):
        Schedule(full="1d", grace="10s")


def test_a_full_slot_covers_a_diff_slot_at_the_same_time() -> None:
    full = SlotRecord.from_value({"slot": "2026-12-06T02:00:00Z", "state": "ok"})
    assert covered("diff", T0, {"full": full}) is True
    assert covered("diff", at(days=1), {"full": full}) is False
    assert covered("full", T0, {"diff": full}) is False  # a diff never covers a full


def test_decide_claims_forward_only_and_takes_over_a_dead_claim() -> None:
    rec = SlotRecord.from_value(
        {"slot": "2026-12-06T02:00:00Z", "member": "pg1", "pid": 10, "state": "running"}
    )
    alive = {"pg1": {"pid": 10}}
    assert decide(None, T0, alive) == "claim"
    assert decide(rec, at(days=7), alive) == "claim"
    assert decide(rec, at(days=-7), alive) == "newer"
    assert decide(rec, T0, alive) == "claimed"
    assert decide(rec, T0, {}) == "take_over"  # its member key lapsed with its session
    assert decide(rec, T0, {"pg1": {"pid": 11}}) == "take_over"  # its agent was restarted
    done = SlotRecord.from_value({**rec.__dict__, "slot": "2026-12-06T02:00:00Z", "state": "ok"})
    assert decide(done, T0, {}) == "claimed"  # a finished slot is never run again
    assert parse_slot("garbage") is None


# -- members racing ----------------------------------------------------------------------------


class WallClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def wall(self) -> float:
        return self.now.timestamp()

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()


class FakeBackup:
    """Records each backup run; ``gate`` (when set) holds runs until it is set; ``fail`` makes
    them fail."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, str]] = []
        self.gate: asyncio.Event | None = None
        self.fail: str | None = None

    def for_member(self, name: str) -> Any:
        backup = self

        class Run:
            async def __call__(self, kind: str, view: ClusterView) -> Taken:
                backup.runs.append((name, kind))
                if backup.gate is not None:
                    await backup.gate.wait()
                if backup.fail:
                    raise BackupError(backup.fail)
                return Taken(f"label-{len(backup.runs)}", "pg3")

            def can_run(self, view: ClusterView | None) -> bool:
                return True

        return Run()


class Cluster:
    """``n`` members' schedulers on one DCS; member i's agent pid is 100 + i."""

    def __init__(self, schedule: Schedule, n: int = 3) -> None:
        self.dcs = FakeDCS()
        self.clock = WallClock(T0)
        self.backup = FakeBackup()
        self.records: list[tuple[str, str, dict[str, Any]]] = []
        self.names = [f"pg{i + 1}" for i in range(n)]
        self.pids = {name: 100 + i for i, name in enumerate(self.names)}
        self.tasks = TaskSet()
        self.schedulers = {name: self.scheduler(name, schedule) for name in self.names}

    def view(self) -> ClusterView:
        members = {n: {"pid": p, "role": "replica"} for n, p in self.pids.items()}
        return ClusterView(leader=Leader("pg1", 5), members=members)

    def scheduler(self, name: str, schedule: Schedule) -> BackupScheduler:
        state = SimpleNamespace(name=name, dcs_view=self.view())

        def record(what: str, outcome: str, started: float, /, **detail: Any) -> None:
            self.records.append((name, outcome, detail))

        return BackupScheduler(
            schedule,
            dcs=self.dcs,
            state=state,  # type: ignore[arg-type]
            clock=self.clock,
            tasks=self.tasks,
            record=record,
            run_backup=self.backup.for_member(name),
            eligible=lambda: True,
            pid=self.pids[name],
        )

    def kill(self, name: str) -> None:
        """The member's agent died: its member key lapses, everyone's view shows it gone."""
        del self.pids[name]
        for s in self.schedulers.values():
            s.state.dcs_view = self.view()

    async def race(self) -> list[bool]:
        won = await asyncio.gather(*(s.tick() for s in self.schedulers.values()))
        await self.settle()
        return list(won)

    async def settle(self) -> None:
        for _ in range(50):
            running = [s.running for s in self.schedulers.values() if s.running is not None]
            if all(t.done() for t in running):
                return
            await asyncio.sleep(0.01)

    def record(self, kind: str) -> dict[str, Any]:
        return self.dcs.backup_slots[kind][0]


async def test_members_racing_for_each_slot_run_it_exactly_once() -> None:
    c = Cluster(Schedule(full="* * * * *"), n=3)
    for minute in range(5):
        c.clock.now = at(minutes=minute, seconds=1)
        won = await c.race()
        assert won.count(True) == 1, (minute, won)
        # a second round within the same slot claims nothing
        c.clock.now = at(minutes=minute, seconds=30)
        assert (await c.race()).count(True) == 0
    assert len(c.backup.runs) == 5
    assert c.record("full")["state"] == "ok"
    assert c.record("full")["slot"] == "2026-12-06T02:04:00Z"
    lost = [r for r in c.records if r[1] == "lost_claim"]
    assert lost, "the fake DCS must interleave the racers (else this test proves nothing)"


async def test_a_missed_slot_runs_once_when_a_member_comes_back_within_the_grace_window() -> None:
    c = Cluster(Schedule(full="0 2 * * 0", grace="1h"), n=2)
    # nobody was up at 02:00; the first member back at 02:40 runs the slot, once
    c.clock.now = at(minutes=40)
    assert (await c.race()).count(True) == 1
    assert len(c.backup.runs) == 1
    assert c.record("full")["slot"] == "2026-12-06T02:00:00Z"
    c.clock.now = at(minutes=50)
    assert (await c.race()).count(True) == 0
    assert len(c.backup.runs) == 1
    # back only after the window: the slot is skipped, the next one runs
    c2 = Cluster(Schedule(full="0 2 * * 0", grace="1h"), n=2)
    c2.clock.now = at(minutes=61)
    assert (await c2.race()).count(True) == 0
    c2.clock.now = at(days=7, seconds=5)
    assert (await c2.race()).count(True) == 1
    assert c2.record("full")["slot"] == "2026-12-13T02:00:00Z"


async def test_a_slot_whose_claimer_died_mid_backup_is_taken_over_once() -> None:
    c = Cluster(Schedule(full="* * * * *"), n=3)
    c.backup.gate = asyncio.Event()  # the backup hangs: its member dies in the middle
    c.clock.now = at(seconds=1)
    won = await asyncio.gather(*(s.tick() for s in c.schedulers.values()))
    assert won.count(True) == 1
    claimer = c.names[won.index(True)]
    # while the claimer lives, nobody else starts a backup (pgBackRest runs one at a time)
    c.clock.now = at(seconds=20)
    assert (await asyncio.gather(*(s.tick() for s in c.schedulers.values()))).count(True) == 0
    # it dies: its run is cancelled (pgBackRest dies with the agent), its member key lapses
    c.schedulers[claimer].running.cancel()
    c.kill(claimer)
    c.backup.gate.set()
    others = [n for n in c.names if n != claimer]
    won = await asyncio.gather(*(c.schedulers[n].tick() for n in others))
    assert won.count(True) == 1
    await c.settle()
    rec = c.record("full")
    assert rec["state"] == "ok" and rec["attempt"] == 2 and rec["member"] != claimer
    assert rec["slot"] == "2026-12-06T02:00:00Z"
    assert [r[1] for r in c.records].count("taken_over") == 1
    # done: nobody runs it a third time
    assert (await asyncio.gather(*(c.schedulers[n].tick() for n in others))).count(True) == 0
    assert len(c.backup.runs) == 2


async def test_a_restarted_claimer_does_not_leave_its_slot_held() -> None:
    c = Cluster(Schedule(full="* * * * *"), n=1)
    c.backup.gate = asyncio.Event()
    c.clock.now = at(seconds=1)
    assert await c.schedulers["pg1"].tick() is True
    c.schedulers["pg1"].running.cancel()
    # the same member comes back as a new agent process (another pid)
    c.pids["pg1"] = 999
    c.backup.gate.set()
    again = c.scheduler("pg1", Schedule(full="* * * * *"))
    assert await again.tick() is True
    await asyncio.sleep(0.05)
    assert c.record("full")["pid"] == 999 and c.record("full")["state"] == "ok"


async def test_a_failed_backup_is_recorded_not_retried_and_the_last_success_is_kept() -> None:
    c = Cluster(Schedule(full="* * * * *"), n=2)
    c.clock.now = at(seconds=1)
    await c.race()
    first = c.record("full")["last_success"]
    assert first["slot"] == "2026-12-06T02:00:00Z"
    c.backup.fail = "pgbackrest backup: [082] WAL segment was not archived"
    c.clock.now = at(minutes=1, seconds=1)
    await c.race()
    rec = c.record("full")
    assert rec["state"] == "failed" and "[082]" in rec["error"]
    assert rec["last_success"] == first
    c.clock.now = at(minutes=1, seconds=40)
    assert (await c.race()).count(True) == 0  # a failed slot is not run again
    assert any(r[1] == "failed" for r in c.records)

    registry = CollectorRegistry()
    scheduler = c.schedulers["pg2"]
    await scheduler.read_records()  # any member's view of the records will do
    registry.register(BackupScheduleMetrics(scheduler))
    value = registry.get_sample_value(
        "pgsidecar_backup_last_success_timestamp_seconds", {"type": "full"}
    )
    assert value == pytest.approx(at(seconds=1).timestamp())
    assert (
        registry.get_sample_value("pgsidecar_backup_last_scheduled_failed", {"type": "full"}) == 1
    )


async def test_a_full_and_a_diff_due_together_run_the_full_only() -> None:
    c = Cluster(Schedule(full="0 2 * * 0", diff="0 2 * * *"), n=2)
    c.clock.now = at(seconds=1)
    await c.race()
    c.clock.now = at(seconds=30)
    await c.race()
    assert [k for _m, k in c.backup.runs] == ["full"]
    c.clock.now = at(days=1, seconds=1)
    await c.race()
    assert [k for _m, k in c.backup.runs] == ["full", "diff"]


async def test_a_member_that_cannot_run_a_backup_never_claims() -> None:
    c = Cluster(Schedule(full="* * * * *"), n=1)
    c.schedulers["pg1"].eligible = lambda: False
    c.clock.now = at(seconds=1)
    assert await c.schedulers["pg1"].tick() is False
    assert c.dcs.backup_slots == {}


async def test_the_wait_between_rounds_is_bounded_and_wakes_at_the_next_slot() -> None:
    c = Cluster(Schedule(full="* * * * *"), n=1)
    s = c.schedulers["pg1"]
    c.clock.now = at(seconds=55)
    assert s.sleep_time() == pytest.approx(5.2)
    c.clock.now = at(seconds=1)
    assert s.sleep_time() == s.max_sleep


def lose_the_answer_of_the_next_swap(dcs: FakeDCS) -> None:
    """The next compare-and-set reaches the store, but its answer is lost (a timeout)."""
    original = dcs.swap_backup_slot

    async def swap(kind: str, value: dict[str, Any], index: int) -> bool:
        dcs.swap_backup_slot = original  # type: ignore[method-assign]
        await original(kind, value, index)
        raise DCSError("no answer within 5s")

    dcs.swap_backup_slot = swap  # type: ignore[method-assign]


async def test_a_claim_whose_answer_was_lost_is_run_by_its_claimer_not_left_standing() -> None:
    c = Cluster(Schedule(full="* * * * *"), n=2)
    pg1 = c.schedulers["pg1"]
    c.clock.now = at(seconds=1)
    lose_the_answer_of_the_next_swap(c.dcs)
    with pytest.raises(DCSError):
        await pg1.tick()
    assert c.record("full")["member"] == "pg1" and c.backup.runs == []
    # pg2 sees a live member's backup running and waits; pg1 finds its own claim and runs it
    assert await c.schedulers["pg2"].tick() is False
    c.clock.now = at(seconds=20)
    assert await pg1.tick() is True
    await c.settle()
    assert c.backup.runs == [("pg1", "full")] and c.record("full")["state"] == "ok"
    assert [r[1] for r in c.records] == ["resumed", "ok"]


async def test_a_lost_claim_past_its_grace_window_is_closed_so_later_slots_run() -> None:
    c = Cluster(Schedule(full="0 2 * * *", grace="30m"), n=2)
    c.clock.now = at(seconds=1)
    lose_the_answer_of_the_next_swap(c.dcs)
    with pytest.raises(DCSError):
        await c.schedulers["pg1"].tick()
    c.clock.now = at(hours=1)  # pg1's next round comes after the window (it was partitioned)
    assert await c.schedulers["pg1"].tick() is False
    assert c.record("full")["state"] == "failed" and c.backup.runs == []
    c.clock.now = at(days=1, seconds=1)
    assert await c.schedulers["pg2"].tick() is True
    await c.settle()
    assert c.backup.runs == [("pg2", "full")]
