"""Agent configuration: YAML plus environment overrides, validated by pydantic.

A bad value exits 2 with a message naming the field, before anything is started (see
``load_config``). Secrets are ``SecretStr`` (never printed) or read from a file named by a
``*_file`` field, so a ConfigMap can carry the config and a Secret the password.

Environment overrides: ``PGSIDECAR_<SECTION>__<FIELD>`` (double underscore between levels), for
instance ``PGSIDECAR_POSTGRESQL__PORT=5433`` or ``PGSIDECAR_NAME=pg-1``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, SecretStr, ValidationError, model_validator

# the adapters' settings live below both (events/ never imports pgsidecar); re-exported here
from events.settings import ConfigError as ConfigError
from events.settings import ConsulSettings as ConsulSettings
from events.settings import DcsSettings as DcsSettings
from events.settings import EtcdSettings as EtcdSettings
from events.settings import KafkaSettings as KafkaSettings
from events.settings import KubernetesSettings as KubernetesSettings
from events.settings import Strict as Strict

NAME_RE = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"


class Credentials(Strict):
    username: str
    password: SecretStr | None = None
    password_file: Path | None = None

    def resolve_password(self) -> str | None:
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            try:
                return self.password_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read password_file {self.password_file} for user {self.username}: "
                    f"{exc.strerror}; fix the path or set the password in a Secret it names"
                ) from exc
        return None


class Tags(Strict):
    nofailover: bool = False
    noloadbalance: bool = False
    clonefrom: bool = False
    nosync: bool = False
    # 0 = never races for the lease; higher wins ties of (timeline, lsn)
    failover_priority: int = Field(default=1, ge=0)


class PostgresSettings(Strict):
    bin_dir: Path = Path("/usr/lib/postgresql/15/bin")
    data_dir: Path
    listen: str = "127.0.0.1"
    # the address peers use to reach this member (defaults to listen)
    connect_address: str | None = None
    port: int = Field(default=5432, ge=1, le=65535)
    # OS user that runs PostgreSQL when the agent runs as root (PostgreSQL refuses root)
    os_user: str | None = None
    superuser: Credentials = Credentials(username="postgres")
    replication: Credentials = Credentials(username="replicator")
    parameters: dict[str, str | int | float | bool] = Field(default_factory=dict)
    # client networks allowed (scram-sha-256) in the agent-written pg_hba.conf
    hba_networks: list[str] = Field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])
    # how long a master whose PostgreSQL crashed may take to come back before it gives up the lease
    master_start_timeout: float = Field(default=30.0, gt=0)
    # fast shutdown is escalated to immediate after this many seconds
    stop_timeout: float = Field(default=30.0, gt=0)
    # pg_rewind attempts before the member throws its data away and reclones
    rewind_attempts: int = Field(default=2, ge=1)

    @property
    def host(self) -> str:
        return self.connect_address or self.listen


class ApiSettings(Strict):
    listen: str = "127.0.0.1"
    port: int = Field(default=8008, ge=1, le=65535)
    # the URL peers and the CLI use; defaults to http://listen:port
    connect_url: str | None = None
    token: SecretStr | None = None
    token_file: Path | None = None

    def resolve_token(self) -> str | None:
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_file is not None:
            try:
                return self.token_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read api.token_file {self.token_file}: {exc.strerror}"
                ) from exc
        return None

    @property
    def url(self) -> str:
        return self.connect_url or f"http://{self.listen}:{self.port}"


class ClusterSettings(Strict):
    """Cluster-wide settings; the values in the DCS ``config`` key override these at run time."""

    ttl: float = Field(default=10.0, ge=2.0, le=3600.0)
    maximum_lag_on_failover: int = Field(default=1024 * 1024, ge=0)
    # how long a candidate waits for peers to publish fresh positions after the leader vanished
    election_timeout: float = Field(default=1.0, gt=0, le=60)
    # bound on how much the clocks of two members may run at different rates (fraction)
    clock_drift: float = Field(default=0.01, ge=0, le=0.2)
    synchronous_mode: Literal["off", "on", "strict"] = "off"
    # how many synchronous standbys the master keeps (all of them must confirm each commit)
    synchronous_node_count: int = Field(default=1, ge=1, le=10)


class FencingSettings(Strict):
    """Fencing beyond the agent's thread and its fence process (``pgsidecar/fence.py``): the
    Linux watchdog device, for a freeze of the whole node (VM pause, cgroup freeze), where the
    agent and the fence process stop together. The fence process holds the device while armed."""

    # off: no device. automatic: use it if it opens, else log and go on without it.
    # required: the member does not stay master without it (an arm whose device fails fences).
    mode: Literal["off", "automatic", "required"] = "off"
    device: Path = Path("/dev/watchdog")
    # if the fence process stops keeping the device alive, the node is reset at the latest this
    # many seconds after the fencing deadline. The deadline is at least the fencing margin
    # (clamp(0.15 ttl, 0.5 s, 2 s)) before the earliest lease expiry, so up to 0.5 s the reset
    # always comes before another member can hold the lease.
    safety_margin: float = Field(default=0.5, ge=0.0, le=0.5)


class AgentConfig(Strict):
    name: str = Field(pattern=NAME_RE)
    cluster: str = Field(pattern=NAME_RE)
    # where the agent keeps its own files: journal, state (seq, instance id), pgpass
    state_dir: Path
    postgresql: PostgresSettings
    dcs: DcsSettings = DcsSettings()
    cluster_settings: ClusterSettings = Field(default_factory=ClusterSettings, alias="settings")
    api: ApiSettings = ApiSettings()
    kafka: KafkaSettings = KafkaSettings()
    kubernetes: KubernetesSettings = KubernetesSettings()
    tags: Tags = Tags()
    fencing: FencingSettings = FencingSettings()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_file: Path | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> AgentConfig:
        if self.postgresql.superuser.username == self.postgresql.replication.username:
            raise ValueError(
                "postgresql.replication.username must differ from postgresql.superuser.username"
            )
        return self


def _apply_env(data: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    for key, value in environ.items():
        if not key.startswith("PGSIDECAR_") or key in ("PGSIDECAR_CONFIG",):
            continue
        path = key[len("PGSIDECAR_") :].lower().split("__")
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = yaml.safe_load(value) if value else value
    return data


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see ARCHITECTURE.md for the config reference)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        # never echo the offending value: it may be a secret
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path, environ: dict[str, str] | None = None) -> AgentConfig:
    """Read, merge environment overrides, validate. Raises ConfigError with a readable message."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {exc.start}): is it the right file?"
        ) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping at the top level, got {type(data).__name__}"
        )
    data = _apply_env(data, dict(os.environ if environ is None else environ))
    try:
        cfg = AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from exc
    # secrets referenced by file must be readable now, not at the first failover
    cfg.postgresql.superuser.resolve_password()
    cfg.postgresql.replication.resolve_password()
    cfg.api.resolve_token()
    return cfg


def slot_name(member: str) -> str:
    """The physical replication slot the master keeps for a member."""
    return re.sub(r"[^a-z0-9_]", "_", member.lower())[:63]
