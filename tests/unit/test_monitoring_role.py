"""The monitoring role postgres_exporter logs in as: its config (postgresql.monitoring), the
statements that create it, and what ensure_roles asks of the server, without a server. A real
server, replicas and the exporter itself are in tests/e2e/test_monitoring_e2e.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pgsidecar.config import AgentConfig, ConfigError, MonitoringRole, load_config
from pgsidecar.postgres.control import PostgresControl
from pgsidecar.postgres.errors import PostgresError
from pgsidecar.postgres.sql import role_statements
from tests.support.pgtestutil import RecordingLog, make_settings

BASE: dict[str, Any] = {
    "name": "pg-1",
    "cluster": "pg",
    "state_dir": "/var/lib/pgsidecar",
    "postgresql": {
        "data_dir": "/var/lib/postgresql/data",
        "superuser": {"username": "postgres"},
        "replication": {"username": "replicator"},
    },
}


def load(tmp_path: Path, monitoring: Any, env: dict[str, str] | None = None) -> AgentConfig:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    if monitoring is not None:
        data["postgresql"]["monitoring"] = monitoring
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, environ=env or {})


# ------------------------------------------------------------------ config


def test_no_monitoring_role_unless_configured(tmp_path: Path) -> None:
    assert load(tmp_path, None).postgresql.monitoring is None


def test_password_from_a_file_and_the_default_name(tmp_path: Path) -> None:
    secret = tmp_path / "monitor-password"
    secret.write_text("s3cret-monitor\n")
    cfg = load(tmp_path, {"password_file": str(secret)})
    mon = cfg.postgresql.monitoring
    assert mon is not None
    # the name the exporter container of deploy/ logs in as
    assert mon.username == "pgsidecar_monitor"
    assert mon.resolve_password() == "s3cret-monitor"
    assert "s3cret" not in repr(cfg) and "s3cret" not in str(mon)


def test_password_from_the_environment_is_literal_and_never_shown(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        {"username": "exporter"},
        {"PGSIDECAR_POSTGRESQL__MONITORING__PASSWORD": "pa#ss: yes"},
    )
    mon = cfg.postgresql.monitoring
    assert mon is not None and mon.username == "exporter"
    assert mon.resolve_password() == "pa#ss: yes"
    assert "pa#ss" not in repr(cfg)


@pytest.mark.parametrize(
    ("monitoring", "message"),
    [
        ({"username": "mon"}, "set password or password_file"),
        ({"password": "a", "password_file": "/x"}, "set password or password_file"),
        ({"username": "pg_monitor", "password": "a"}, "reserved"),
        ({"username": "PG_mon", "password": "a"}, "reserved"),
        ({"username": "postgres", "password": "a"}, "must differ"),
        ({"username": "replicator", "password": "a"}, "must differ"),
        ({"password": "a", "superuser": True}, "superuser"),
    ],
)
def test_invalid_monitoring_config_is_refused_naming_the_field(
    tmp_path: Path, monitoring: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, monitoring)
    assert message in str(info.value)
    assert "monitoring" in str(info.value)


def test_an_unreadable_password_file_fails_at_load_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "monitor-password"
    with pytest.raises(ConfigError) as info:
        load(tmp_path, {"password_file": str(missing)})
    assert str(missing) in str(info.value) and "pgsidecar_monitor" in str(info.value)


# ------------------------------------------------------------------ the statements


def rendered(**kw: Any) -> list[str]:
    return [s.as_string() for s in role_statements(**kw)]


def test_the_monitoring_role_is_login_pg_monitor_and_nothing_more() -> None:
    verifier = "SCRAM-SHA-256$4096:c2FsdA==$a:b"
    assert rendered(
        username="pgsidecar_monitor",
        verifier=verifier,
        exists=False,
        replication=False,
        member_of=("pg_monitor",),
    ) == [
        'CREATE ROLE "pgsidecar_monitor" WITH LOGIN NOREPLICATION NOSUPERUSER '
        f"PASSWORD '{verifier}'",
        'GRANT "pg_monitor" TO "pgsidecar_monitor"',
    ]
    # an existing role (made by hand, maybe as a superuser) is altered to the same
    assert rendered(
        username="pgsidecar_monitor",
        verifier=verifier,
        exists=True,
        replication=False,
        member_of=("pg_monitor",),
    )[0].startswith('ALTER ROLE "pgsidecar_monitor" WITH LOGIN NOREPLICATION NOSUPERUSER ')


def test_the_replication_role_statement_is_unchanged() -> None:
    assert rendered(username="replicator", verifier="v", exists=True, replication=True) == [
        "ALTER ROLE \"replicator\" WITH LOGIN REPLICATION NOSUPERUSER PASSWORD 'v'"
    ]


def test_names_and_verifiers_are_quoted() -> None:
    out = rendered(
        username='mon"; DROP ROLE x; --',
        verifier="it's",
        exists=False,
        replication=False,
        member_of=("pg_monitor",),
    )
    assert out[0] == (
        'CREATE ROLE "mon""; DROP ROLE x; --" WITH LOGIN NOREPLICATION NOSUPERUSER '
        "PASSWORD 'it''s'"
    )
    assert out[1] == 'GRANT "pg_monitor" TO "mon""; DROP ROLE x; --"'


# ------------------------------------------------------------------ ensure_roles


class RecordingSql:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bool, tuple[str, ...]]] = []

    async def ensure_role(
        self,
        username: str,
        password: str,
        *,
        replication: bool = True,
        member_of: tuple[str, ...] = (),
    ) -> bool:
        self.calls.append((username, password, replication, tuple(member_of)))
        return True


def control(tmp_path: Path, monitoring: MonitoringRole | None) -> tuple[PostgresControl, Any]:
    settings = make_settings(tmp_path / "data", 5999, monitoring=monitoring)
    log = RecordingLog()
    ctl = PostgresControl(settings, tmp_path, "a", log)
    ctl.sql = RecordingSql()  # type: ignore[assignment]
    return ctl, log


async def test_ensure_roles_makes_the_monitoring_role_a_pg_monitor_member(tmp_path: Path) -> None:
    ctl, log = control(tmp_path, MonitoringRole(password="mon-secret"))  # type: ignore[arg-type]
    await ctl.ensure_roles()
    calls = ctl.sql.calls  # type: ignore[attr-defined]
    assert [c[0] for c in calls] == ["replicator", "pgsidecar_monitor"]
    assert calls[0][2:] == (True, ())
    assert calls[1][1:] == ("mon-secret", False, ("pg_monitor",))
    ensured = [e[2]["role"] for e in log.events if e[1] == "pg_roles_ensured"]
    assert ensured == ["replicator", "pgsidecar_monitor"]
    assert "mon-secret" not in log.text()


async def test_ensure_roles_without_monitoring_makes_the_replication_role_only(
    tmp_path: Path,
) -> None:
    ctl, _ = control(tmp_path, None)
    await ctl.ensure_roles()
    assert [c[0] for c in ctl.sql.calls] == ["replicator"]  # type: ignore[attr-defined]


async def test_an_empty_password_file_is_an_error_naming_the_role(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    ctl, _ = control(tmp_path, MonitoringRole(password_file=empty))
    with pytest.raises(PostgresError) as info:
        await ctl.ensure_roles()
    assert "pgsidecar_monitor" in str(info.value)
    # the replication role came first and is not held back by it
    assert [c[0] for c in ctl.sql.calls] == ["replicator"]  # type: ignore[attr-defined]
