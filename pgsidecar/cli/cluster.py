"""The cluster as the DCS holds it: ``list`` (the members), ``pause`` / ``resume`` (maintenance
mode) and ``config show | set KEY=VALUE... | edit`` (the cluster-wide config).

Every command reads the DCS, validates everything, then writes at most once. A refusal
exits 1 with a message naming what is wrong and changes nothing; a bad --config exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from typing import Any

import yaml

from events import netloc
from events.dcs import DCS, ClusterView, DCSError
from pgsidecar import dcs_params
from pgsidecar.cli.common import EXIT_REFUSED, add_target, config_from_args, err, run_with_dcs
from pgsidecar.config import AgentConfig
from pgsidecar.ops import (
    DEFAULT_TAGS,
    DELETE,
    PG_PARAM_PREFIX,
    OpsError,
    apply_assignments,
    cluster_paused,
    config_diff,
    members_table,
    parse_assignments,
    pg_target,
    promote_standby_cluster,
    require_cluster,
    require_config_readable,
    set_pause,
    store_config,
    valid_keys_text,
    validate_document,
    validate_pg_parameters,
)

# what fsm/machine.py does while paused (eligible() and the paused checks in decide())
PAUSE_EFFECT = (
    "while paused no agent fails over, switches over or restarts a stopped PostgreSQL on its "
    "own; the master keeps its lease (and still fences itself if it cannot renew it)"
)


# -- pause / resume -------------------------------------------------------------------------------


def cmd_pause(args: argparse.Namespace) -> int:
    paused = args.cmd == "pause"

    async def body(cfg: AgentConfig, dcs: DCS) -> int:
        old, new = await set_pause(dcs, cfg.cluster, paused)
        for line in config_diff(old, new):
            print(f"changed {line}")
        if paused:
            print(f"cluster {cfg.cluster} paused: {PAUSE_EFFECT}")
        else:
            print(
                f"cluster {cfg.cluster} resumed: the agents act again and take the cluster "
                "as they find it"
            )
        return 0

    return run_with_dcs(args, args.cmd, body)


# -- promote-cluster ------------------------------------------------------------------------------


def cmd_promote_cluster(args: argparse.Namespace) -> int:
    """``pgsidecar promote-cluster``: a standby cluster becomes a normal one (its standby leader
    promotes); with --wait SECONDS, until one member is master."""

    async def body(cfg: AgentConfig, dcs: DCS) -> int:
        marker, wrote = await promote_standby_cluster(dcs, cfg.cluster, time.time())
        if not wrote:
            print(f"cluster {cfg.cluster} was already promoted (at {marker.get('requested_at')})")
        else:
            leader = marker.get("standby_leader") or "the next standby leader elected"
            print(
                f"cluster {cfg.cluster} promoted: it stops following {marker.get('source')}; "
                f"{leader} becomes master"
            )
        if args.wait is None:
            return 0
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline:
            view = await dcs.read_cluster()
            masters = [n for n, r in members_roles(view).items() if r == "master"]
            if view.leader is not None and masters == [view.leader.name]:
                print(f"{view.leader.name} is master (term {view.leader.term})")
                return 0
            await asyncio.sleep(0.5)
        err(f"promote-cluster: no master within {args.wait:g} s (the marker is written)")
        return EXIT_REFUSED

    return run_with_dcs(args, "promote-cluster", body)


def members_roles(view: ClusterView) -> dict[str, str]:
    return {
        n: str(raw.get("role"))
        for n, raw in view.members.items()
        if isinstance(raw, dict) and raw.get("running") is True
    }


# -- config -----------------------------------------------------------------------------------------


def _dump_yaml(config: dict[str, Any]) -> str:
    if not config:
        return "{}\n"
    return yaml.safe_dump(config, sort_keys=True, default_flow_style=False)


async def _read(dcs: DCS, cfg: AgentConfig) -> ClusterView:
    view = await dcs.read_cluster()
    require_cluster(view, cfg.cluster)
    return view


async def _validate_and_store(
    cfg: AgentConfig,
    dcs: DCS,
    view: ClusterView,
    new: dict[str, Any],
    pg_check: dict[str, Any],
) -> int:
    old = dict(view.config or {})
    diff = config_diff(old, new)
    if not diff:
        print("nothing to change: the config already says so")
        return 0
    if pg_check:
        su = cfg.postgresql.superuser
        target = pg_target(view, su.username, su.resolve_password())
        await validate_pg_parameters(pg_check, target)
    await store_config(dcs, view.config, new)
    for line in diff:
        print(f"changed {line}")
    if any(line.startswith("ttl:") for line in diff):
        # the agents read it into their decisions (stand-aside windows); their lease is granted
        # and fenced with their own settings.ttl, which the DCS value does not change (yet)
        print(
            "note: ttl is used by the agents' decisions at once; each agent's lease keeps "
            "the ttl of its own config until the agents apply the cluster ttl to their session"
        )
    if any(line.startswith("postgresql.parameters.") for line in diff):
        # applying them (a reload, or a pending restart) is each agent's job, not the CLI's
        print("PostgreSQL parameters are stored; each member applies them itself")
    return 0


_ALLOW_HINT = "; once every member allows it, store it with `config set --allow-from-dcs NAME ...`"


def cmd_config(args: argparse.Namespace) -> int:
    sub = args.config_cmd
    if sub == "set":
        # parse before connecting: a typo is refused without touching anything
        try:
            changes = parse_assignments(args.assignments, allowed=args.allow_from_dcs)
        except OpsError as exc:
            err(f"config set refused: {exc}{_ALLOW_HINT if 'allowed_from_dcs' in str(exc) else ''}")
            return EXIT_REFUSED

        async def set_body(cfg: AgentConfig, dcs: DCS) -> int:
            view = await _read(dcs, cfg)
            require_config_readable(view, dcs.key("config"))
            new = apply_assignments(view.config or {}, changes)
            pg_check = {
                path[2]: value
                for path, value in changes
                if path[:2] == PG_PARAM_PREFIX and value is not DELETE
            }
            return await _validate_and_store(cfg, dcs, view, new, pg_check)

        return run_with_dcs(args, "config set", set_body)

    if sub == "show":

        async def show_body(cfg: AgentConfig, dcs: DCS) -> int:
            view = await _read(dcs, cfg)
            require_config_readable(view, dcs.key("config"))
            config = dict(view.config or {})
            sys.stdout.write(_dump_yaml(config))
            # what this member would refuse of it (the DCS is not a root shell), as YAML comments
            pg = config.get("postgresql")
            params = pg.get("parameters") if isinstance(pg, dict) else None
            if isinstance(params, dict):
                _, refused = dcs_params.screen(params, cfg.postgresql.parameters_allowed_from_dcs)
                for name, why in sorted(refused.items()):
                    sys.stdout.write(f"# refused by member {cfg.name}: {name}: {why}\n")
            return 0

        return run_with_dcs(args, "config show", show_body)

    async def edit_body(cfg: AgentConfig, dcs: DCS) -> int:
        view = await _read(dcs, cfg)
        old = dict(view.config or {})
        text = await asyncio.to_thread(_edit_text, _edit_template(old))
        if text is None:
            return EXIT_REFUSED
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise OpsError(f"the edited config is not valid YAML: {exc}; nothing changed") from None
        new, pg_check = validate_document(doc, old, allowed=args.allow_from_dcs)
        return await _validate_and_store(cfg, dcs, view, new, pg_check)

    return run_with_dcs(args, "config edit", edit_body)


def _edit_template(config: dict[str, Any]) -> str:
    keys = valid_keys_text().replace(", ", "\n#   ")
    return (
        "# pgsidecar cluster config (the DCS `config` key). Lines starting with # are ignored.\n"
        f"# Valid keys:\n#   {keys}\n"
        "# Remove a key (or set it to null) to unset it.\n" + _dump_yaml(config)
    )


def _edit_text(initial: str) -> str | None:
    """Open $VISUAL / $EDITOR (default vi) on ``initial``; the edited text, or None (reported)
    when the editor failed."""
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    fd, path = tempfile.mkstemp(prefix="pgsidecar-config-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(initial)
        try:
            rc = subprocess.call([*shlex.split(editor), path])
        except OSError as exc:
            err(f"config edit: cannot run the editor {editor!r}: {exc.strerror}; nothing changed")
            return None
        if rc != 0:
            err(f"config edit: the editor {editor!r} exited with {rc}; nothing changed")
            return None
        with open(path) as fh:
            return fh.read()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


# -- list -----------------------------------------------------------------------------------------


def _lag_mb(row: dict[str, Any]) -> str:
    if row["leader"]:
        return ""
    if row["lag_bytes"] is None:
        return "unknown"
    return str(round(row["lag_bytes"] / 1024 / 1024))


def _tags_text(tags: dict[str, Any]) -> str:
    shown = [
        f"{k}: {json.dumps(v)}" for k, v in sorted(tags.items()) if DEFAULT_TAGS.get(k, None) != v
    ]
    return ", ".join(shown)


def _standby_lines(view: ClusterView, rows: list[dict[str, Any]]) -> list[str]:
    """Under the table of a standby cluster: the source it follows, or that it was promoted."""
    if view.standby_promoted is not None:
        was = view.standby_promoted.get("source")
        return [f" Standby cluster: promoted (no longer follows {was or 'its source'})"]
    sources = sorted({r["standby_source"] for r in rows if r.get("standby_source")})
    if not sources:
        return []
    return [
        f" Standby cluster: follows {', '.join(sources)} "
        "(its leader is a standby leader; `pgsidecar promote-cluster` makes it a normal cluster)"
    ]


def render_table(cluster: str, view: ClusterView, rows: list[dict[str, Any]]) -> str:
    """patronictl-like: one boxed table, a line per member."""
    paused = cluster_paused(view)
    header = ["Member", "Host", "Role", "State", "TL", "Lag in MB", "Pending restart", "Tags"]
    if paused:
        header.append("Maintenance")
    body = []
    for r in rows:
        host = netloc.host_port(r["host"] or "-", r["port"]) if r["port"] else r["host"] or "-"
        line = [
            r["name"],
            host,
            "sync replica" if r["sync_standby"] else r["role"],
            r["state"],
            "" if r["timeline"] is None else str(r["timeline"]),
            _lag_mb(r),
            "*" if r["pending_restart"] else "",
            _tags_text(r["tags"]),
        ]
        if paused:
            line.append("paused")
        body.append(line)
    widths = [max([len(h), *(len(b[i]) for b in body)]) for i, h in enumerate(header)]
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    term = f"term {view.leader.term}" if view.leader else "no leader"
    title = f"+ Cluster: {cluster} ({term}) "
    top = title + sep[len(title) :] if len(title) < len(sep) else title + "+"
    numeric = {"TL", "Lag in MB"}

    def fmt(cells: list[str]) -> str:
        out = []
        for h, c, w in zip(header, cells, widths, strict=True):
            out.append(c.rjust(w) if h in numeric and cells is not header else c.ljust(w))
        return "| " + " | ".join(out) + " |"

    lines = [top, fmt(header), sep, *(fmt(b) for b in body), sep]
    if paused:
        lines.append(f" Maintenance mode: on ({PAUSE_EFFECT})")
    lines += _standby_lines(view, rows)
    if not rows:
        lines.append(" (no members)")
    return "\n".join(lines)


def list_document(
    cluster: str,
    view: ClusterView,
    local_sync_mode: str | None = None,
    backup: dict[str, Any] | None = None,
) -> dict[str, Any]:
    rows = members_table(view, local_sync_mode)
    for r in rows:
        r["lag_mb"] = None if r["lag_bytes"] is None else round(r["lag_bytes"] / 1024 / 1024, 3)
    return {
        "cluster": cluster,
        "leader": view.leader.name if view.leader else None,
        "term": view.leader.term if view.leader else None,
        "paused": cluster_paused(view),
        "standby_promoted": view.standby_promoted,
        "members": rows,
        # the master's archiving and backups (its /status): None without a master or a backup
        # section
        "backup": backup,
    }


# how long `list` waits for the master's /status (the table itself needs only the DCS)
BACKUP_HEALTH_TIMEOUT = 3.0


def fetch_backup_health(
    view: ClusterView, context: ssl.SSLContext | None, timeout: float = BACKUP_HEALTH_TIMEOUT
) -> dict[str, Any] | None:
    """The master's archiving and backups as its /status reports them, with ``member`` (its
    name). The master archives and reads the repository, so it is the one asked. None: no
    master, or it has no backup section; ``error``: its API did not answer."""
    from pgsidecar.cli.members import _api

    if view.leader is None:
        return None
    name = view.leader.name
    raw = view.members.get(name)
    url = raw.get("api_url") if isinstance(raw, dict) else None
    if not isinstance(url, str):
        return {"member": name, "error": "it publishes no API address"}
    code, body = _api(url, "/status", None, timeout=timeout, context=context)
    if code != 200:
        return {"member": name, "error": body.get("error") or f"its API answered {code}"}
    health = body.get("backup")
    if not isinstance(health, dict):
        return None
    return {"member": name, **health}


def _ago(seconds: float) -> str:
    s = int(seconds)
    if s < 90:
        return f"{s} s ago"
    if s < 90 * 60:
        return f"{round(s / 60)} min ago"
    if s < 48 * 3600:
        return f"{s // 3600} h {s % 3600 // 60} min ago"
    return f"{s // 86400} d {s % 86400 // 3600} h ago"


def backup_line(health: dict[str, Any] | None) -> str | None:
    """The line under `list`'s table: the master's archiving and its repository's last backup."""
    if health is None:
        return None
    who = f"Backups (master {health['member']}): "
    if "error" in health:
        return f" {who}unknown, its API did not answer: {health['error']}"
    parts = []
    failing = health.get("archive_failing")
    archived = health.get("last_archived_age")
    if failing is None:
        parts.append("WAL archiving not read yet")
    else:
        parts.append("WAL archiving FAILING" if failing else "WAL archiving ok")
        parts.append(
            f"last WAL archived {_ago(archived)}" if archived is not None else "no WAL archived"
        )
    if health.get("last_backup"):
        parts.append(
            f"last backup {_ago(health.get('last_backup_age') or 0)} "
            f"({health['last_backup']}, {health.get('last_backup_type')})"
        )
    elif health.get("backups_error"):
        parts.append("last backup unknown")
    elif health.get("backups_read_age") is None:
        parts.append("repository not read yet")
    else:
        parts.append("no backup in the repository")
    if health.get("backups_error"):
        parts.append(f"repository unreadable: {health['backups_error']}")
    return " " + who + "; ".join(parts)


def cmd_list(args: argparse.Namespace) -> int:
    """``pgsidecar list``: the members as the DCS sees them; ``--watch SECONDS`` refreshes until
    Ctrl-C."""
    from events.dcs.factory import create_dcs

    cfg = config_from_args(args)
    watch = getattr(args, "watch", None)
    if watch is not None and watch <= 0:
        err("list: --watch takes a positive number of seconds")
        return EXIT_REFUSED

    # the agents' own synchronous_mode, in force unless the DCS config overrides it
    local_sync = cfg.cluster_settings.synchronous_mode

    def show(view: ClusterView, backup: dict[str, Any] | None) -> None:
        if args.json:
            doc = list_document(cfg.cluster, view, local_sync, backup)
            print(json.dumps(doc, indent=2), flush=True)
        else:
            rows = members_table(view, local_sync)
            text = render_table(cfg.cluster, view, rows)
            line = backup_line(backup)
            print(text if line is None else f"{text}\n{line}", flush=True)

    async def go() -> int:
        dcs = create_dcs(cfg.dcs, cfg.cluster)
        connected = False
        try:
            while True:
                try:
                    if not connected:
                        await asyncio.wait_for(dcs.connect(), timeout=15)
                        connected = True
                    view = await asyncio.wait_for(dcs.read_cluster(), timeout=15)
                except (DCSError, TimeoutError) as exc:
                    err(f"list: cannot reach the DCS ({cfg.dcs.type}): {exc or 'timed out'}")
                    if watch is None:
                        return EXIT_REFUSED
                else:
                    if watch is not None and not args.json:
                        if sys.stdout.isatty():
                            print("\033[H\033[J", end="")  # redraw in place, as watch(1) does
                        print(time.strftime("%Y-%m-%d %H:%M:%S"))
                    backup = None
                    if cfg.backup is not None:  # the members archive (the same section on each)
                        backup = await asyncio.to_thread(
                            fetch_backup_health, view, cfg.api.client_context()
                        )
                    show(view, backup)
                if watch is None:
                    return 0
                await asyncio.sleep(watch)
        finally:
            with contextlib.suppress(Exception):
                await dcs.close()

    if watch is not None:
        # a shell that starts us in the background ignores SIGINT for us; Ctrl-C (SIGINT) is how
        # --watch ends, so take it back
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return asyncio.run(go())
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how --watch ends


# -- parsers ----------------------------------------------------------------------------------------


def add_list_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ls = sub.add_parser("list", help="members of the cluster, as the DCS sees them")
    add_target(ls)
    ls.add_argument("--json", action="store_true")
    ls.add_argument(
        "--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C"
    )
    ls.set_defaults(func=cmd_list)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add pause, resume and config to the top-level parser."""
    for name, helptext in (
        ("pause", "maintenance mode: no agent takes any automatic action"),
        ("resume", "end maintenance mode: the agents act again"),
    ):
        sp = sub.add_parser(name, help=helptext, description=helptext)
        add_target(sp)
        sp.set_defaults(func=cmd_pause)

    pc = sub.add_parser(
        "promote-cluster",
        help="a standby cluster stops following its source: its standby leader becomes master",
        description="Writes the cluster's promotion marker in the DCS (it can only end standby "
        "mode, never start it): the standby leader promotes through the normal path and the "
        "cluster never follows its source again.",
    )
    add_target(pc)
    pc.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="wait until one member is master (exit 1 if none is within SECONDS)",
    )
    pc.set_defaults(func=cmd_promote_cluster)

    cp = sub.add_parser("config", help="the cluster-wide dynamic config in the DCS")
    csub = cp.add_subparsers(dest="config_cmd", required=True)
    show = csub.add_parser("show", help="print the config key as YAML")
    add_target(show)
    st = csub.add_parser(
        "set",
        help="set keys (KEY=VALUE; KEY=null removes)",
        description=f"Valid keys: {valid_keys_text()}. PostgreSQL parameters are checked by the "
        "master's PostgreSQL before anything is stored.",
    )
    add_target(st)
    st.add_argument("assignments", nargs="+", metavar="KEY=VALUE")
    ed = csub.add_parser("edit", help="edit the config as YAML in $EDITOR, validated on save")
    add_target(ed)
    for parser in (st, ed):
        parser.add_argument(
            "--allow-from-dcs",
            action="append",
            default=[],
            metavar="PARAMETER",
            help="store a PostgreSQL parameter that runs commands, loads code or names files "
            "(each member applies it only if its local config lists it under "
            "postgresql.parameters_allowed_from_dcs)",
        )
    cp.set_defaults(func=cmd_config)
