"""Operator commands that act through the DCS (shared by the CLI and the REST API).

Every command validates everything first and writes at most once: a refusal raises an
``OpsError`` subclass whose message names what is wrong, and nothing has been changed.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from events import netloc
from events.dcs import DCS, ClusterView
from fsm.inputs import member_view
from pgsidecar import dcs_params
from pgsidecar.postgres.conf import MEMORY_UNITS, parse_size
from pgsidecar.postgres.config import AGENT_MANAGED_PARAMS


class OpsError(Exception):
    """An operator command refused; nothing was changed."""


class SwitchoverError(OpsError):
    pass


class ConfigChangeError(OpsError):
    pass


# -- members ---------------------------------------------------------------------------------------

# tag values every member has unless configured otherwise (pgsidecar.config.Tags): `list` shows
# only the tags that differ, as patronictl does
DEFAULT_TAGS: dict[str, Any] = {
    "nofailover": False,
    "noloadbalance": False,
    "clonefrom": False,
    "nosync": False,
    "failover_priority": 1,
}


def _member_state(raw: Mapping[str, Any], running: bool, streaming: bool, leader: bool) -> str:
    if not running:
        state = raw.get("state")
        return state if isinstance(state, str) and state != "running" else "stopped"
    if leader:
        return "running"
    return "streaming" if streaming else "running"


def effective_sync_mode(view: ClusterView, local: str | None) -> str | None:
    """synchronous_mode as the agents apply it: the DCS config's value when valid (a YAML
    boolean read as on/off, as fsm.inputs does), else the agents' own setting ``local``."""
    v = (view.config or {}).get("synchronous_mode")
    if isinstance(v, bool):
        v = "on" if v else "off"
    return v if v in ("off", "on", "strict") else local


def sync_standbys(view: ClusterView, local_sync_mode: str | None = None) -> frozenset[str]:
    """Members of the synchronous set the current master recorded. Not in force: a set
    recorded by an earlier master, or any set while synchronous_mode is off (the master then
    requires no standby, though the record stays in the DCS). ``local_sync_mode`` is the agents'
    own setting when known; unknown, the record is trusted unless the DCS config says off."""
    if effective_sync_mode(view, local_sync_mode) == "off":
        return frozenset()
    sync = getattr(view, "sync", None)
    if not isinstance(sync, dict) or view.leader is None or sync.get("leader") != view.leader.name:
        return frozenset()
    members = sync.get("members")
    if not isinstance(members, list):
        return frozenset()
    return frozenset(m for m in members if isinstance(m, str))


def members_table(view: ClusterView, local_sync_mode: str | None = None) -> list[dict[str, Any]]:
    leader = view.leader.name if view.leader else None
    sync = sync_standbys(view, local_sync_mode)
    leader_lsn = None
    if leader and leader in view.members:
        lm = member_view(leader, view.members[leader])
        leader_lsn = lm.lsn if lm else None
    rows = []
    for name in sorted(view.members):
        raw = view.members[name]
        m = member_view(name, raw)
        if m is None:
            continue
        lag = None
        if name != leader and leader_lsn is not None and m.lsn is not None:
            lag = max(0, leader_lsn - m.lsn)
        tags = raw.get("tags") if isinstance(raw.get("tags"), dict) else {}
        rows.append(
            {
                "name": name,
                "role": m.role,
                "host": m.conn_host,
                "port": m.conn_port,
                "api_url": m.api_url,
                "timeline": m.timeline,
                "lsn": m.lsn,
                "lag_bytes": 0 if name == leader else lag,
                "pg_running": m.running,
                "streaming": m.streaming,
                "leader": name == leader,
                "state": _member_state(raw, m.running, m.streaming, name == leader),
                # published by a member whose PostgreSQL needs a restart to apply a parameter
                "pending_restart": raw.get("pending_restart") is True,
                "tags": tags,
                "sync_standby": name in sync and name != leader,
                # a standby cluster's member: the source cluster it follows
                "standby_source": raw.get("standby_source")
                if isinstance(raw.get("standby_source"), str)
                else None,
            }
        )
    return rows


def cluster_paused(view: ClusterView) -> bool:
    """The machine's own test (fsm.inputs): paused only when config["pause"] is exactly true."""
    return isinstance(view.config, dict) and view.config.get("pause") is True


# -- switchover ------------------------------------------------------------------------------------


# a scheduled switchover further ahead is more likely a typo (or hostile) than a plan
MAX_SWITCHOVER_DELAY = 7 * 86400.0


async def request_switchover(
    dcs: DCS, target: str | None, at: float | None = None
) -> dict[str, Any]:
    """Validate and write the switchover command. Refuses (and writes nothing) when the cluster is
    paused, there is no master, the target is unknown, is the master, is not a streaming replica,
    or may not fail over."""
    view = await dcs.read_cluster()
    if cluster_paused(view):
        # the master takes no automatic action while paused: the command would sit in the DCS
        # and fire, unexpectedly, at resume
        raise SwitchoverError(
            "the cluster is paused (maintenance mode): a switchover needs the agents to act; "
            "run `pgsidecar resume` first"
        )
    if view.leader is None:
        raise SwitchoverError("there is no master to switch over from; use failover instead")
    if view.switchover is not None:
        raise SwitchoverError(f"a switchover is already pending: {view.switchover}")
    if target is not None:
        if target not in view.members:
            known = ", ".join(sorted(view.members)) or "none"
            raise SwitchoverError(f"{target!r} is not a member of the cluster (members: {known})")
        if target == view.leader.name:
            raise SwitchoverError(f"{target!r} is already the master")
        m = member_view(target, view.members[target])
        if m is None or not m.running or not m.streaming:
            raise SwitchoverError(
                f"{target!r} is not a running, streaming replica; it cannot take over now"
            )
        if m.nofailover or m.failover_priority <= 0:
            raise SwitchoverError(f"{target!r} is tagged nofailover (or failover_priority 0)")
    else:
        ok = [
            n
            for n, raw in view.members.items()
            if n != view.leader.name
            and (mv := member_view(n, raw)) is not None
            and mv.running
            and mv.streaming
            and not mv.nofailover
            and mv.failover_priority > 0
        ]
        if not ok:
            raise SwitchoverError("no streaming replica can take over")
    now = time.time()
    if at is not None and (not math.isfinite(at) or at > now + MAX_SWITCHOVER_DELAY):
        raise SwitchoverError(
            f"--at is out of range: a switchover can be scheduled at most "
            f"{MAX_SWITCHOVER_DELAY // 86400:.0f} days ahead"
        )
    if at is not None and at < now - 1:
        raise SwitchoverError(
            f"--at is in the past ({time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(at))} UTC)"
        )
    cmd: dict[str, Any] = {"from": view.leader.name, "to": target, "requested_at": now}
    if at is not None:
        cmd["at"] = at
    await dcs.put_switchover(cmd)
    return cmd


async def cancel_switchover(dcs: DCS) -> dict[str, Any]:
    """Delete a pending (scheduled) switchover that has not started."""
    view = await dcs.read_cluster()
    sw = view.switchover
    if sw is None:
        raise SwitchoverError("no switchover is pending")
    if view.leader is None or view.leader.name != sw.get("from"):
        raise SwitchoverError("the switchover has already started; it cannot be cancelled")
    await dcs.delete_switchover()
    return sw


async def wait_for_leader(dcs: DCS, not_name: str | None, seconds: float) -> ClusterView | None:
    """Wait until a leader other than ``not_name`` holds the key (watch-driven)."""

    async def _wait() -> ClusterView | None:
        async for view in dcs.watch():
            if view.leader is not None and view.leader.name != not_name:
                return view
        return None

    try:
        return await asyncio.wait_for(_wait(), timeout=seconds)
    except TimeoutError:
        return None


# -- the cluster config key ------------------------------------------------------------------------
#
# The DCS ``config`` key holds the cluster-wide dynamic settings. Only the keys below may be
# written: the machine reads ttl, maximum_lag_on_failover, election_timeout and
# master_start_timeout (fsm.inputs.DYNAMIC_SETTINGS) and ``pause``; synchronous_mode and
# postgresql.parameters are stored for the agents to apply.

_TRUE = frozenset({"true", "on", "yes", "1"})
_FALSE = frozenset({"false", "off", "no", "0"})


def _want_bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    raise ConfigChangeError(f"{key}: {v!r} is not a boolean (true or false)")


def _want_number(key: str, v: Any) -> float:
    if isinstance(v, bool):
        raise ConfigChangeError(f"{key}: {v!r} is not a number")
    if isinstance(v, (int, float)):
        f = float(v)
    else:
        try:
            f = float(str(v).strip())
        except ValueError:
            raise ConfigChangeError(f"{key}: {v!r} is not a number") from None
    if not math.isfinite(f):
        raise ConfigChangeError(f"{key}: {v!r} is not a finite number")
    return f


def _ttl(v: Any) -> float:
    f = _want_number("ttl", v)
    if not 2 <= f <= 3600:
        raise ConfigChangeError(f"ttl: {v!r} is out of range: seconds, at least 2, at most 3600")
    return f


def _max_lag(v: Any) -> int:
    key = "maximum_lag_on_failover"
    if isinstance(v, bool) or isinstance(v, float):
        raise ConfigChangeError(f"{key}: {v!r} is not a whole number of bytes")
    if isinstance(v, int):
        n = v
    else:
        try:
            n = parse_size(str(v), whole=True)
        except ValueError:
            raise ConfigChangeError(
                f"{key}: {v!r} is not a size in bytes (1048576, or with a unit: 1MB, 512kB)"
            ) from None
    if n < 0:
        raise ConfigChangeError(f"{key}: {v!r} must be at least 0 bytes")
    return n


def _election_timeout(v: Any) -> float:
    f = _want_number("election_timeout", v)
    if not 0 < f <= 60:
        raise ConfigChangeError(f"election_timeout: {v!r} must be seconds, above 0, at most 60")
    return f


def _master_start_timeout(v: Any) -> float:
    f = _want_number("master_start_timeout", v)
    if f <= 0:
        raise ConfigChangeError(f"master_start_timeout: {v!r} must be seconds, above 0")
    return f


def _synchronous_mode(v: Any) -> str:
    # YAML reads a bare on/off as a boolean: take it back as the word the user wrote
    if isinstance(v, bool):
        v = "on" if v else "off"
    if isinstance(v, str) and v.strip().lower() in ("off", "on", "strict"):
        return v.strip().lower()
    raise ConfigChangeError(f"synchronous_mode: {v!r} must be one of off, on, strict")


def _sync_count(v: Any) -> int:
    key = "synchronous_node_count"
    if isinstance(v, bool) or isinstance(v, float):
        raise ConfigChangeError(f"{key}: {v!r} is not a whole number")
    try:
        n = v if isinstance(v, int) else int(str(v).strip())
    except ValueError:
        raise ConfigChangeError(f"{key}: {v!r} is not a whole number") from None
    if n < 1:
        raise ConfigChangeError(f"{key}: {v!r} must be at least 1")
    return n


def _pause(v: Any) -> bool:
    return _want_bool("pause", v)


# key -> (what it takes, validator returning the value to store)
CLUSTER_KEYS: dict[str, tuple[str, Any]] = {
    "ttl": ("seconds, float >= 2", _ttl),
    "maximum_lag_on_failover": ("bytes, int >= 0", _max_lag),
    "election_timeout": ("seconds, float > 0", _election_timeout),
    "master_start_timeout": ("seconds, float > 0", _master_start_timeout),
    "synchronous_mode": ("off | on | strict", _synchronous_mode),
    "synchronous_node_count": ("int >= 1", _sync_count),
    "pause": ("true | false", _pause),
}
PG_PARAM_PREFIX = ("postgresql", "parameters")


def valid_keys_text() -> str:
    keys = [f"{k} ({what})" for k, (what, _) in CLUSTER_KEYS.items()]
    return ", ".join(keys) + ", postgresql.parameters.<name> (any PostgreSQL parameter)"


def _agent_rule(name: str, value: str) -> str | None:
    """Values that would break what the agent relies on (replication, pg_rewind)."""
    v = value.strip().lower()
    if name == "wal_level" and v == "minimal":
        return "wal_level minimal has no WAL for replicas: use replica or logical"
    if name == "hot_standby" and parse_pg_bool(v) is False:
        return "hot_standby off would leave replicas unqueryable and unprobeable by the agent"
    if name == "wal_log_hints" and parse_pg_bool(v) is False:
        return "wal_log_hints off would make pg_rewind impossible after a failover"
    return None


DELETE = object()  # the value of KEY=null: remove the key


def _scalar_for_pg(text: str) -> Any:
    """A PostgreSQL value given on the command line: a plain integer is stored as a number (it
    reads naturally in YAML), anything else as the string given."""
    return int(text) if re.fullmatch(r"-?\d+", text.strip()) else text


def parse_assignments(
    items: list[str], allowed: Collection[str] = ()
) -> list[tuple[tuple[str, ...], Any]]:
    """``KEY=VALUE`` arguments -> [(path, value)], validated; ``KEY=null`` removes KEY.
    A PostgreSQL parameter that runs commands, loads code or names files is refused unless in
    ``allowed`` (pgsidecar/dcs_params.py). Raises ConfigChangeError naming the first bad argument."""
    out: list[tuple[tuple[str, ...], Any]] = []
    if not items:
        raise ConfigChangeError("give at least one KEY=VALUE")
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigChangeError(f"{item!r} is not KEY=VALUE")
        pg_prefix = ".".join(PG_PARAM_PREFIX) + "."
        delete = raw.strip() == "null"
        path: tuple[str, ...]
        value: Any
        if key.startswith(pg_prefix) and key[len(pg_prefix) :]:
            # the name may hold dots itself (an extension's parameter: auto_explain.log_min_duration);
            # PostgreSQL's names are case-insensitive
            path = (*PG_PARAM_PREFIX, key[len(pg_prefix) :].lower())
            value = DELETE if delete else _scalar_for_pg(raw)
            if not delete and (why := dcs_params.refusal(path[-1], allowed)) is not None:
                raise ConfigChangeError(f"{key}: {why}")
        elif key in CLUSTER_KEYS:
            path = (key,)
            value = DELETE if delete else CLUSTER_KEYS[key][1](raw)
        else:
            raise ConfigChangeError(f"unknown config key {key!r}; valid keys: {valid_keys_text()}")
        out.append((path, value))
    return out


def apply_assignments(
    current: Mapping[str, Any], changes: list[tuple[tuple[str, ...], Any]]
) -> dict[str, Any]:
    """The new config document: ``current`` with the changes merged in (nothing else touched)."""
    new: dict[str, Any] = _deep_copy(current)
    for path, value in changes:
        node = new
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        if value is DELETE:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    # drop the containers a removal emptied
    pg = new.get("postgresql")
    if isinstance(pg, dict):
        if pg.get("parameters") == {}:
            pg.pop("parameters")
        if not pg:
            new.pop("postgresql")
    return new


def _deep_copy(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in d.items()}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Readable lines: ``key: old -> new`` (``(unset)`` for a missing side)."""
    a, b = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if key in a and key in b and a[key] == b[key] and type(a[key]) is type(b[key]):
            continue
        left = repr(a[key]) if key in a else "(unset)"
        right = repr(b[key]) if key in b else "(unset)"
        lines.append(f"{key}: {left} -> {right}")
    return lines


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def validate_document(
    new: Any, old: Mapping[str, Any], allowed: Collection[str] = ()
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check a whole config document (``config edit``). Keys whose value is unchanged from ``old``
    are taken as they are (so a key another version wrote does not block an edit); every new or
    changed key must be valid. Returns (document to store, PostgreSQL parameters to validate
    against a running PostgreSQL)."""
    if new is None:
        new = {}
    if not isinstance(new, dict):
        raise ConfigChangeError(
            f"the config must be a mapping of keys to values, not {type(new).__name__}"
        )
    out: dict[str, Any] = {}
    for key, value in new.items():
        if not isinstance(key, str):
            raise ConfigChangeError(f"config key {key!r} is not a string")
        # same type too: `pause: 1` equals True in Python but is not the boolean the machine reads
        if key in old and _same(old[key], value) and key != "postgresql":
            out[key] = value
            continue
        if key in CLUSTER_KEYS:
            out[key] = None if value is None else CLUSTER_KEYS[key][1](value)
            if out[key] is None:
                out.pop(key)
        elif key != "postgresql":
            raise ConfigChangeError(f"unknown config key {key!r}; valid keys: {valid_keys_text()}")
    pg_check: dict[str, Any] = {}
    if "postgresql" in new:
        pg = new["postgresql"]
        if pg is None:
            pg = {}
        if not isinstance(pg, dict) or set(pg) - {"parameters"}:
            extra = sorted(set(pg) - {"parameters"}) if isinstance(pg, dict) else []
            raise ConfigChangeError(
                "postgresql: only 'parameters' may be set here"
                + (f" (found {', '.join(map(str, extra))})" if extra else "")
            )
        params = pg.get("parameters") or {}
        if not isinstance(params, dict):
            raise ConfigChangeError("postgresql.parameters must map parameter names to values")
        old_pg = old.get("postgresql")
        old_params = old_pg.get("parameters") if isinstance(old_pg, dict) else None
        old_params = old_params if isinstance(old_params, dict) else {}
        clean: dict[str, Any] = {}
        for name, value in params.items():
            if not isinstance(name, str) or not name:
                raise ConfigChangeError(f"postgresql.parameters: {name!r} is not a parameter name")
            if value is None:
                continue  # null removes the parameter
            if isinstance(value, (dict, list)):
                raise ConfigChangeError(
                    f"postgresql.parameters.{name}: a value must be a scalar, not {type(value).__name__}"
                )
            if (why := dcs_params.refusal(name, allowed)) is not None and not (
                name in old_params and _same(old_params[name], value)
            ):
                raise ConfigChangeError(f"postgresql.parameters.{name}: {why}")
            clean[name.lower()] = value
            if name not in old_params or not _same(old_params[name], value):
                pg_check[name.lower()] = value
        if clean:
            out["postgresql"] = {"parameters": clean}
    return out, pg_check


# -- PostgreSQL parameters: validated by the master's PostgreSQL before they are stored -----------


@dataclass(frozen=True)
class PgSetting:
    """One row of pg_settings, as much as validation needs."""

    name: str
    vartype: str  # bool | integer | real | string | enum
    context: str  # internal | postmaster | sighup | superuser-backend | backend | superuser | user
    unit: str | None = None
    min_val: str | None = None
    max_val: str | None = None
    enumvals: tuple[str, ...] = ()


PG_SETTINGS_SQL = """
SELECT name, vartype, context, unit, min_val, max_val, enumvals
FROM pg_settings WHERE lower(name) = ANY(%s)
"""

_TIME_UNITS = {
    "us": 0.001,
    "ms": 1.0,
    "s": 1000.0,
    "min": 60_000.0,
    "h": 3_600_000.0,
    "d": 86_400_000.0,
}


def parse_pg_bool(text: str) -> bool | None:
    """PostgreSQL's parse_bool: on/off, true/false, yes/no, 1/0, and unique prefixes."""
    v = text.strip().lower()
    if not v:
        return None
    if "true".startswith(v) or "yes".startswith(v) or v == "1" or (len(v) >= 2 and v == "on"):
        return True
    if (
        "false".startswith(v)
        or "no".startswith(v)
        or v == "0"
        or (len(v) >= 2 and "off".startswith(v))
    ):
        return False
    return None


def pg_value_text(value: Any) -> str:
    """How a stored value reaches PostgreSQL (as render_conf writes it)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _base_unit(unit: str) -> tuple[str, float]:
    """pg_settings.unit ("8kB", "kB", "ms", "min", ...) -> (kind, size of one base unit in
    bytes or milliseconds)."""
    m = re.fullmatch(r"(\d*)\s*([a-zA-Z]+)", unit)
    if m is None:
        raise ValueError(unit)
    mult = int(m.group(1)) if m.group(1) else 1
    u = m.group(2)
    if u in MEMORY_UNITS:
        return "memory", mult * MEMORY_UNITS[u]
    if u in _TIME_UNITS:
        return "time", mult * _TIME_UNITS[u]
    raise ValueError(unit)


def _numeric(s: PgSetting, text: str) -> float:
    """The value in the parameter's base unit, following PostgreSQL's rules: a number, optionally
    followed by a unit of the parameter's kind (memory: B kB MB GB TB; time: us ms s min h d),
    units being case-sensitive. Raises ConfigChangeError."""
    key = f"postgresql.parameters.{s.name}"
    m = re.fullmatch(
        r"\s*([-+]?(?:0[xX][0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+))\s*([a-zA-Z]*)\s*",
        text,
    )
    if m is None:
        raise ConfigChangeError(f"{key}: {text!r} is not a number")
    num_text, unit = m.group(1), m.group(2)
    number = (
        float(int(num_text, 16))
        if num_text.lower().lstrip("+-").startswith("0x")
        else float(num_text)
    )
    if unit:
        if not s.unit:
            raise ConfigChangeError(f"{key}: takes no unit, got {text!r}")
        kind, base = _base_unit(s.unit)
        units = MEMORY_UNITS if kind == "memory" else _TIME_UNITS
        if unit not in units:
            raise ConfigChangeError(
                f"{key}: unit {unit!r} is not valid here; use one of {', '.join(units)}"
                " (case matters)"
            )
        number = number * units[unit] / base
    if s.vartype == "integer":
        number = float(round(number))
    return number


def check_pg_parameter(s: PgSetting | None, name: str, value: Any, asked: str) -> None:
    """Refuse (ConfigChangeError naming what is wrong) a value PostgreSQL would reject, as far as
    pg_settings tells: existence, settable at all, type, unit, range, enum values."""
    key = f"postgresql.parameters.{name}"
    text = pg_value_text(value)
    if s is None:
        raise ConfigChangeError(
            f"{key}: PostgreSQL on {asked} knows no parameter {name!r} "
            "(an extension's parameter is known only once the extension is loaded)"
        )
    if name in AGENT_MANAGED_PARAMS:
        raise ConfigChangeError(
            f"{key}: set by the agent itself for each member; not settable here"
        )
    if s.context == "internal":
        raise ConfigChangeError(
            f"{key}: read-only in PostgreSQL (fixed when it was built or initdb ran)"
        )
    if (why := _agent_rule(name, text)) is not None:
        raise ConfigChangeError(f"{key}: {why}")
    if s.vartype == "bool":
        if parse_pg_bool(text) is None:
            raise ConfigChangeError(f"{key}: {text!r} is not a boolean (on/off, true/false)")
    elif s.vartype in ("integer", "real"):
        n = _numeric(s, text)
        unit = f" {s.unit}" if s.unit else ""
        if s.min_val is not None and n < float(s.min_val):
            raise ConfigChangeError(f"{key}: {text!r} is below the minimum {s.min_val}{unit}")
        if s.max_val is not None and n > float(s.max_val):
            raise ConfigChangeError(f"{key}: {text!r} is above the maximum {s.max_val}{unit}")
    elif s.vartype == "enum":
        if text.strip().lower() not in {v.lower() for v in s.enumvals}:
            raise ConfigChangeError(f"{key}: {text!r} is not one of {', '.join(s.enumvals)}")


@dataclass(frozen=True)
class PgTarget:
    """Where to ask: a member's PostgreSQL and the superuser to ask as."""

    member: str
    host: str
    port: int
    user: str
    password: str | None


def pg_target(view: ClusterView, user: str, password: str | None) -> PgTarget:
    """The master's PostgreSQL (any running member when there is no master: every member runs
    the same PostgreSQL build). Raises ConfigChangeError when none is running."""
    order = [view.leader.name] if view.leader else []
    order += sorted(n for n in view.members if n not in order)
    for name in order:
        raw = view.members.get(name)
        m = member_view(name, raw) if raw is not None else None
        if m is not None and m.running and m.conn_host and m.conn_port:
            return PgTarget(name, m.conn_host, m.conn_port, user, password)
    raise ConfigChangeError(
        "no member's PostgreSQL is running to validate postgresql.parameters against; "
        "nothing changed"
    )


async def validate_pg_parameters(params: Mapping[str, Any], target: PgTarget) -> None:
    """Ask PostgreSQL whether it would accept each value, before anything is stored.

    pg_settings gives existence, type, unit, range and enum values for every parameter. For the
    parameters a session may set (context user/superuser), PostgreSQL's own check is run as well:
    ``set_config`` in a transaction that is rolled back (it also runs the parameter's check hook,
    e.g. for search_path or DateStyle). Parameters of other contexts (postmaster, sighup) cannot
    be set by a session at all, so pg_settings is the whole check for them."""
    if not params:
        return
    import psycopg

    params = {k.lower(): v for k, v in params.items()}
    names = sorted(params)
    try:
        conn = await asyncio.wait_for(
            psycopg.AsyncConnection.connect(
                host=target.host,
                port=target.port,
                user=target.user,
                password=target.password,
                dbname="postgres",
                connect_timeout=5,
                application_name="pgsidecar-config",
            ),
            timeout=10,
        )
    except (psycopg.Error, OSError, TimeoutError) as exc:
        raise ConfigChangeError(
            f"cannot ask PostgreSQL on {target.member} ({netloc.host_port(target.host, target.port)}) to validate "
            f"postgresql.parameters: {str(exc).strip() or type(exc).__name__}; nothing changed"
        ) from None
    try:
        async with conn:
            cur = await conn.execute(PG_SETTINGS_SQL, (names,))
            rows = await cur.fetchall()
            # pg_settings keeps PostgreSQL's spelling (DateStyle, TimeZone); names compare
            # case-insensitively, as in postgresql.conf
            settings = {
                r[0].lower(): PgSetting(r[0], r[1], r[2], r[3], r[4], r[5], tuple(r[6] or ()))
                for r in rows
            }
            for name in names:
                check_pg_parameter(settings.get(name), name, params[name], target.member)
            for name in names:
                s = settings[name]
                if s.context not in ("user", "superuser"):
                    continue
                try:
                    await conn.execute(
                        "SELECT set_config(%s, %s, true)", (name, pg_value_text(params[name]))
                    )
                except psycopg.Error as exc:
                    msg = (exc.diag.message_primary or str(exc)).strip()
                    raise ConfigChangeError(
                        f"postgresql.parameters.{name}: PostgreSQL on {target.member} refuses "
                        f"{pg_value_text(params[name])!r}: {msg}"
                    ) from None
                finally:
                    await conn.rollback()
    except psycopg.Error as exc:
        raise ConfigChangeError(
            f"validating postgresql.parameters on {target.member} failed: {exc}; nothing changed"
        ) from None


async def store_config(dcs: DCS, base: Mapping[str, Any] | None, new: dict[str, Any]) -> None:
    """Write ``new`` as the config key, unless the key changed since ``base`` was read (another
    operator's change would be lost). The DCS interface has no compare-and-set for the config
    key, so this narrows the window to one read; it does not close it."""
    view = await dcs.read_cluster()
    if (view.config or {}) != (base or {}):
        raise ConfigChangeError(
            "the cluster config changed while this command ran (another operator?); "
            "nothing written: run the command again"
        )
    await dcs.put_config(new)


def require_cluster(view: ClusterView, cluster: str) -> None:
    if view.initialize is None and not view.members and view.leader is None:
        raise OpsError(
            f"there is no cluster {cluster!r} in the DCS (no members, never initialized): "
            "check --config / --dir"
        )


def require_config_readable(view: ClusterView, config_key: str) -> None:
    for key, reason in view.malformed:
        if key.strip("/") == config_key.strip("/"):
            raise ConfigChangeError(
                f"the config key cannot be read ({reason}); fix it with `pgsidecar config edit`"
            )


async def set_pause(dcs: DCS, cluster: str, paused: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pause (or resume) the cluster: ``pause`` in the config key, merged with the rest. Refuses
    when it is already in that state. Returns (old config, new config)."""
    view = await dcs.read_cluster()
    require_cluster(view, cluster)
    require_config_readable(view, dcs.key("config"))
    old = dict(view.config or {})
    if cluster_paused(view) == paused:
        raise OpsError(f"the cluster is already {'paused' if paused else 'not paused'}")
    new = dict(old)
    if paused:
        new["pause"] = True
    else:
        new.pop("pause", None)  # absent = not paused: nothing stays behind to misread
    await store_config(dcs, view.config, new)
    return old, new


# -- standby clusters ---------------------------------------------------------------------------------


def standby_leader_of(view: ClusterView) -> str | None:
    """The member leading a standby cluster (None: no standby leader now)."""
    if view.leader is None:
        return None
    raw = view.members.get(view.leader.name)
    if isinstance(raw, dict) and raw.get("role") == "standby_leader":
        return view.leader.name
    return None


async def promote_standby_cluster(
    dcs: DCS, cluster: str, now: float
) -> tuple[dict[str, Any], bool]:
    """Write the cluster's promotion marker: the standby leader promotes and the cluster stops
    following its source for good. Returns (the marker, whether this call wrote it); a marker
    already there is reported, not rewritten. Refuses a cluster that is not a standby cluster:
    no member publishes a source it follows (the marker would change nothing there, but an
    operator who aimed at the wrong cluster should hear so)."""
    view = await dcs.read_cluster()
    require_cluster(view, cluster)
    if view.standby_promoted is not None:
        return view.standby_promoted, False
    sources = sorted(
        {
            str(raw["standby_source"])
            for raw in view.members.values()
            if isinstance(raw, dict) and isinstance(raw.get("standby_source"), str)
        }
    )
    if not sources:
        raise OpsError(
            f"cluster {cluster!r} is not a standby cluster (no member follows another cluster): "
            "nothing to promote"
        )
    marker: dict[str, Any] = {
        "requested_at": now,
        "source": ",".join(sources),
        "standby_leader": standby_leader_of(view),
    }
    await dcs.put_standby_promoted(marker)
    return marker, True
