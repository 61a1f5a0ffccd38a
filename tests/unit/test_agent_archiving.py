"""Continuous archiving in the agent, against in-memory ports and a fake pgBackRest: every role's
config gets archive_mode and archive_command (a standby's also restore_command) from the local
config, over the cluster's; pgbackrest.conf is written before PostgreSQL starts; the master
creates the stanza after its promotion, and a failure is recorded and retried while it stays
master, without holding the promotion up."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from fsm.machine import EFFECT, Effect, Role
from pgsidecar.backup import BackupError
from pgsidecar.config import AgentConfig
from tests.unit.agent_fakes import Rig, put
from tests.unit.test_agent_effects import promoting

ARCHIVE = "/usr/bin/pgbackrest --stanza=c1 archive-push %p"
RESTORE = '/usr/bin/pgbackrest --stanza=c1 archive-get %f "%p"'


class FakePgBackRest:
    def __init__(self) -> None:
        self.configs_written = 0
        self.stanza_calls = 0
        self.fail_stanza: list[BackupError] = []

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
