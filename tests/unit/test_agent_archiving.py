"""Continuous archiving in the agent, against in-memory ports and a fake pgBackRest: every role's
config gets archive_mode and archive_command (a standby's also restore_command) from the local
config, over the cluster's; pgbackrest.conf is written before PostgreSQL starts; the master
creates the stanza after its promotion, and a failure is recorded and retried while it stays
master, without holding the promotion up."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from fsm.machine import EFFECT, Effect, Role
from pgsidecar.backup import BackupError, BackupSet, StanzaInfo
from pgsidecar.config import AgentConfig
from tests.support.agent_fakes import Rig, put
from tests.unit.test_agent_effects import promoting, run, with_master
from tests.unit.test_cli_backup import backup_set

ARCHIVE = "/usr/bin/pgbackrest --stanza=c1 archive-push %p"
RESTORE = '/usr/bin/pgbackrest --stanza=c1 archive-get %f "%p"'


class FakePgBackRest:
    def __init__(self) -> None:
        self.configs_written = 0
        self.stanza_calls = 0
        self.fail_stanza: list[BackupError] = []
        self.backups: list[str] = []  # labels in the repository
        self.restored: list[tuple[Path, bool]] = []
        self.fail_restore: BackupError | None = None
        self.sets: list[BackupSet] | None = None  # what info lists, when not made from backups
        self.info_timeouts: list[float] = []  # the timeout of each info call
        self.fail_info: BackupError | None = None

    def archive_parameters(self) -> dict[str, str]:
        return {"archive_mode": "on", "archive_command": ARCHIVE}

    def restore_command(self) -> str:
        return RESTORE

    def write_config(self) -> None:
        self.configs_written += 1

    async def stanza_create(self, timeout: float = 300.0) -> None:  # noqa: ASYNC109
        self.stanza_calls += 1
        if self.fail_stanza:
            raise self.fail_stanza.pop(0)

    async def info(self, timeout: float = 60.0) -> StanzaInfo:  # noqa: ASYNC109
        self.info_timeouts.append(timeout)
        if self.fail_info is not None:
            raise self.fail_info
        if self.sets is not None:
            return StanzaInfo("c1", 0, "ok", backups=list(self.sets))
        return StanzaInfo(
            "c1", 0, "ok", backups=[backup_set(label, "full", 1) for label in self.backups]
        )

    async def restore(self, data_dir: Path, *, standby: bool = False) -> None:
        self.restored.append((data_dir, standby))
        if self.fail_restore is not None:
            raise self.fail_restore


@pytest.fixture
def br() -> FakePgBackRest:
    return FakePgBackRest()


@pytest.fixture
def rig(tmp_path: Path, br: FakePgBackRest) -> Rig:
    return Rig(tmp_path, pgbackrest=br)


async def promote(rig: Rig) -> None:
    await promoting(rig)
    # the DCS asks for another archive_command: the local config's wins
    rig.agent.state.dcs_view.config["postgresql"]["parameters"]["archive_command"] = "/bin/true"
    await rig.agent.run_effect(
        next(t for t, e in EFFECT.items() if e is Effect.PROMOTE), Effect.PROMOTE
    )


async def test_every_role_archives_and_a_standby_restores_from_the_repository(rig: Rig) -> None:
    await promote(rig)
    promoting_config, primary_config = rig.pg.configs[-2], rig.pg.configs[-1]
    assert promoting_config[0] == "standby" and primary_config[0] == "primary"
    for _, _, _, params in (promoting_config, primary_config):
        assert params["archive_mode"] == "on" and params["archive_command"] == ARCHIVE
    assert promoting_config[3]["restore_command"] == RESTORE
    assert "restore_command" not in primary_config[3]
    rig.agent.config.write_standby(None)
    assert rig.pg.configs[-1][3]["restore_command"] == RESTORE


async def test_no_backup_section_no_archiving(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    await promoting(rig)
    rig.agent.config.write_primary()
    rig.agent.config.write_standby(None)
    for config in rig.pg.configs[-2:]:
        assert not {"archive_mode", "archive_command", "restore_command"} & set(config[3])
    assert rig.agent.archiving is None


async def test_the_stanza_is_created_after_the_promotion(rig: Rig, br: FakePgBackRest) -> None:
    await promote(rig)
    archiving = rig.agent.archiving
    assert archiving is not None
    await asyncio.sleep(0.05)
    assert br.stanza_calls == 1 and archiving.stanza_ok is True
    actions = [r.body for r in rig.sink.of("action") if r.body["name"] == "stanza_create"]
    assert [a["outcome"] for a in actions] == ["ok"]


async def test_a_failed_stanza_is_recorded_and_retried_while_master(
    rig: Rig, br: FakePgBackRest
) -> None:
    archiving = rig.agent.archiving
    assert archiving is not None
    archiving.first_retry = 0.02
    br.fail_stanza = [BackupError("pgbackrest stanza-create: [055] unable to load info file")] * 2
    await promote(rig)
    posted = [d for t, d in rig.posted() if t == "effect"]
    # the promotion did not wait for the repository
    assert posted == [{"name": Effect.PROMOTE, "ok": True}]
    for _ in range(100):
        if archiving.stanza_ok:
            break
        await asyncio.sleep(0.01)
    assert br.stanza_calls == 3 and archiving.stanza_ok is True and archiving.failures == 2
    outcomes = [r.body for r in rig.sink.of("action") if r.body["name"] == "stanza_create"]
    assert [a["outcome"] for a in outcomes] == ["failed", "failed", "ok"]
    assert "[055]" in outcomes[0]["error"]


async def test_no_retry_once_no_longer_master(rig: Rig, br: FakePgBackRest) -> None:
    archiving = rig.agent.archiving
    assert archiving is not None
    archiving.first_retry = 0.05
    br.fail_stanza = [BackupError("repository unreachable")] * 5
    await promote(rig)
    await asyncio.sleep(0.01)
    put(rig, Role.DEMOTED)
    await asyncio.sleep(0.15)
    assert br.stanza_calls == 1 and archiving.stanza_ok is False
    assert archiving.last_error == "repository unreachable"


class UnwritableRepository(FakePgBackRest):
    def write_config(self) -> None:
        raise BackupError("the backup repository /x is not reachable")


async def test_pgbackrest_conf_that_cannot_be_written_stops_the_agent(tmp_path: Path) -> None:
    rig = Rig(tmp_path, pgbackrest=UnwritableRepository())
    code = await asyncio.wait_for(rig.agent.run(), 10)
    assert code == 2  # a config error: nothing started, archiving would fail
    assert rig.pg.called("start") == [] and rig.dcs.leader is None


def test_the_config_refuses_archive_parameters_beside_a_backup_section(tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "name": "pg1",
        "cluster": "c1",
        "state_dir": str(tmp_path),
        "postgresql": {"data_dir": str(tmp_path / "d"), "parameters": {"archive_command": "cp"}},
    }
    AgentConfig.model_validate(base)  # without backup: the member's own archive_command
    with pytest.raises(ValidationError, match="archive_command, which the agent writes"):
        AgentConfig.model_validate(
            {**base, "backup": {"repository": {"type": "posix", "path": "/var/backup"}}}
        )


# -- a new replica from the repository ---------------------------------------------------------


async def test_a_new_replica_is_restored_from_the_latest_backup(
    rig: Rig, br: FakePgBackRest
) -> None:
    br.backups = ["20261203-050000F", "20261203-050000F_20261203-060000I"]
    with_master(rig)
    out, _ = await run(rig, Effect.CLONE)
    assert out == {"name": Effect.CLONE, "ok": True, "source": "repository"}
    assert br.restored == [(rig.cfg.postgresql.data_dir, True)]
    assert rig.pg.called("basebackup") == []
    assert rig.pg.called("wipe_data") == [()]  # restore needs an empty directory
    (action,) = [r.body for r in rig.sink.of("action") if r.body["name"] == "restore_replica"]
    assert action["outcome"] == "ok" and action["backup"] == "20261203-050000F_20261203-060000I"


async def test_pg_basebackup_when_the_repository_has_no_backup(
    rig: Rig, br: FakePgBackRest
) -> None:
    with_master(rig)
    out, _ = await run(rig, Effect.CLONE)
    assert out == {"name": Effect.CLONE, "ok": True, "source": "pg2"}
    assert br.restored == [] and len(rig.pg.called("basebackup")) == 1


async def test_pg_basebackup_when_the_restore_fails(rig: Rig, br: FakePgBackRest) -> None:
    br.backups = ["20261203-050000F"]
    br.fail_restore = BackupError("pgbackrest restore: [104] unable to find backup set")
    with_master(rig)
    out, _ = await run(rig, Effect.CLONE)
    assert out == {"name": Effect.CLONE, "ok": True, "source": "pg2"}
    # the partial restore is wiped before the copy
    assert rig.pg.called("wipe_data") == [(), ()] and len(rig.pg.called("basebackup")) == 1
    (action,) = [r.body for r in rig.sink.of("action") if r.body["name"] == "restore_replica"]
    assert action["outcome"] == "failed" and "[104]" in action["error"]


# -- /metrics ----------------------------------------------------------------------------------


async def test_metrics_show_the_archivers_health_and_the_stanza(rig: Rig) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from pgsidecar.agent.archiving import ArchivingMetrics

    archiving = rig.agent.archiving
    assert archiving is not None
    registry = CollectorRegistry()
    registry.register(ArchivingMetrics(archiving, rig.clock))

    def scrape() -> dict[str, float]:
        text = generate_latest(registry).decode()
        return {
            ln.split()[0]: float(ln.split()[1])
            for ln in text.splitlines()
            if ln and not ln.startswith("#")
        }

    assert scrape() == {"pgsidecar_backup_stanza_failures": 0.0}  # nothing known yet
    now = rig.clock.wall()
    archiving.archiver = (12, now - 30, 3, now - 100)
    archiving.stanza_ok, archiving.failures = True, 1
    m = scrape()
    assert 29 <= m["pgsidecar_archive_last_archived_age_seconds"] <= 31
    assert m["pgsidecar_archive_archived_count"] == 12
    assert m["pgsidecar_archive_failed_count"] == 3
    assert m["pgsidecar_archive_failing"] == 0  # archived since the last failure
    assert m["pgsidecar_backup_stanza_ok"] == 1 and m["pgsidecar_backup_stanza_failures"] == 1
    archiving.archiver = (12, now - 30, 4, now - 1)
    assert scrape()["pgsidecar_archive_failing"] == 1


async def test_the_archiver_is_read_while_postgresql_runs(rig: Rig) -> None:
    archiving = rig.agent.archiving
    assert archiving is not None
    reads = 0
    running = False

    async def read() -> tuple[int, float | None, int, float | None]:
        nonlocal reads
        reads += 1
        return reads, None, 0, None

    task = asyncio.ensure_future(archiving.watch_archiver(read, lambda: running, every=0.01))
    await asyncio.sleep(0.05)
    assert reads == 0 and archiving.archiver is None
    running = True
    await asyncio.sleep(0.05)
    task.cancel()
    assert reads > 0 and archiving.archiver == (reads, None, 0, None)


# -- backup health (/status, list, /metrics) ----------------------------------------------------


def finished(rig: Rig, label: str, kind: str, seconds_ago: float) -> BackupSet:
    """A backup of the repository that finished ``seconds_ago`` on the rig's wall clock."""
    stop = datetime.fromtimestamp(rig.clock.wall() - seconds_ago, tz=UTC)
    return dataclasses.replace(backup_set(label, kind, 1), stop=stop)


async def test_the_master_reads_the_newest_backup_once_per_interval_bounded_by_a_timeout(
    rig: Rig, br: FakePgBackRest
) -> None:
    archiving = rig.agent.archiving
    assert archiving is not None
    br.sets = [finished(rig, "F", "full", 7200), finished(rig, "F_I", "incr", 3600)]
    put(rig, Role.MASTER)
    task = asyncio.ensure_future(archiving.watch_backups(every=0.3, read_timeout=7, poll=0.01))
    try:
        await asyncio.sleep(0.1)
        assert br.info_timeouts == [7]  # once, however many polls
        health = archiving.health()
        assert (health["last_backup"], health["last_backup_type"]) == ("F_I", "incr")
        assert 3600 <= health["last_backup_age"] <= 3601
        assert health["backups_read_age"] < 1 and health["backups_error"] is None
        await asyncio.sleep(0.35)
        assert br.info_timeouts == [7, 7]  # the next interval's read
    finally:
        task.cancel()


async def test_a_failed_read_keeps_the_last_backup_and_says_why(
    rig: Rig, br: FakePgBackRest
) -> None:
    archiving = rig.agent.archiving
    assert archiving is not None
    put(rig, Role.MASTER)
    br.sets = [finished(rig, "F", "full", 60)]
    await archiving.read_backups()
    br.fail_info = BackupError("pgbackrest info: [039] repository unreachable")
    await archiving.read_backups()
    health = archiving.health()
    assert health["last_backup"] == "F" and 60 <= health["last_backup_age"] <= 61
    assert "[039]" in health["backups_error"]


async def test_a_replica_reads_no_repository_and_keeps_no_age_from_when_it_was_master(
    rig: Rig, br: FakePgBackRest
) -> None:
    archiving = rig.agent.archiving
    assert archiving is not None
    br.sets = [finished(rig, "F", "full", 60)]
    put(rig, Role.REPLICA)
    task = asyncio.ensure_future(archiving.watch_backups(every=0.3, poll=0.01))
    try:
        await asyncio.sleep(0.05)
        assert br.info_timeouts == []
        assert archiving.health()["last_backup_age"] is None
        put(rig, Role.MASTER)
        await asyncio.sleep(0.05)
        assert archiving.health()["last_backup"] == "F"
        put(rig, Role.DEMOTED)
        await asyncio.sleep(0.05)
        assert archiving.health()["last_backup"] is None
        assert archiving.health()["backups_read_age"] is None
    finally:
        task.cancel()


async def test_health_shows_the_masters_archiving_and_failing_when_the_last_attempt_failed(
    rig: Rig,
) -> None:
    archiving = rig.agent.archiving
    assert archiving is not None
    now = rig.clock.wall()
    archiving.archiver = (12, now - 30, 3, now - 100)
    put(rig, Role.MASTER)
    health = archiving.health()
    assert 30 <= health["last_archived_age"] <= 31
    assert health["archive_failing"] is False
    assert (health["archived_count"], health["failed_count"]) == (12, 3)
    archiving.archiver = (12, now - 30, 4, now - 1)
    assert archiving.health()["archive_failing"] is True
    archiving.archiver = (0, None, 1, now - 1)  # never archived, failed once
    assert archiving.health()["archive_failing"] is True
    # a replica does not archive (archive_mode on): its counters say nothing of the cluster
    put(rig, Role.REPLICA)
    health = archiving.health()
    assert health["archive_failing"] is None and health["last_archived_age"] is None


async def test_metrics_show_the_age_of_the_last_backup(rig: Rig, br: FakePgBackRest) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from pgsidecar.agent.archiving import ArchivingMetrics

    archiving = rig.agent.archiving
    assert archiving is not None
    registry = CollectorRegistry()
    registry.register(ArchivingMetrics(archiving, rig.clock))
    assert "\npgsidecar_backup_last_age_seconds " not in generate_latest(registry).decode()
    put(rig, Role.MASTER)
    br.sets = [finished(rig, "F", "full", 5400)]
    await archiving.read_backups()
    (line,) = [
        ln
        for ln in generate_latest(registry).decode().splitlines()
        if ln.startswith("pgsidecar_backup_last_age_seconds ")
    ]
    assert 5400 <= float(line.split()[1]) <= 5401
