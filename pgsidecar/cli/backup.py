"""``pgsidecar backup``: take a pgBackRest backup of the cluster, from a streaming replica when
there is one (pgBackRest's backup-standby: started and stopped on the master, the files copied
from the replica), else from the master; ``pgsidecar backup list``: the backups in the repository.

pgBackRest reaches the servers it backs up on this host (a server on another host needs its TLS
server, not set up here): the members it can use are those whose agent config is at hand, every
member of a local cluster (--dir) or the one member --config names."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from events.dcs import DCS
from pgsidecar.backup import BackupError, BackupSet, PgBackRest
from pgsidecar.backup.source import choose_source
from pgsidecar.cli.common import EXIT_REFUSED, err, run_with_dcs
from pgsidecar.config import AgentConfig, ConfigError, load_config

BACKUP_TYPES = ("full", "diff", "incr")


class _Quiet:
    """The CLI prints its own result; pgBackRest's progress lines stay out of stdout (its own
    log is in the member's state_dir/pgbackrest/log, its errors come back as BackupError)."""

    def info(self, *_: Any, **__: Any) -> None:
        return None

    warning = error = info


def local_configs(args: argparse.Namespace) -> dict[str, AgentConfig]:
    """The agent configs at hand, by member name: all of a local cluster's, or the one given."""
    if getattr(args, "config", None):
        cfg = load_config(args.config)
        return {cfg.name: cfg}
    if getattr(args, "dir", None):
        from pgsidecar.lab.local import LocalCluster

        lc = LocalCluster(Path(args.dir))
        if not lc.members:
            raise ConfigError(f"{args.dir} holds no local cluster; run `pgsidecar local up` first")
        return {m.name: load_config(lc.config_path(m.name)) for m in lc.members}
    raise ConfigError("give --config FILE (an agent's config) or --dir DIR (a local cluster)")


def pgbackrest_for(cfg: AgentConfig) -> PgBackRest:
    from pgsidecar.backup.member import member_pgbackrest

    br = member_pgbackrest(cfg, _Quiet())
    if br is None:
        raise ConfigError(
            f"member {cfg.name}'s config has no backup section: nothing archives to a repository"
        )
    return br


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def _size(n: int) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    size, unit = float(n), 0
    while size >= 1024 and unit < len(units) - 1:
        size, unit = size / 1024, unit + 1
    return f"{size:.0f} {units[unit]}" if unit == 0 else f"{size:.1f} {units[unit]}"


def backup_document(b: BackupSet) -> dict[str, Any]:
    doc = asdict(b)
    doc["start"] = b.start.isoformat()
    doc["stop"] = b.stop.isoformat()
    return doc


def render_backups(stanza: str, backups: list[BackupSet]) -> str:
    header = [
        "Label",
        "Type",
        "Start (UTC)",
        "Stop (UTC)",
        "Size",
        "In repo",
        "WAL start",
        "WAL stop",
    ]
    rows = [
        [
            b.label,
            b.type,
            _when(b.start),
            _when(b.stop),
            _size(b.size),
            _size(b.repo_delta),
            b.wal_start or "-",
            b.wal_stop or "-",
        ]
        for b in backups
    ]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    title = f"+ Stanza: {stanza} "
    top = title + sep[len(title) :] if len(title) < len(sep) else title + "+"
    lines = [top, fmt(header), sep, *(fmt(r) for r in rows), sep]
    if not rows:
        lines.append(" (no backups)")
    return "\n".join(lines)


def cmd_backup(args: argparse.Namespace) -> int:
    if getattr(args, "backup_cmd", None) == "list":
        return cmd_backup_list(args)
    configs = local_configs(args)

    async def body(_cfg: AgentConfig, dcs: DCS) -> int:
        view = await dcs.read_cluster()
        try:
            master, replica = choose_source(view, set(configs))
        except BackupError as exc:
            err(f"backup refused: {exc}")
            return EXIT_REFUSED
        from pgsidecar.backup.member import member_instance

        # the run uses the config of the member the files come from
        source = replica or master
        br = pgbackrest_for(configs[source])
        print(
            f"backup ({args.type}) of {configs[master].cluster}: "
            + (
                f"files from replica {replica}, started on master {master}"
                if replica
                else f"from master {master}"
            ),
            flush=True,
        )
        try:
            taken = await br.backup(
                args.type,
                standby=member_instance(configs[replica]) if replica else None,
                primary=member_instance(configs[master]),
            )
        except BackupError as exc:
            err(f"backup failed: {exc}")
            return EXIT_REFUSED
        print(
            f"backup {taken.label} ({taken.type}): {_size(taken.size)}, {_size(taken.repo_delta)} "
            f"in the repository, WAL {taken.wal_start}..{taken.wal_stop}",
            flush=True,
        )
        return 0

    return run_with_dcs(args, "backup", body)


def cmd_backup_list(args: argparse.Namespace) -> int:
    configs = local_configs(args)
    with_backup = [c for c in configs.values() if c.backup is not None]
    br = pgbackrest_for(with_backup[0] if with_backup else next(iter(configs.values())))
    try:
        info = asyncio.run(br.info())
    except BackupError as exc:
        err(f"backup list: {exc}")
        return EXIT_REFUSED
    if args.json:
        doc = {
            "stanza": info.name,
            "status": {"code": info.status_code, "message": info.status_message},
            "backup_running": info.backup_running,
            "archive": [asdict(a) for a in info.archives],
            "backups": [backup_document(b) for b in info.backups],
        }
        print(json.dumps(doc, indent=2), flush=True)
    else:
        print(render_backups(info.name, info.backups), flush=True)
        for a in info.archives:
            print(f" WAL archive {a.id}: {a.min or '-'} .. {a.max or '-'}")
        if not info.ok:
            print(f" status: {info.status_message}")
    return 0


def _add_target(sp: argparse.ArgumentParser, default: Any = None) -> None:
    g = sp.add_mutually_exclusive_group()
    g.add_argument(
        "--config", default=default, help="an agent's config file, with a backup section"
    )
    g.add_argument("--dir", default=default, help="a local cluster's directory")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bp = sub.add_parser(
        "backup",
        help="take a pgBackRest backup (from a streaming replica when there is one); `backup list`",
        description="Take a backup of the cluster into its pgBackRest repository, from a streaming "
        "replica when one is on this host, else from the master. `backup list` lists the backups.",
    )
    bp.add_argument("--type", choices=BACKUP_TYPES, default="full", help="default: full")
    _add_target(bp)
    bsub = bp.add_subparsers(dest="backup_cmd")
    ls = bsub.add_parser("list", help="the backups in the repository: sizes, times, WAL ranges")
    ls.add_argument("--json", action="store_true")
    # SUPPRESS: a --dir given before `list` is kept, not reset by the subcommand's default
    _add_target(ls, default=argparse.SUPPRESS)
    bp.set_defaults(func=cmd_backup)
