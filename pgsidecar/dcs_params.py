"""Which PostgreSQL parameters a member takes from the DCS: the DCS is not a root shell.

Cluster parameters (``config set postgresql.parameters.X=Y``) are stored in the DCS and written
by every agent into its postgresql.conf. Whoever can write to the DCS could otherwise make every
member run a shell command (``archive_command``), load a library (``shared_preload_libraries``),
read or write files at a path of their choosing (``external_pid_file``, ``log_directory``), or pull
in a whole other config file (``include``). Those parameters come from the member's local config
only, unless that local config allows one by name (``postgresql.parameters_allowed_from_dcs``):
the member's own operator vouches for it, not whoever holds DCS write access.

Parameters the agent sets itself for each member (its connections, the walreceiver) are never
taken from the DCS: a cluster-wide value would be wrong for every member but one.

No I/O here: the agent screens what it reads from the DCS, and the CLI refuses the same names
before it stores anything, with the same reasons.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from typing import Any

from pgsidecar.postgres.config import AGENT_MANAGED_PARAMS

# run a shell command as the PostgreSQL OS user
COMMAND_PARAMETERS = frozenset(
    {
        "archive_command",
        "archive_cleanup_command",
        "recovery_end_command",
        "restore_command",
        "ssl_passphrase_command",
    }
)
# load code into the server
CODE_PARAMETERS = frozenset(
    {
        "archive_library",
        "dynamic_library_path",
        "jit_provider",
        "local_preload_libraries",
        "session_preload_libraries",
        "shared_preload_libraries",
    }
)
# read or write files at a path of the writer's choosing, or read another config file
FILE_PARAMETERS = frozenset(
    {
        "config_file",
        "data_directory",
        "external_pid_file",
        "hba_file",
        "ident_file",
        "include",
        "include_dir",
        "include_if_exists",
        "krb_server_keyfile",
        "log_directory",
        "log_filename",
        "promote_trigger_file",
        "unix_socket_group",
        "unix_socket_permissions",
        "ssl_ca_file",
        "ssl_cert_file",
        "ssl_crl_dir",
        "ssl_crl_file",
        "ssl_dh_params_file",
        "ssl_key_file",
        "stats_temp_directory",
    }
)
# written by the agent itself for each member (pgsidecar/postgres/config.py): never from the DCS
AGENT_MANAGED_PARAMETERS = AGENT_MANAGED_PARAMS
LOCAL_ONLY_PARAMETERS = COMMAND_PARAMETERS | CODE_PARAMETERS | FILE_PARAMETERS

# a parameter name as postgresql.conf accepts it (an extension's has one dot: auto_explain.x)
_NAME = re.compile(r"[a-z_][a-z0-9_$]*(\.[a-z_][a-z0-9_$]*)?")


def refusal(name: str, allowed: Collection[str] = ()) -> str | None:
    """Why ``name`` may not come from the DCS, or None if it may. ``allowed`` is the member's
    local allowlist (lower-case names); it opens the local-only classes, never the agent's own
    settings."""
    key = name.lower()
    if not _NAME.fullmatch(key):
        return f"{name!r} is not a PostgreSQL parameter name"
    if key in AGENT_MANAGED_PARAMETERS:
        return f"{key} is set by the agent itself for each member"
    if key in allowed:
        return None
    if key in COMMAND_PARAMETERS:
        what = "runs a shell command"
    elif key in CODE_PARAMETERS:
        what = "loads code into PostgreSQL"
    elif key in FILE_PARAMETERS:
        what = "names a file or directory PostgreSQL reads or writes"
    else:
        return None
    return (
        f"{key} {what}, so it comes from each member's local config only: set it under "
        f"postgresql.parameters there, or allow it from the DCS by listing it under "
        f"postgresql.parameters_allowed_from_dcs in every member's local config"
    )


def screen(
    params: Mapping[str, Any], allowed: Collection[str] = ()
) -> tuple[dict[str, Any], dict[str, str]]:
    """Split parameters read from the DCS into (accepted, refused {name: reason}). Names are
    lower-cased (PostgreSQL's are case-insensitive); values must be scalars."""
    allow = {a.lower() for a in allowed}
    accepted: dict[str, Any] = {}
    refused: dict[str, str] = {}
    for raw_name, value in params.items():
        name = str(raw_name)
        why = refusal(name, allow)
        if why is None and not isinstance(value, str | int | float | bool):
            why = f"{name}: a value must be a scalar, not {type(value).__name__}"
        if why is None and isinstance(value, str) and ("\n" in value or "\r" in value):
            why = f"{name}: a value cannot contain a newline"
        if why is None and isinstance(value, float) and not math.isfinite(value):
            why = f"{name}: {value} is not a PostgreSQL value"
        if why is None and isinstance(value, int) and abs(value) >= 2**63:
            why = f"{name}: an integer of {len(str(abs(value)))} digits is out of any range"
        if why is None:
            accepted[name.lower()] = value
        else:
            refused[name] = why
    return accepted, refused
