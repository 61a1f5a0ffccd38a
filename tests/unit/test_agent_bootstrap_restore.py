"""The bootstrap from another cluster's repository in the agent, against in-memory ports: the
member that wins the initialise race restores instead of running initdb and then goes on exactly
as after initdb (started, elected, promoted); a failed restore is wiped and the initialize key
given back; a section whose credentials cannot be read stops the agent with 2 before PostgreSQL
is touched, on a member that could initialise the cluster only."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

from fsm.machine import Effect, Role
from fsm.snapshot import DataState
from pgsidecar.backup import BackupSettingsError
from pgsidecar.backup.pitr import RecoveryError, RecoveryResult
from tests.support.agent_fakes import Rig


class FakeBootstrap:
    """A restore that leaves what the real one leaves: a cleanly stopped primary's data
    directory on a new timeline (the source's was 1, the recovery's promotion made 2)."""

    def __init__(self, rig_pg: object | None = None) -> None:
        self.pg: object | None = rig_pg
        self.restores = 0
        self.checks = 0
        self.fail: Exception | None = None
        self.check_fail: Exception | None = None
        self.gate: asyncio.Event | None = None  # restore() waits for it when set
        # a restore began and was neither completed nor wiped (the real one: a marker file)
        self.in_progress = False
        self.settled = 0

    def check(self) -> None:
        self.checks += 1
        if self.check_fail is not None:
            raise self.check_fail

    async def restore(self) -> RecoveryResult:
        self.restores += 1
        self.in_progress = True
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        pg = self.pg
        assert pg is not None
        pg.data = DataState.PRIMARY_CLEAN  # type: ignore[attr-defined]
        pg.timeline, pg.lsn = 2, 5000  # type: ignore[attr-defined]
        pg.history_files.add(2)  # type: ignore[attr-defined]
        self.settle()
        return RecoveryResult(system_id="7300000000000000001", timeline=2)

    def interrupted(self) -> bool:
        return self.in_progress

    def settle(self) -> None:
        self.settled += 1
        self.in_progress = False


def rig_with(tmp: Path, data: DataState = DataState.MISSING) -> tuple[Rig, FakeBootstrap]:
    boot = FakeBootstrap()
    rig = Rig(tmp, data=data, bootstrap=boot)
    boot.pg = rig.pg
    return rig, boot


async def until(cond: Callable[[], bool], within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not cond():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def actions(rig: Rig, name: str) -> list[dict[str, object]]:
    return [r.body for r in rig.sink.of("action") if r.body["name"] == name]


async def test_the_winner_restores_instead_of_initdb_then_leads_on_a_timeline_of_its_own(
    tmp_path: Path,
) -> None:
    rig, boot = rig_with(tmp_path)
    run = asyncio.ensure_future(rig.agent.run())
    try:
        await until(lambda: rig.agent.state.role is Role.MASTER and not rig.agent.snapshot.busy)
        assert boot.checks == 1 and boot.restores == 1
        assert rig.pg.called("initdb") == []
        (done,) = actions(rig, "restore_from_repository")
        assert done["outcome"] == "ok"
        assert done["system_id"] == "7300000000000000001" and done["timeline"] == 2
        assert rig.dcs.initialize == "pg1"
        # exactly as after initdb: started read-only, elected, promoted (one more timeline,
        # claimed in the DCS above the restore's)
        assert rig.pg.running and not rig.pg.in_recovery and rig.pg.timeline == 3
        rig.agent.request_stop()
        assert await asyncio.wait_for(run, 10) == 0
    finally:
        run.cancel()


async def test_a_failed_restore_is_wiped_and_the_initialize_key_given_back(
    tmp_path: Path,
) -> None:
    rig, boot = rig_with(tmp_path)
    boot.fail = RecoveryError("recovery ended before the target: archive ends at 0/3000000")
    await rig.agent.run_effect("bootstrap", Effect.BOOTSTRAP)
    (outcome,) = [d for t, d in rig.posted() if t == "effect"]
    assert outcome["ok"] is False and "archive ends" in outcome["error"]
    assert rig.pg.called("wipe_data") == [()], "a partial restore must not look like data"
    assert not boot.interrupted(), "wiped: nothing for the next start to clean up"
    assert rig.dcs.initialize is None, "the next attempt races again"
    (failed,) = actions(rig, "restore_from_repository")
    assert failed["outcome"] == "failed" and "archive ends" in str(failed["error"])


async def test_a_partial_restore_that_cannot_be_wiped_stays_marked_for_the_next_start(
    tmp_path: Path,
) -> None:
    rig, boot = rig_with(tmp_path)
    boot.fail = RecoveryError("restore timed out")
    rig.pg.fail["wipe_data"] = OSError("read-only file system")
    await rig.agent.run_effect("bootstrap", Effect.BOOTSTRAP)
    (outcome,) = [d for t, d in rig.posted() if t == "effect"]
    assert outcome["ok"] is False and "timed out" in outcome["error"]
    assert rig.dcs.initialize is None and boot.interrupted()


async def test_a_restore_cancelled_by_the_agent_s_stop_is_wiped_and_the_key_given_back(
    tmp_path: Path,
) -> None:
    """Stopping the agent mid-restore (hours, for a large source) must not leave a partial
    data directory that the next start would take for the cluster's data."""
    rig, boot = rig_with(tmp_path)
    boot.gate = asyncio.Event()
    effect = asyncio.ensure_future(rig.agent.run_effect("bootstrap", Effect.BOOTSTRAP))
    await until(lambda: boot.restores == 1)
    assert rig.dcs.initialize == "pg1"
    effect.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await effect
    assert rig.pg.called("wipe_data") == [()]
    assert rig.dcs.initialize is None
    (failed,) = actions(rig, "restore_from_repository")
    assert failed["outcome"] == "failed" and failed["error"] == "cancelled"


async def test_a_restore_its_agent_died_in_is_wiped_at_the_next_start_and_raced_again(
    tmp_path: Path,
) -> None:
    """A member killed mid-restore left a partial data directory (with the source's recovery
    target in postgresql.auto.conf) and the initialize key naming it. Its next run wipes the
    data and gives the key back before anything starts PostgreSQL; the race runs again."""
    rig, boot = rig_with(tmp_path, data=DataState.STANDBY)
    boot.in_progress = True
    rig.dcs.initialize = "pg1"
    run = asyncio.ensure_future(rig.agent.run())
    try:
        await until(lambda: rig.agent.state.role is Role.MASTER and not rig.agent.snapshot.busy)
        names = [c[0] for c in rig.pg.calls]
        assert names.index("wipe_data") < names.index("start"), names
        (abandoned, done) = actions(rig, "restore_from_repository")
        assert abandoned["outcome"] == "abandoned" and done["outcome"] == "ok"
        assert boot.restores == 1 and not boot.interrupted()
        assert rig.dcs.initialize == "pg1"
        rig.agent.request_stop()
        assert await asyncio.wait_for(run, 10) == 0
    finally:
        run.cancel()


async def test_a_member_that_lost_the_race_restores_nothing(tmp_path: Path) -> None:
    rig, boot = rig_with(tmp_path)
    rig.dcs.initialize = "pg2"
    await rig.agent.run_effect("bootstrap", Effect.BOOTSTRAP)
    (outcome,) = [d for t, d in rig.posted() if t == "effect"]
    assert outcome == {"name": Effect.BOOTSTRAP, "ok": True, "won": False}
    assert boot.restores == 0 and rig.pg.called("wipe_data") == []


async def test_unreadable_credentials_stop_a_member_without_data_with_2(tmp_path: Path) -> None:
    rig, boot = rig_with(tmp_path)
    boot.check_fail = BackupSettingsError("cannot read backup.repository.key_file /k")
    code = await asyncio.wait_for(rig.agent.run(), 10)
    assert code == 2
    assert rig.pg.calls == [("write_passfile", ())], "PostgreSQL was not touched"
    assert rig.dcs.initialize is None and rig.dcs.leader is None


async def test_a_member_with_data_never_bootstraps_so_its_section_is_not_checked(
    tmp_path: Path,
) -> None:
    rig, boot = rig_with(tmp_path, data=DataState.STANDBY)
    rig.cfg.postgresql.data_dir.mkdir(parents=True)
    (rig.cfg.postgresql.data_dir / "PG_VERSION").write_text("15\n")
    boot.check_fail = BackupSettingsError("cannot read backup.repository.key_file /k")
    run = asyncio.ensure_future(rig.agent.run())
    try:
        await until(lambda: rig.agent.state.role is not Role.INIT)
        assert not run.done() and boot.checks == 0 and boot.restores == 0
        rig.agent.request_stop()
        assert await asyncio.wait_for(run, 10) == 0
    finally:
        run.cancel()
