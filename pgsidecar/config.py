"""Agent configuration: YAML plus environment overrides, validated by pydantic.

A bad value exits 2 with a message naming the field, before anything is started (see
``load_config``). Secrets are ``SecretStr`` (never printed) or read from a file named by a
``*_file`` field, so a ConfigMap can carry the config and a Secret the password.

Environment overrides: ``PGSIDECAR_<SECTION>__<FIELD>`` (double underscore between levels), for
instance ``PGSIDECAR_POSTGRESQL__PORT=5433`` or ``PGSIDECAR_NAME=pg-1``. String fields (names,
paths, URLs, passwords) take the value literally; numbers, booleans and lists are YAML. Variables
that look like Kubernetes service links (``PGSIDECAR_..._SERVICE_HOST``, ``..._PORT``) and name no
field are ignored.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

# the adapters' settings live below both (events/ never imports pgsidecar); re-exported here
from events import netloc
from events.settings import ConfigError as ConfigError
from events.settings import ConsulSettings as ConsulSettings
from events.settings import DcsSettings as DcsSettings
from events.settings import EtcdSettings as EtcdSettings
from events.settings import KafkaSettings as KafkaSettings
from events.settings import KubernetesSettings as KubernetesSettings
from events.settings import Strict as Strict
from events.settings import resolve_secret
from fsm.snapshot import DEFAULT_TTL as DEFAULT_TTL
from pgsidecar.backup.settings import BackupSettings, BootstrapSettings, same_repository

# written by the agent from the backup section when it is set; never a member parameter then
BACKUP_PARAMETERS = ("archive_mode", "archive_command", "restore_command")

NAME_RE = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"


class Credentials(Strict):
    username: str
    password: SecretStr | None = None
    password_file: Path | None = None

    def resolve_password(self) -> str | None:
        return resolve_secret(
            self.password,
            self.password_file,
            f"the password_file of user {self.username}:",
            "; fix the path or mount the Secret that holds the password there",
        )


class MonitoringRole(Credentials):
    """The role postgres_exporter logs in as: the master creates it (LOGIN, no superuser, no
    replication, a member of pg_monitor) and keeps its password in step with this one. It has
    a password of its own, from this config or a file, since the exporter uses scram-sha-256."""

    username: str = "pgsidecar_monitor"

    @model_validator(mode="after")
    def _check(self) -> MonitoringRole:
        if (self.password is None) == (self.password_file is None):
            raise ValueError("set password or password_file (one of them)")
        # PostgreSQL reserves the pg_ prefix for its own roles (pg_monitor among them)
        if self.username.lower().startswith("pg_"):
            raise ValueError(f"username {self.username!r}: names starting with pg_ are reserved")
        return self


class Tags(Strict):
    nofailover: bool = False
    noloadbalance: bool = False
    clonefrom: bool = False
    nosync: bool = False
    # 0 = never races for the lease; higher wins ties of (timeline, lsn)
    failover_priority: int = Field(default=1, ge=0)


class PostgresTls(Strict):
    """TLS for PostgreSQL (off by default). With ``cert_file``, ``key_file`` and ``ca_file`` the
    server uses the given certificate; with ``ca_file`` and ``ca_key_file`` the agent issues its
    own server certificate from that CA (for its connect address, listen address, host name and
    loopback); with no file at all it makes a CA and a certificate of its own in
    ``state_dir/tls`` (peers then need that ca.crt as their ``ca_file``). Every non-local address
    must then use TLS (``hostssl`` in pg_hba), and the agent's and the replicas' connections
    verify the server's certificate against ``ca_file``."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    ca_key_file: Path | None = None
    # verify-ca when the certificates cannot name the addresses peers connect to; connections
    # to a loopback address always use verify-ca (a provided certificate rarely names it)
    sslmode: Literal["verify-full", "verify-ca"] = "verify-full"

    @model_validator(mode="after")
    def _check(self) -> PostgresTls:
        files = (self.cert_file, self.key_file, self.ca_file, self.ca_key_file)
        if not self.enabled and any(f is not None for f in files):
            raise ValueError("TLS files are set but enabled is false: set enabled: true")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both or neither")
        if self.cert_file is not None and self.ca_file is None:
            raise ValueError("cert_file needs ca_file (the CA peers verify it with)")
        if self.ca_key_file is not None and (self.ca_file is None or self.cert_file is not None):
            raise ValueError("ca_key_file goes with ca_file and without cert_file/key_file")
        if self.ca_file is not None and self.cert_file is None and self.ca_key_file is None:
            raise ValueError("ca_file needs cert_file and key_file, or ca_key_file")
        return self


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
    # the role postgres_exporter connects as (none unless set)
    monitoring: MonitoringRole | None = None
    parameters: dict[str, str | int | float | bool] = Field(default_factory=dict)
    # parameters that run commands, load code or name files (pgsidecar/dcs_params.py) are taken
    # from the DCS only when listed here: the member's own operator vouches for them
    parameters_allowed_from_dcs: list[str] = Field(default_factory=list)
    # client networks allowed (scram-sha-256) in the agent-written pg_hba.conf
    hba_networks: list[str] = Field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])
    tls: PostgresTls = PostgresTls()
    # how long a master whose PostgreSQL crashed may take to come back before it gives up the lease
    master_start_timeout: float = Field(default=30.0, gt=0)
    # fast shutdown is escalated to immediate after this many seconds
    stop_timeout: float = Field(default=30.0, gt=0)
    # pg_rewind attempts before the member throws its data away and reclones
    rewind_attempts: int = Field(default=2, ge=1)
    # where the server log goes (pgsidecar/postgres/serverlog.py). stderr: JSON lines on the
    # agent's stderr, tagged with the member and cluster (kubectl logs; nothing on the data
    # volume). file: <state_dir>/postgresql.log as the server wrote it, rotated (log_rotation).
    log_destination: Literal["stderr", "file"] = "stderr"

    @property
    def host(self) -> str:
        return self.connect_address or self.listen


class ApiTls(Strict):
    """TLS for the REST API (off by default). With ``enabled`` the API speaks only TLS on its
    port (a plain HTTP request gets no answer), with ``cert_file``/``key_file``. ``ca_file`` is
    the CA that signed the API's certificate (the CLI verifies the server with it) and the CA
    client certificates are verified against; ``client_auth`` says whether a client must present
    one. ``client_cert_file``/``client_key_file`` are what this config's clients (the CLI) present
    to members that ask for a certificate (default: ``cert_file``/``key_file``)."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    client_auth: Literal["off", "optional", "required"] = "off"
    client_cert_file: Path | None = None
    client_key_file: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> ApiTls:
        files = (
            self.cert_file,
            self.key_file,
            self.ca_file,
            self.client_cert_file,
            self.client_key_file,
        )
        if not self.enabled:
            if any(f is not None for f in files) or self.client_auth != "off":
                raise ValueError("TLS settings are set but enabled is false: set enabled: true")
            return self
        if self.cert_file is None or self.key_file is None:
            raise ValueError("enabled needs cert_file and key_file (the API's certificate)")
        if self.client_auth != "off" and self.ca_file is None:
            raise ValueError(f"client_auth: {self.client_auth} needs ca_file (the clients' CA)")
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("client_cert_file and client_key_file go together")
        return self

    def server_context(self) -> ssl.SSLContext:
        """The API server's TLS context; TLS 1.2 or later."""
        assert self.cert_file is not None and self.key_file is not None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
            if self.ca_file is not None:
                ctx.load_verify_locations(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            # the error names the files, never their contents
            raise ConfigError(
                f"cannot load the API's TLS files (api.tls.cert_file {self.cert_file}, "
                f"key_file {self.key_file}, ca_file {self.ca_file}): "
                f"{getattr(exc, 'strerror', None) or exc.__class__.__name__}"
            ) from None
        ctx.verify_mode = {
            "off": ssl.CERT_NONE,
            "optional": ssl.CERT_OPTIONAL,
            "required": ssl.CERT_REQUIRED,
        }[self.client_auth]
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """What a client of members' APIs (the CLI, the lab) uses: verifies the server against
        ``ca_file`` (else the system's CAs) and presents the client certificate when members ask
        for one."""
        ctx = ssl.create_default_context(
            cafile=str(self.ca_file) if self.ca_file is not None else None
        )
        cert = self.client_cert_file or self.cert_file
        key = self.client_key_file or self.key_file
        if self.client_auth != "off" and cert is not None and key is not None:
            ctx.load_cert_chain(cert, key)
        return ctx


def _check_networks(networks: list[str]) -> list[str]:
    for net in networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ValueError(
                f"{net!r} is not a network: use CIDR notation such as 10.0.0.0/8 or ::1/128"
            ) from None
    return networks


class ApiSettings(Strict):
    listen: str = "127.0.0.1"
    port: int = Field(default=8008, ge=1, le=65535)
    # the URL peers and the CLI use; defaults to http(s)://listen:port
    connect_url: str | None = None
    token: SecretStr | None = None
    token_file: Path | None = None
    tls: ApiTls = ApiTls()
    # client networks (CIDR) from which requests that change something (switchover, restart,
    # reinit) are taken, on top of the token; others get 403. Health checks, /status and
    # /metrics answer everyone.
    command_networks: list[str] = Field(default_factory=lambda: ["0.0.0.0/0", "::/0"])

    @model_validator(mode="after")
    def _check_command_networks(self) -> ApiSettings:
        _check_networks(self.command_networks)
        return self

    def command_allowed(self, address: str | None) -> bool:
        """Whether a mutating request from ``address`` (the peer's IP) is allowed."""
        if not address:
            return False
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack socket shows IPv4 clients as ::ffff:a.b.c.d
        return any(ip in ipaddress.ip_network(net, strict=False) for net in self.command_networks)

    def resolve_token(self) -> str | None:
        return resolve_secret(self.token, self.token_file, "api.token_file")

    @property
    def url(self) -> str:
        scheme = "https" if self.tls.enabled else "http"
        return self.connect_url or netloc.url(scheme, self.listen, self.port)

    def client_context(self) -> ssl.SSLContext | None:
        """The TLS context for requests to members' APIs (None: plain HTTP)."""
        return self.tls.client_context() if self.tls.enabled else None


class ClusterSettings(Strict):
    """Cluster-wide settings; the values in the DCS ``config`` key override these at run time."""

    ttl: float = Field(default=DEFAULT_TTL, ge=2.0, le=3600.0)
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


class StandbyClusterSettings(Strict):
    """This cluster is a standby of another one (docs/backup.md, "Standby clusters"): its
    leader, the standby leader, replicates from the source cluster and is never writable; its
    other members follow the standby leader. Local config only: where a member connects to and
    which command fetches WAL are never taken from the DCS. ``pgsidecar promote-cluster`` ends
    standby mode for good.

    ``host``/``port``: the source cluster's master (or a name that follows it, such as a
    Service). ``hosts``: every member of the source cluster as "host:port": libpq tries them in
    order, so the standby leader streams from the first that answers, the source's master or a
    replica of it (cascading), and goes on after a failover of the source without any change
    here. ``primary_slot_name``: a physical slot on the source that keeps the WAL the standby
    leader has not received (the source's agent never drops a slot it did not create).
    ``restore_command``: fetches WAL when the source cannot be reached, typically
    ``pgbackrest --stanza=SOURCE --repo1-path=... archive-get %f "%p"``."""

    host: str | None = None
    port: int = Field(default=5432, ge=1, le=65535)
    hosts: list[str] = Field(default_factory=list)
    primary_slot_name: str | None = Field(default=None, pattern=r"^[a-z0-9_]{1,63}$")
    restore_command: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _check(self) -> StandbyClusterSettings:
        if (self.host is None) == (not self.hosts):
            raise ValueError(
                "set host (with port) or hosts (a list of host:port), one of them: where the "
                "standby leader replicates from"
            )
        if self.host is not None and not self.host.strip():
            raise ValueError("host is empty")
        for entry in self.hosts:
            _split_host_port(entry)
        return self

    def endpoints(self) -> list[tuple[str, int]]:
        """(host, port) of every server the standby leader may stream from, in order."""
        if self.host is not None:
            return [(self.host, self.port)]
        return [_split_host_port(e) for e in self.hosts]

    def describe(self) -> str:
        return ",".join(netloc.host_port(h, p) for h, p in self.endpoints())


def _split_host_port(entry: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" as (host, port); ValueError naming the entry otherwise."""
    host, sep, port = entry.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"hosts entry {entry!r} is not host:port (e.g. 10.0.0.5:5432)")
    return host, int(port)


class LogRotation(Strict):
    """The size bound of every file the agent appends to: the journal, PostgreSQL's log in
    ``file`` mode, the fence process's log. A file that reaches ``max_bytes`` becomes
    ``<file>.1`` (and ``.1`` becomes ``.2`` ...); ``backups`` older files are kept."""

    max_bytes: int = Field(default=64 * 1024 * 1024, ge=64 * 1024)
    backups: int = Field(default=4, ge=1, le=100)


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
    # continuous archiving and backups with pgBackRest (docs/backup.md): the member's own
    # config only, since archive_command runs a command; the DCS never sets it
    backup: BackupSettings | None = None
    # how the member that initialises the cluster makes its data: initdb, or a restore from
    # another cluster's pgBackRest repository (docs/backup.md); the local config only
    bootstrap: BootstrapSettings = BootstrapSettings()
    # this cluster follows another one (docs/backup.md); the local config only
    standby_cluster: StandbyClusterSettings | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_file: Path | None = None
    log_rotation: LogRotation = LogRotation()

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> AgentConfig:
        pg = self.postgresql
        if pg.superuser.username == pg.replication.username:
            raise ValueError(
                "postgresql.replication.username must differ from postgresql.superuser.username"
            )
        if pg.monitoring is not None and pg.monitoring.username in (
            pg.superuser.username,
            pg.replication.username,
        ):
            raise ValueError(
                "postgresql.monitoring.username must differ from the superuser's and the "
                "replication user's: the agent makes it a pg_monitor role without other rights"
            )
        if self.backup is not None:
            clash = sorted(k for k in self.postgresql.parameters if k.lower() in BACKUP_PARAMETERS)
            if clash:
                raise ValueError(
                    f"postgresql.parameters sets {', '.join(clash)}, which the agent writes "
                    f"itself when the backup section is set: remove them"
                )
        boot = self.bootstrap
        sc = self.standby_cluster
        if sc is not None and boot.method != "initdb":
            raise ValueError(
                "standby_cluster with bootstrap.method pgbackrest: a standby cluster's first "
                "member copies the source cluster's master; remove one of the two sections"
            )
        if sc is not None and sc.restore_command is not None:
            clash = [k for k in self.postgresql.parameters if k.lower() == "restore_command"]
            if clash:
                raise ValueError(
                    "postgresql.parameters sets restore_command and so does "
                    "standby_cluster.restore_command: keep the standby_cluster one"
                )
        if (
            boot.method == "pgbackrest"
            and self.backup is not None
            and boot.repository is not None
            and boot.stanza == self.cluster
            and same_repository(boot.repository, self.backup.repository)
        ):
            raise ValueError(
                "bootstrap.stanza in bootstrap.repository is this cluster's own stanza (its "
                "name) in its own repository (backup.repository): the restored cluster would "
                "archive into the stanza it restores from. Give the new cluster another name "
                "(cluster) or its own backup.repository"
            )
        return self


# What Kubernetes puts in a container's environment for every Service of the namespace (unless
# the pod says enableServiceLinks: false): <NAME>_SERVICE_HOST, <NAME>_SERVICE_PORT[_<PORT>],
# <NAME>_PORT, <NAME>_PORT_<n>_<PROTO>[_PROTO|_PORT|_ADDR]. A Service whose name starts with
# "pgsidecar" produces variables with our prefix that are not overrides.
_SERVICE_LINK_RE = re.compile(
    r"^PGSIDECAR(_[A-Z0-9_]*)?_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?"
    r"|PORT(_[0-9]+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)$"
)
# types whose override is the variable's text as it is: a '#', a ': ', 'null' or 'yes' in a
# password or a URL is part of it, not YAML syntax
_LITERAL_TYPES: tuple[type, ...] = (str, SecretStr, Path)
_MISSING = object()


def _field_type(path: list[str]) -> Any:
    """The annotation of the AgentConfig field at ``path`` (names or aliases, lower case), or
    ``_MISSING`` if there is no such field."""
    annotation: Any = AgentConfig
    for part in path:
        annotation = _unwrap_optional(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields = annotation.model_fields
            found = fields.get(part) or next((f for f in fields.values() if f.alias == part), None)
            if found is None:
                return _MISSING
            annotation = found.annotation
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
        else:
            return _MISSING
    return annotation


def _unwrap_optional(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if _is_union(annotation) and len(args) == 1:
        return args[0]
    return annotation


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _env_value(key: str, annotation: Any, raw: str) -> Any:
    """The value of override ``key`` for a field of type ``annotation``: string fields (secrets,
    paths, names, URLs) take the text literally; numbers, booleans, lists and mappings are
    written in YAML (``5433``, ``true``, ``["kafka-0:9092", "kafka-1:9092"]``)."""
    annotation = _unwrap_optional(annotation)
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    literal_ok = [
        o
        for o in options
        if (isinstance(o, type) and issubclass(o, _LITERAL_TYPES))
        or (typing.get_origin(o) is Literal and all(isinstance(v, str) for v in typing.get_args(o)))
    ]
    if not raw or (literal_ok and len(literal_ok) == len(options)):
        return raw
    try:
        parsed = yaml.safe_load(raw)
    except yaml.YAMLError:
        if literal_ok:
            return raw
        raise ConfigError(
            f"environment variable {key} is not valid YAML (a number, true/false, or a list "
            f"like [a, b]); fix its value (not shown: it may be a secret)"
        ) from None
    if literal_ok and not isinstance(parsed, (bool, int, float)):
        # a mixed field (a PostgreSQL parameter): only a number or a boolean is parsed
        return raw
    return parsed


def _apply_env(data: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    for key, value in environ.items():
        if not key.startswith("PGSIDECAR_") or key in ("PGSIDECAR_CONFIG",):
            continue
        path = key[len("PGSIDECAR_") :].lower().split("__")
        annotation = _field_type(path)
        if annotation is _MISSING and _SERVICE_LINK_RE.match(key):
            continue  # a Kubernetes service link, not an override
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        # an unknown field keeps its text: validation then names it as unknown
        node[path[-1]] = value if annotation is _MISSING else _env_value(key, annotation, value)
    return data


def _yaml_error(path: Path, exc: yaml.YAMLError) -> ConfigError:
    """A YAML syntax error as file, line, column and problem. Never the text of the line (PyYAML
    shows it in its own message): a password may be on it."""
    problem_mark = getattr(exc, "problem_mark", None)
    context_mark = getattr(exc, "context_mark", None)
    problem = str(getattr(exc, "problem", None) or "syntax error")
    context = getattr(exc, "context", None)
    where = ""
    if problem_mark is not None:
        where = f" at line {problem_mark.line + 1}, column {problem_mark.column + 1}"
    if context:
        problem += f" ({context}"
        if context_mark is not None:
            problem += (
                f" that starts at line {context_mark.line + 1}, column {context_mark.column + 1}"
            )
        problem += ")"
    # quoted text in PyYAML's problem is taken from the file (an alias, a tag, a token): elided,
    # except a single character such as '\t'
    problem = re.sub(r"'(?:[^'\\]|\\.){2,}'", "'...'", problem)
    return ConfigError(
        f"config file {path} is not valid YAML{where}: {problem}. Fix the syntax there (the line "
        f"is not shown: it may hold a secret); quote values that contain ': ', ' #' or start with "
        f"a special character"
    )


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
        raise _yaml_error(path, exc) from None
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
    if cfg.postgresql.monitoring is not None:
        cfg.postgresql.monitoring.resolve_password()
    cfg.api.resolve_token()
    return cfg


def slot_name(member: str) -> str:
    """The physical replication slot the master keeps for a member."""
    return re.sub(r"[^a-z0-9_]", "_", member.lower())[:63]
