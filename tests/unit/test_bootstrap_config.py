"""The ``bootstrap`` section of the agent config (a new cluster's data restored from another
cluster's pgBackRest repository) without running anything: its validation and messages, the
recovery target it becomes, what the member builds from it, the refusal of a bad section by
``pgsidecar run`` before PostgreSQL is touched, and the recovery's clean-up of postgresql.auto.conf."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgsidecar.backup import PosixRepository, S3Repository
from pgsidecar.backup.member import member_bootstrap
from pgsidecar.backup.pitr import RecoveryError, forget_recovery, recovery_target
from pgsidecar.cli import main
from pgsidecar.config import AgentConfig, ConfigError, load_config
from tests.support.pgtestutil import RecordingLog

SOURCE = {"type": "posix", "path": "/srv/backup/orders"}


def base(tmp: Path, **extra: Any) -> dict[str, Any]:
    return {
        "name": "pg1",
        "cluster": "orders-restored",
        "state_dir": str(tmp / "state"),
        "postgresql": {"data_dir": str(tmp / "data")},
        **extra,
    }


def load(tmp: Path, data: dict[str, Any], env: dict[str, str] | None = None) -> AgentConfig:
    path = tmp / "agent.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(path, environ=env or {})


def load_text(tmp: Path, text: str) -> AgentConfig:
    path = tmp / "agent.yaml"
    path.write_text(text)
    return load_config(path, environ={})


def refused(tmp: Path, data: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp, data, env)
    return str(info.value)


def test_without_a_section_the_cluster_is_initialised_by_initdb(tmp_path: Path) -> None:
    cfg = load(tmp_path, base(tmp_path))
    assert cfg.bootstrap.method == "initdb"
    assert member_bootstrap(cfg, RecordingLog()) is None


def test_a_restore_to_a_time_written_as_yaml_reads_as_an_aware_time(tmp_path: Path) -> None:
    """YAML reads an unquoted timestamp itself: with its offset it is the same instant."""
    cfg = load_text(
        tmp_path,
        f"""
name: pg1
cluster: orders-restored
state_dir: {tmp_path / "state"}
postgresql: {{data_dir: {tmp_path / "data"}}}
bootstrap:
  method: pgbackrest
  repository: {{type: posix, path: /srv/backup/orders}}
  stanza: orders
  target:
    time: 2026-12-03 07:00:00+02:00
    inclusive: false
""",
    )
    boot = cfg.bootstrap
    assert boot.method == "pgbackrest" and boot.stanza == "orders"
    assert boot.repository == PosixRepository(path=Path("/srv/backup/orders"))
    assert boot.target is not None and boot.target.time == datetime(2026, 12, 3, 5, tzinfo=UTC)
    target = recovery_target(boot.target)
    assert (target.type, target.target, target.action, target.inclusive) == (
        "time",
        "2026-12-03 05:00:00.000000+00",
        "promote",
        False,
    )
    built = member_bootstrap(cfg, RecordingLog())
    assert built is not None
    # the source's pgBackRest: its own stanza and files, never the member's own pgbackrest.conf
    assert built.source.stanza == "orders"
    assert built.source.config_path == tmp_path / "state" / "bootstrap" / "pgbackrest" / (
        "pgbackrest.conf"
    )
    assert built.server.data_dir == tmp_path / "data"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ({"lsn": "0/3000060"}, ("lsn", "0/3000060", True)),
        ({"xid": 1234, "inclusive": False}, ("xid", "1234", False)),
        ({"name": "before upgrade"}, ("name", "before upgrade", True)),
        (None, ("default", None, True)),
    ],
)
def test_each_kind_of_target_becomes_the_restore_s_target(
    tmp_path: Path, target: dict[str, Any] | None, expected: tuple[Any, ...]
) -> None:
    section: dict[str, Any] = {"method": "pgbackrest", "repository": SOURCE, "stanza": "orders"}
    if target is not None:
        section["target"] = target
    cfg = load(tmp_path, base(tmp_path, bootstrap=section))
    rt = recovery_target(cfg.bootstrap.target)
    assert (rt.type, rt.target, rt.inclusive) == expected
    assert rt.action == "promote"


def test_a_target_set_by_an_environment_override(tmp_path: Path) -> None:
    section = {"method": "pgbackrest", "repository": SOURCE, "stanza": "orders"}
    cfg = load(
        tmp_path,
        base(tmp_path, bootstrap=section),
        env={"PGSIDECAR_BOOTSTRAP__TARGET__XID": "4711"},
    )
    assert cfg.bootstrap.target is not None and cfg.bootstrap.target.xid == 4711


@pytest.mark.parametrize(
    ("section", "field", "words"),
    [
        (
            {"method": "pgbackrest", "repository": SOURCE, "stanza": "o", "target": {}},
            "bootstrap.target",
            ["exactly one of time, lsn, xid or name", "none is set"],
        ),
        (
            {
                "method": "pgbackrest",
                "repository": SOURCE,
                "stanza": "o",
                "target": {"time": "2026-12-03T05:00:00Z", "lsn": "0/1"},
            },
            "bootstrap.target",
            ["exactly one", "sets time and lsn"],
        ),
        (
            {
                "method": "pgbackrest",
                "repository": SOURCE,
                "stanza": "o",
                "target": {"time": "2026-12-03T05:00:00"},
            },
            "bootstrap.target.time",
            ["needs a time zone", "2026-12-03T05:00:00Z"],
        ),
        (
            {"method": "pgbackrest", "repository": SOURCE, "stanza": "o", "target": {"lsn": "3"}},
            "bootstrap.target.lsn",
            ["should match pattern"],
        ),
        (
            {"method": "pgbackrest", "repository": SOURCE, "stanza": "o", "target": {"xid": 1}},
            "bootstrap.target.xid",
            ["greater than or equal to 3"],
        ),
        (
            {
                "method": "pgbackrest",
                "repository": SOURCE,
                "stanza": "o",
                "target": {"xid": 4711, "name": "p1"},
            },
            "bootstrap.target",
            ["exactly one", "sets xid and name"],
        ),
        (
            {
                "method": "pgbackrest",
                "repository": SOURCE,
                "stanza": "o",
                "target": {"name": "p1", "inclusive": False},
            },
            "bootstrap.target",
            ["inclusive: false does not apply to a restore point"],
        ),
        (
            {"method": "pgbackrest", "repository": SOURCE, "stanza": "o", "target": {"name": "a'"}},
            "bootstrap.target.name",
            ["cannot hold a quote"],
        ),
        (
            {"method": "pgbackrest", "repository": SOURCE},
            "bootstrap",
            ["method pgbackrest needs stanza", "the source cluster's name"],
        ),
        (
            {"method": "pgbackrest", "stanza": "orders"},
            "bootstrap",
            ["method pgbackrest needs repository"],
        ),
        (
            {"repository": SOURCE, "stanza": "orders"},
            "bootstrap",
            ["method initdb takes no repository, stanza", "set method: pgbackrest"],
        ),
        (
            {"method": "basebackup"},
            "bootstrap.method",
            ["'initdb' or 'pgbackrest'"],
        ),
        (
            {"method": "pgbackrest", "repository": {"type": "posix", "path": "rel"}, "stanza": "o"},
            "bootstrap.repository.posix.path",
            ["must be an absolute path"],
        ),
        (
            {"method": "pgbackrest", "repository": SOURCE, "stanza": "o", "stanzas": "o"},
            "bootstrap.stanzas",
            ["unknown field"],
        ),
    ],
)
def test_a_bad_section_is_refused_naming_the_field_and_what_to_do(
    tmp_path: Path, section: dict[str, Any], field: str, words: list[str]
) -> None:
    message = refused(tmp_path, base(tmp_path, bootstrap=section))
    line = next((ln for ln in message.splitlines() if ln.strip().startswith(f"{field}:")), None)
    assert line is not None, message
    for word in words:
        assert word in line, line


def test_restoring_from_the_cluster_s_own_stanza_in_its_own_repository_is_refused(
    tmp_path: Path,
) -> None:
    """The restored cluster would archive its new timeline into the stanza it restores from."""
    own = {"type": "posix", "path": "/srv/backup/orders"}
    same = base(
        tmp_path,
        cluster="orders",
        backup={"repository": own},
        bootstrap={
            "method": "pgbackrest",
            "repository": {"type": "posix", "path": "/srv/backup/./orders/"},
            "stanza": "orders",
        },
    )
    message = refused(tmp_path, same)
    assert "bootstrap.stanza in bootstrap.repository is this cluster's own stanza" in message
    assert "another name (cluster) or its own backup.repository" in message

    # another stanza of the same repository, or the same stanza name in another repository: fine
    other_stanza = dict(same, cluster="orders-restored")
    assert load(tmp_path, other_stanza).bootstrap.stanza == "orders"
    other_repo = dict(same, backup={"repository": {"type": "posix", "path": "/srv/backup/new"}})
    assert load(tmp_path, other_repo).cluster == "orders"


def test_the_same_s3_repository_is_recognised_through_its_path_s_trailing_slash(
    tmp_path: Path,
) -> None:
    s3: dict[str, Any] = {
        "type": "s3",
        "bucket": "pg",
        "endpoint": "s3.example.net",
        "region": "eu",
        "key_file": "/k",
        "secret_file": "/s",
        "path": "/repo",
    }
    data = base(
        tmp_path,
        cluster="orders",
        backup={"repository": s3},
        bootstrap={
            "method": "pgbackrest",
            "repository": {**s3, "path": "/repo/"},
            "stanza": "orders",
        },
    )
    assert "its own repository" in refused(tmp_path, data)
    data["bootstrap"]["repository"]["bucket"] = "pg-old"
    cfg = load(tmp_path, data)
    assert isinstance(cfg.bootstrap.repository, S3Repository)


def test_pgsidecar_run_exits_2_on_a_bad_section_before_touching_postgresql(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = base(
        tmp_path,
        bootstrap={"method": "pgbackrest", "repository": SOURCE, "stanza": "o", "target": {}},
    )
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", "--config", str(path)]) == 2
    assert "bootstrap.target" in capsys.readouterr().err
    assert not (tmp_path / "data").exists() and not (tmp_path / "state").exists()


def test_a_missing_source_repository_is_an_error_and_is_not_created(tmp_path: Path) -> None:
    """pgBackRest's config step creates a posix repository that is missing: for the source that
    would hide a wrong path behind an empty repository."""
    section = {
        "method": "pgbackrest",
        "repository": {"type": "posix", "path": str(tmp_path / "nowhere")},
        "stanza": "orders",
    }
    built = member_bootstrap(load(tmp_path, base(tmp_path, bootstrap=section)), RecordingLog())
    assert built is not None
    with pytest.raises(RecoveryError, match="bootstrap.repository.path .* is not a directory"):
        asyncio.run(built.restore())
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "data").exists()


def test_an_unreadable_s3_credentials_file_fails_the_check(tmp_path: Path) -> None:
    section = {
        "method": "pgbackrest",
        "repository": {
            "type": "s3",
            "bucket": "pg",
            "endpoint": "s3.example.net",
            "region": "eu",
            "key_file": str(tmp_path / "missing-key"),
            "secret_file": str(tmp_path / "missing-secret"),
        },
        "stanza": "orders",
    }
    built = member_bootstrap(load(tmp_path, base(tmp_path, bootstrap=section)), RecordingLog())
    assert built is not None
    with pytest.raises(Exception, match="key_file .*missing-key"):
        built.check()


def test_the_recovery_leaves_no_restore_command_or_target_behind(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "postgresql.auto.conf").write_text(
        "# Do not edit this file manually!\n"
        "work_mem = '8MB'\n"
        "restore_command = 'pgbackrest --stanza=orders archive-get %f \"%p\"'\n"
        "recovery_target_time = '2026-12-03 05:00:00+00'\n"
        "Recovery_Target_Action = 'promote'\n"
        "recovery_target_inclusive = 'false'\n"
    )
    forget_recovery(data)
    assert (data / "postgresql.auto.conf").read_text() == (
        "# Do not edit this file manually!\nwork_mem = '8MB'\n"
    )


def test_a_target_time_keeps_its_instant_whatever_its_offset(tmp_path: Path) -> None:
    when = datetime(2026, 12, 3, 7, 0, 0, 250000, tzinfo=timezone(timedelta(hours=2)))
    section = {
        "method": "pgbackrest",
        "repository": SOURCE,
        "stanza": "orders",
        "target": {"time": when.isoformat()},
    }
    cfg = load(tmp_path, base(tmp_path, bootstrap=section))
    assert recovery_target(cfg.bootstrap.target).target == "2026-12-03 05:00:00.250000+00"


def test_a_restore_in_progress_is_marked_until_it_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mark outlives a restore that failed or was killed (the agent's next start, or the
    effect after wiping, settles it) and goes when the data directory is complete."""
    import pgsidecar.backup.pitr as pitr

    (tmp_path / "repo").mkdir()
    section = {
        "method": "pgbackrest",
        "repository": {"type": "posix", "path": str(tmp_path / "repo")},
        "stanza": "orders",
    }
    built = member_bootstrap(load(tmp_path, base(tmp_path, bootstrap=section)), RecordingLog())
    assert built is not None and not built.interrupted()
    monkeypatch.setattr(built.source, "write_config", lambda: None)
    seen: list[bool] = []

    async def failing(*_: Any, **__: Any) -> pitr.RecoveryResult:
        seen.append(built.interrupted())
        raise RecoveryError("recovery ended before the target")

    monkeypatch.setattr(pitr, "restore_to_target", failing)
    with pytest.raises(RecoveryError):
        asyncio.run(built.restore())
    assert seen == [True] and built.interrupted()
    built.settle()
    assert not built.interrupted()

    async def done(*_: Any, **__: Any) -> pitr.RecoveryResult:
        seen.append(built.interrupted())
        return pitr.RecoveryResult(system_id="1", timeline=2)

    monkeypatch.setattr(pitr, "restore_to_target", done)
    assert asyncio.run(built.restore()).timeline == 2
    assert seen == [True, True] and not built.interrupted()
