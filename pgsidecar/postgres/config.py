"""The files that make a data directory run as the role the agent chose: postgresql.conf,
pg_hba.conf, standby.signal, the recovery settings (primary_conninfo, primary_slot_name), the
passfile, and what postgresql.auto.conf may not override.

What goes into them is decided by pure functions (``server_parameters``, ``hba_networks``,
``render_hba``), unit-tested without a server; ``ConfigFiles`` writes them.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pgsidecar.config import PostgresSettings
from pgsidecar.postgres.conf import (
    Conninfo,
    local_host,
    pgpass_line,
    render_conf,
    strip_auto_conf,
)
from pgsidecar.postgres.errors import PostgresError
from pgsidecar.postgres.osuser import OsUser
from pgsidecar.postgres.tls import PostgresTlsFiles, is_loopback

Role = Literal["primary", "standby"]

# the agent's defaults; the member's postgresql.parameters and the cluster's go over them
DEFAULT_PARAMETERS: dict[str, Any] = {
    "max_connections": 100,
    "shared_buffers": "32MB",
    "wal_level": "replica",
    "hot_standby": True,
    "wal_log_hints": True,  # pg_rewind needs it (checksums are on too)
    "full_page_writes": True,
    "max_wal_senders": 10,
    "max_replication_slots": 10,
    "wal_keep_size": "128MB",
    "hot_standby_feedback": True,
    "wal_receiver_status_interval": "1s",
    "wal_receiver_timeout": "10s",
    "wal_sender_timeout": "10s",
    # a standby whose upstream went away retries after this: short for fast re-follow
    "wal_retrieve_retry_interval": "1s",
    "password_encryption": "scram-sha-256",
    # stderr is a pipe the agent reads (serverlog.py): to its own stderr, or a rotated file
    "logging_collector": False,
    "log_destination": "stderr",
    "log_line_prefix": "%m [%p] %q%u@%d ",
    "log_timezone": "UTC",
    "timezone": "UTC",
    "datestyle": "iso, mdy",
    "default_text_search_config": "pg_catalog.english",
}

# settings the agent must control: its own connections and the walreceiver depend on them
MANAGED_KEYS = ("listen_addresses", "port", "unix_socket_directories", "cluster_name")
# recovery settings that follow the role; never taken from user parameters or postgresql.auto.conf
ROLE_KEYS = frozenset({"primary_conninfo", "primary_slot_name"})
# the same for every role, and never taken from user parameters: see server_parameters
FIXED_RECOVERY = {"recovery_target_timeline": "latest"}
# with postgresql.tls on, the agent's own; a user or cluster value is dropped
TLS_PARAMS = ("ssl", "ssl_cert_file", "ssl_key_file", "ssl_ca_file", "ssl_min_protocol_version")
# every parameter the agent writes itself: a cluster-wide value would be wrong or ignored
AGENT_MANAGED_PARAMS = frozenset({*MANAGED_KEYS, *ROLE_KEYS, *FIXED_RECOVERY})


def server_parameters(
    settings: PostgresSettings,
    name: str,
    role: Role,
    primary_conninfo: str | None,
    slot: str | None,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """postgresql.conf's parameters for ``role``, and the managed keys whose user value was
    ignored. Only primary_conninfo and primary_slot_name differ between the roles (both are
    reloadable): a setting that can change only at server start must read the same for both, or
    the moment a promoted master's file loses it PostgreSQL flags it ``pending_restart``, even
    when the default it falls back to is the value in use. So recovery_target_timeline, which a
    primary ignores, is written for both."""
    params: dict[str, Any] = dict(DEFAULT_PARAMETERS)
    params.update(settings.parameters)
    params.update(parameters or {})
    managed: dict[str, Any] = {
        "listen_addresses": settings.listen,
        "port": settings.port,
        # TCP only: no socket dir to share or clean up, and every client uses the passfile
        "unix_socket_directories": "",
        "cluster_name": name,
    }
    ignored = [k for k in MANAGED_KEYS if k in params and str(params[k]) != str(managed[k])]
    params.update(managed)
    for key in ROLE_KEYS:
        params.pop(key, None)
    params.update(FIXED_RECOVERY)
    if role == "standby" and primary_conninfo is not None:
        params["primary_conninfo"] = primary_conninfo
        if slot:
            params["primary_slot_name"] = slot
    return params, ignored


def hba_networks(networks: list[str], own_host: str) -> list[str]:
    """The configured networks, plus the address the agent itself connects from (its local
    host) if none covers it: without it start() could never see the server accept."""
    nets = list(networks)
    try:
        own = ipaddress.ip_address(own_host)
    except ValueError:
        return nets  # a host name: the operator's networks must cover it
    for net in nets:
        try:
            if own in ipaddress.ip_network(net, strict=False):
                return nets
        except ValueError:
            continue
    return [*nets, f"{own}/{own.max_prefixlen}"]


def is_local_network(net: str) -> bool:
    """A network of loopback addresses only (127.0.0.0/8 and its parts, ::1)."""
    try:
        network = ipaddress.ip_network(net, strict=False)
    except ValueError:
        return False
    return is_loopback(str(network.network_address)) and is_loopback(str(network.broadcast_address))


def render_hba(networks: list[str], tls: bool = False) -> str:
    """pg_hba.conf: scram-sha-256 over TCP from ``networks``, for databases and replication.
    With ``tls`` every network but a loopback one is ``hostssl``: a connection without TLS
    from another address matches no line and is refused."""
    hba = [
        "# Written by pgsidecar; any edit is overwritten. Networks: postgresql.hba_networks.",
        "# TYPE   DATABASE     USER  ADDRESS  METHOD",
    ]
    for net in networks:
        if not net or any(c.isspace() for c in net):
            raise PostgresError(f"invalid hba network {net!r}")
        kind = "hostssl" if tls and not is_local_network(net) else "host   "
        hba.append(f"{kind} all          all   {net}  scram-sha-256")
        hba.append(f"{kind} replication  all   {net}  scram-sha-256")
    return "\n".join(hba) + "\n"


def primary_conninfo(
    upstream: Conninfo, passfile: Path, name: str, require_auth: str | None = None
) -> str:
    """The walreceiver's connection string: short timeouts and keepalives so a dead upstream is
    noticed in seconds."""
    return upstream.dsn(
        passfile,
        application_name=name,
        require_auth=require_auth,
        connect_timeout=3,
        keepalives_idle=5,
        keepalives_interval=2,
        keepalives_count=3,
    )


class ConfigFiles:
    def __init__(
        self,
        settings: PostgresSettings,
        name: str,
        data_dir: Path,
        state_dir: Path,
        passfile: Path,
        osuser: OsUser,
        log: Any,
    ) -> None:
        self.settings = settings
        self.name = name
        self.data_dir = data_dir
        self.state_dir = state_dir
        self.passfile = passfile
        self.osuser = osuser
        self.log = log
        self.tls = PostgresTlsFiles(settings, state_dir, osuser)

    def ensure_state_dir(self) -> None:
        self.osuser.ensure_dir(self.state_dir, "state_dir (it holds the passfile PostgreSQL reads)")

    def write_passfile(self) -> None:
        """state_dir/pgpass (0600, owned by os_user): read by the agent's own connections and by
        PostgreSQL's tools and walreceiver, which run as os_user."""
        self.ensure_state_dir()
        lines = []
        for cred in (self.settings.superuser, self.settings.replication):
            password = cred.resolve_password()
            if password is not None:
                lines.append(pgpass_line(cred.username, password))
        self.osuser.write_file(self.passfile, "".join(line + "\n" for line in lines), 0o600)
        self.log.info("pg_passfile_written", path=str(self.passfile), users=len(lines))
        # the CA our connections verify peers with must be there before the first of them
        self.tls.install()

    def write(
        self,
        role: Role,
        upstream: Conninfo | None,
        slot: str | None,
        parameters: dict[str, Any] | None = None,
    ) -> None:
        if role not in ("primary", "standby"):
            raise ValueError(f"role must be primary or standby, not {role!r}")
        if not (self.data_dir / "PG_VERSION").exists():
            raise PostgresError(f"write_config: {self.data_dir} holds no PostgreSQL data directory")
        self.tls.install()
        conninfo = (
            primary_conninfo(
                upstream,
                self.passfile,
                self.name,
                # the walreceiver runs the server's libpq, which may predate require_auth
                require_auth=self.tls.client_options(upstream.host, for_tools=True).get(
                    "require_auth"
                ),
            )
            if upstream is not None and role == "standby"
            else None
        )
        params, ignored = server_parameters(
            self.settings, self.name, role, conninfo, slot, parameters
        )
        # TLS is the member's own: never from a user or cluster parameter
        if self.tls.enabled:
            for key in TLS_PARAMS:
                params.pop(key, None)
            params.update(self.tls.server_parameters())
        for key in ignored:
            self.log.warning("pg_parameter_ignored", parameter=key, reason="managed by the agent")
        header = (
            f"Written by pgsidecar for member {self.name} as {role}; any edit is overwritten.\n"
            f"Set parameters in the pgsidecar config (postgresql.parameters)."
        )
        write = self.osuser.write_file
        write(self.data_dir / "postgresql.conf", render_conf(params, header))
        own_host = local_host(self.settings.listen)
        write(
            self.data_dir / "pg_hba.conf",
            render_hba(hba_networks(list(self.settings.hba_networks), own_host), self.tls.enabled),
        )

        standby_signal = self.data_dir / "standby.signal"
        if role == "standby":
            if not standby_signal.exists():
                write(standby_signal, "")
        else:
            with contextlib.suppress(FileNotFoundError):
                standby_signal.unlink()
        # recovery.signal = archive recovery then promote on its own: never wanted
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / "recovery.signal").unlink()

        auto = self.data_dir / "postgresql.auto.conf"
        if auto.exists():
            text, changed = strip_auto_conf(auto.read_text(encoding="utf-8"), ROLE_KEYS)
            if changed:
                write(auto, text)
                self.log.warning("pg_auto_conf_stripped", keys=sorted(ROLE_KEYS))
        self.log.info(
            "pg_config_written",
            role=role,
            upstream=f"{upstream.host}:{upstream.port}" if upstream and role == "standby" else None,
            slot=slot if role == "standby" else None,
        )

    def remove_signal_files(self) -> None:
        """Single-user mode cannot run in standby mode; write() puts the right one back."""
        for sig in ("standby.signal", "recovery.signal"):
            with contextlib.suppress(FileNotFoundError):
                (self.data_dir / sig).unlink()
