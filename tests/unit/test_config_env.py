"""Environment overrides and YAML errors in the agent's config: string and secret fields are taken
literally, Kubernetes service-link variables are not overrides, and a YAML error names the file,
line and column but never shows the line (a secret may be on it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pgsidecar.config import AgentConfig, ConfigError, load_config

BASE = {
    "name": "pg-1",
    "cluster": "pg",
    "state_dir": "/var/lib/pgsidecar",
    "postgresql": {
        "data_dir": "/var/lib/postgresql/data",
        "superuser": {"username": "postgres"},
        "replication": {"username": "replicator"},
    },
}


def load(tmp_path: Path, env: dict[str, str], data: dict[str, object] | None = None) -> AgentConfig:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data or BASE))
    return load_config(path, environ=env)


# ------------------------------------------------------------------ literal strings and secrets


@pytest.mark.parametrize(
    "secret",
    [
        "pa#ss",  # YAML would keep "pa#ss", but ...
        "pass #word",  # ... cut this one at the comment
        "key: value",  # a mapping in YAML
        "null",  # None in YAML: no password at all
        "~",
        "yes",  # True in YAML
        "0123",  # 123 in YAML
        "[a, b]",
        "'quoted'",
        " padded ",
    ],
)
def test_secret_fields_are_taken_literally(tmp_path: Path, secret: str) -> None:
    cfg = load(
        tmp_path,
        {
            "PGSIDECAR_POSTGRESQL__SUPERUSER__PASSWORD": secret,
            "PGSIDECAR_POSTGRESQL__REPLICATION__PASSWORD": secret,
            "PGSIDECAR_API__TOKEN": secret,
            "PGSIDECAR_DCS__CONSUL__TOKEN": secret,
            "PGSIDECAR_DCS__ETCD__PASSWORD": secret,
        },
    )
    assert cfg.postgresql.superuser.resolve_password() == secret
    assert cfg.postgresql.replication.resolve_password() == secret
    assert cfg.api.resolve_token() == secret
    assert cfg.dcs.consul.token is not None and cfg.dcs.consul.token.get_secret_value() == secret
    assert cfg.dcs.etcd.password is not None and cfg.dcs.etcd.password.get_secret_value() == secret


def test_string_and_path_fields_are_taken_literally(tmp_path: Path) -> None:
    password_file = tmp_path / "#1"
    password_file.write_text("from-file\n")
    cfg = load(
        tmp_path,
        {
            "PGSIDECAR_KUBERNETES__NAMESPACE": "true",
            "PGSIDECAR_KUBERNETES__LABEL_SELECTOR": "app=pg # not a comment",
            "PGSIDECAR_DCS__CONSUL__URL": "https://consul-server:8501",
            "PGSIDECAR_POSTGRESQL__SUPERUSER__PASSWORD_FILE": str(password_file),
            "PGSIDECAR_API__CONNECT_URL": "http://10.1.2.3:8008",
            "PGSIDECAR_NAME": "pg-2",
        },
    )
    assert cfg.kubernetes.namespace == "true"
    assert cfg.kubernetes.label_selector == "app=pg # not a comment"
    assert cfg.dcs.consul.url == "https://consul-server:8501"
    assert cfg.postgresql.superuser.password_file == password_file
    assert cfg.postgresql.superuser.resolve_password() == "from-file"
    assert cfg.name == "pg-2"


def test_numbers_booleans_and_lists_are_still_parsed(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        {
            "PGSIDECAR_POSTGRESQL__PORT": "5433",
            "PGSIDECAR_KUBERNETES__ENABLED": "true",
            "PGSIDECAR_SETTINGS__TTL": "12.5",
            "PGSIDECAR_SETTINGS__SYNCHRONOUS_MODE": "on",  # a Literal of strings: literal
            "PGSIDECAR_KAFKA__BOOTSTRAP_SERVERS": '["kafka-0:9092", "kafka-1:9092"]',
            "PGSIDECAR_POSTGRESQL__HBA_NETWORKS": "[10.0.0.0/8]",
            "PGSIDECAR_POSTGRESQL__PARAMETERS__MAX_CONNECTIONS": "300",
            "PGSIDECAR_POSTGRESQL__PARAMETERS__HOT_STANDBY_FEEDBACK": "on",
            "PGSIDECAR_POSTGRESQL__PARAMETERS__APPLICATION_NAME": "app #1: main",
        },
    )
    assert cfg.postgresql.port == 5433
    assert cfg.kubernetes.enabled is True
    assert cfg.cluster_settings.ttl == 12.5
    assert cfg.cluster_settings.synchronous_mode == "on"
    assert cfg.kafka.bootstrap_servers == ["kafka-0:9092", "kafka-1:9092"]
    assert cfg.postgresql.hba_networks == ["10.0.0.0/8"]
    params = cfg.postgresql.parameters
    assert params["max_connections"] == 300
    assert params["hot_standby_feedback"] is True  # YAML 1.1, as before
    assert params["application_name"] == "app #1: main"


def test_a_list_that_is_not_yaml_names_the_variable_only(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, {"PGSIDECAR_KAFKA__BOOTSTRAP_SERVERS": "[kafka-0:9092, s3cr3t"})
    msg = str(info.value)
    assert "PGSIDECAR_KAFKA__BOOTSTRAP_SERVERS" in msg and "s3cr3t" not in msg


# ------------------------------------------------------------------ service links


def test_kubernetes_service_links_are_ignored(tmp_path: Path) -> None:
    # what the kubelet sets for Services named "pgsidecar" and "pgsidecar-api" in the namespace
    links = {
        "PGSIDECAR_SERVICE_HOST": "10.96.0.12",
        "PGSIDECAR_SERVICE_PORT": "5432",
        "PGSIDECAR_SERVICE_PORT_POSTGRESQL": "5432",
        "PGSIDECAR_PORT": "tcp://10.96.0.12:5432",
        "PGSIDECAR_PORT_5432_TCP": "tcp://10.96.0.12:5432",
        "PGSIDECAR_PORT_5432_TCP_PROTO": "tcp",
        "PGSIDECAR_PORT_5432_TCP_PORT": "5432",
        "PGSIDECAR_PORT_5432_TCP_ADDR": "10.96.0.12",
        "PGSIDECAR_API_SERVICE_HOST": "10.96.0.13",
        "PGSIDECAR_API_SERVICE_PORT": "8008",
        "PGSIDECAR_API_PORT_8008_TCP_ADDR": "10.96.0.13",
        "PGSIDECAR_API_PORT": "tcp://10.96.0.13:8008",
    }
    cfg = load(tmp_path, links)
    assert cfg.postgresql.port == 5432 and cfg.api.port == 8008


def test_real_overrides_that_end_like_a_link_still_apply(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        {"PGSIDECAR_POSTGRESQL__PORT": "5433", "PGSIDECAR_API__PORT": "8009"},
    )
    assert cfg.postgresql.port == 5433 and cfg.api.port == 8009


def test_an_unknown_override_is_still_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="postgresql.prot: unknown field"):
        load(tmp_path, {"PGSIDECAR_POSTGRESQL__PROT": "5433"})


# ------------------------------------------------------------------ YAML errors


@pytest.mark.parametrize(
    ("text", "line"),
    [
        # an unterminated quote
        ('name: pg-1\ncluster: pg\npassword: "s3cr3t-hunter2\n', 3),
        # ': ' inside an unquoted value
        ("name: pg-1\napi:\n  token: s3cr3t: hunter2\n", 3),
        # an alias that does not exist: PyYAML names it in its message
        ("name: pg-1\napi:\n  token: *s3cr3t-hunter2\n", 3),
        # a tab where YAML wants spaces, after a secret
        ("name: pg-1\napi:\n  token: s3cr3t-hunter2\n\tport: 1\n", 4),
        # a tag no safe loader knows
        ("name: pg-1\napi:\n  token: !s3cr3t-hunter2 x\n", 3),
    ],
)
def test_yaml_error_names_the_place_never_the_line(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    msg = str(info.value)
    assert str(path) in msg and f"line {line}, column " in msg, msg
    assert "s3cr3t" not in msg and "hunter2" not in msg, msg
    assert "Fix the syntax there" in msg
    # nor in a chained exception that a traceback would print
    assert info.value.__cause__ is None and info.value.__suppress_context__
