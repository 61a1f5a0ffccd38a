"""``pgsidecar local``: a local cluster on loopback (etcd + N members). The lab's LocalCluster is
imported only when the command runs."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgsidecar.config import DEFAULT_TTL, ConfigError

if TYPE_CHECKING:
    from pgsidecar.backup.settings import RecoveryTargetSettings
    from pgsidecar.lab.local import LocalCluster


def want_kafka(args: argparse.Namespace) -> bool:
    """--kafka / --no-kafka, or by default whether Java is there to run a broker."""
    from pgsidecar.lab.kafka_broker import java_available

    if args.kafka is not None:
        if args.kafka and not java_available():
            raise ConfigError("--kafka needs Java (apt-get install openjdk-17-jre-headless)")
        return bool(args.kafka)
    return java_available()


def print_local_status(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"{'Member':<8} {'Role':<14} {'PG port':>7} {'Running':<8} {'Streaming':<9} {'TL':>3}  DSN"
    )
    for r in rows:
        print(
            f"{r['name']:<8} {r['role']:<14} {r['port']:>7} {'yes' if r['pg_running'] else 'no':<8} "
            f"{'yes' if r['streaming'] else '-':<9} {r['timeline'] or '-':>3}  {r['dsn']}"
        )


def print_services(rows: list[dict[str, Any]]) -> None:
    """The cluster's own etcd members and Kafka brokers (``LocalCluster.services``)."""
    if not rows:
        return
    print(f"\n{'Service':<8} {'Name':<10} {'PID':>7} {'Leader':<8} Address")
    for r in rows:
        leader = {True: "yes", False: "-", None: ""}[r["leader"]]
        pid = r["pid"] if r["pid"] is not None else "down"
        print(f"{r['service']:<8} {r['name']:<10} {pid:>7} {leader:<8} {r['address']}")


def yaml_mode(lc: LocalCluster) -> str:
    """The synchronous_mode the local cluster's members were configured with."""
    import yaml

    cfg = yaml.safe_load(lc.config_path(lc.members[0].name).read_text())
    return str((cfg.get("settings") or {}).get("synchronous_mode", "off"))


def backup_schedule(items: list[str]) -> dict[str, str] | None:
    """``--backup-schedule TYPE=WHEN`` options as the backup section's schedule (validated with
    the config's own model, so a bad one is refused before anything is created)."""
    if not items:
        return None
    from pydantic import ValidationError

    from pgsidecar.backup import Schedule

    schedule: dict[str, str] = {}
    for item in items:
        kind, sep, when = item.partition("=")
        if not sep or kind.strip() not in ("full", "diff", "incr"):
            raise ConfigError(
                f"--backup-schedule {item!r}: give TYPE=WHEN, TYPE one of full, diff, incr"
            )
        schedule[kind.strip()] = when.strip()
    try:
        Schedule.model_validate(schedule)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'schedule'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise ConfigError(f"--backup-schedule: {reasons}") from None
    return schedule


def target_time(text: str | None) -> datetime | None:
    """``--target-time``: ISO 8601 with a time zone (``2026-12-03T05:00:00Z``)."""
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--target-time {text!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise ConfigError(f"--target-time {text!r} needs a time zone (Z or +HH:MM)")
    return when


TARGET_FLAGS = "--target-time, --target-lsn, --target-xid or --target-name"


def restore_target(args: argparse.Namespace) -> RecoveryTargetSettings | None:
    """``--restore-from``'s target: exactly one of ``--target-time``, ``--target-lsn``,
    ``--target-xid`` and ``--target-name`` (argparse refuses two), checked with the bootstrap
    section's own model, so a bad one is refused before anything is created."""
    from pydantic import ValidationError

    from pgsidecar.backup.settings import RecoveryTargetSettings

    given = {
        flag: value
        for flag, value in (
            ("--target-time", args.target_time),
            ("--target-lsn", args.target_lsn),
            ("--target-xid", args.target_xid),
            ("--target-name", args.target_name),
        )
        if value is not None
    }
    if args.restore_from is None:
        if given:
            raise ConfigError(f"{', '.join(given)} needs --restore-from DIR (the source cluster)")
        return None
    if not given:
        raise ConfigError(f"--restore-from needs a target: one of {TARGET_FLAGS}")
    ((flag, text),) = given.items()
    if flag == "--target-time":
        return RecoveryTargetSettings(time=target_time(text))
    field = {"--target-lsn": "lsn", "--target-xid": "xid", "--target-name": "name"}[flag]
    try:
        return RecoveryTargetSettings.model_validate({field: text})
    except ValidationError as exc:
        reason = {
            "lsn": "not an LSN (like 0/3000060)",
            "xid": "not a transaction id (a whole number, 3 or more)",
        }.get(field) or "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ConfigError(f"{flag} {text!r}: {reason}") from None


def cmd_local(args: argparse.Namespace) -> int:
    from pgsidecar.lab.local import LocalCluster, LocalClusterError

    lc = LocalCluster(Path(args.dir))
    try:
        if args.local_cmd == "up":
            if not lc.meta:
                extra: dict[str, Any] = {}
                if args.synchronous_mode != "off":
                    extra["settings.synchronous_mode"] = args.synchronous_mode
                lc.create(
                    nodes=args.nodes,
                    ttl=args.ttl,
                    base_port=args.base_port,
                    dcs=args.dcs,
                    cluster=args.cluster,
                    extra=extra,
                    kafka=want_kafka(args),
                    tls=args.tls,
                    backup=args.backup,
                    host=args.host,
                    backup_schedule=backup_schedule(args.backup_schedule),
                    restore_from=Path(args.restore_from) if args.restore_from else None,
                    restore_target=restore_target(args),
                    dcs_members=args.dcs_members,
                    kafka_brokers=args.kafka_brokers,
                    standby_of=Path(args.standby_of) if args.standby_of else None,
                )
            rows = lc.up(detach=True, timeout=args.timeout)
            cfg_mode = yaml_mode(lc)
            if cfg_mode != "off":
                sync = lc.wait_sync(timeout=args.timeout)
                print(
                    f"synchronous mode {cfg_mode}: synchronous standby {', '.join(sync)} recorded in the DCS"
                )
            print_local_status(rows, False)
            print_services(lc.services())
            leader = next(r for r in rows if r["role"] in ("master", "standby_leader"))
            what = "master" if leader["role"] == "master" else "standby leader (read-only)"
            print(f'\n{what}: {leader["name"]}\n  psql "{leader["dsn"]}"')
            if lc.meta.get("standby_of"):
                src = lc.meta["standby_of"]
                print(
                    f"standby cluster of {src['dir']} (follows {', '.join(src['hosts'])}); "
                    f"`pgsidecar promote-cluster --dir {lc.dir}` makes it a normal cluster"
                )
            return 0
        if not lc.meta:
            print(f"pgsidecar: {args.dir} holds no local cluster", file=sys.stderr)
            return 1
        if args.local_cmd == "down":
            lc.down()
            print("stopped")
            return 0
        if args.local_cmd == "status":
            print_local_status(lc.status(), args.json)
            if not args.json:
                print_services(lc.services())
            return 0
        if args.local_cmd == "stop":
            lc.member(args.name)
            lc.stop_member(args.name)
            print(f"stopped {args.name}")
            return 0
        if args.local_cmd == "start":
            lc.member(args.name)
            if lc.meta.get("dcs") == "etcd" and lc.runs_own_dcs:
                lc.start_etcd(detach=True)
            pid = lc.start_member(args.name, detach=True)
            print(f"started {args.name} (agent pid {pid})")
            return 0
    except LocalClusterError as exc:
        print(f"pgsidecar: {exc}", file=sys.stderr)
        return 1
    return 2


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lo = sub.add_parser("local", help="a local cluster on loopback (etcd + N members)")
    losub = lo.add_subparsers(dest="local_cmd", required=True)
    up = losub.add_parser("up", help="create (if needed) and start a local cluster")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--dir", default="./.local-cluster")
    up.add_argument(
        "--ttl",
        type=float,
        default=DEFAULT_TTL,
        help=f"leader lease TTL, seconds (default {DEFAULT_TTL:g})",
    )
    up.add_argument(
        "--base-port",
        type=int,
        default=None,
        help="first of the consecutive ports the cluster takes: 4+2N, more with --dcs-members "
        "and --kafka-brokers (default: a free range)",
    )
    up.add_argument("--dcs", choices=["etcd", "consul"], default="etcd")
    up.add_argument(
        "--dcs-members",
        type=int,
        choices=[1, 3, 5],
        default=1,
        help="etcd as a cluster of this many members; every agent gets every endpoint",
    )
    up.add_argument(
        "--kafka-brokers",
        type=int,
        default=1,
        help="Kafka as this many brokers (KRaft quorum); with 3+ the topic has replication "
        "factor 3 and min.insync.replicas 2",
    )
    up.add_argument(
        "--tls",
        action="store_true",
        help="a generated CA (DIR/tls) and TLS on every link: etcd, the REST API, PostgreSQL, Kafka",
    )
    up.add_argument("--cluster", default="local")
    up.add_argument(
        "--host",
        choices=["127.0.0.1", "::1"],
        default="127.0.0.1",
        help="the loopback address PostgreSQL and the agents' APIs listen on (::1: IPv6)",
    )
    up.add_argument("--timeout", type=float, default=180)
    up.add_argument(
        "--synchronous-mode",
        choices=["off", "on", "strict"],
        default="off",
        help="synchronous replication; returns once a synchronous standby is recorded",
    )
    up.add_argument(
        "--backup",
        action="store_true",
        help="archive WAL into a pgBackRest repository in DIR/backup (`pgsidecar backup`)",
    )
    up.add_argument(
        "--restore-from",
        metavar="DIR",
        help="point-in-time recovery: a new cluster restored from another local cluster's "
        f"repository (DIR/backup, or DIR) to a target ({TARGET_FLAGS}); it archives into its "
        "own",
    )
    up.add_argument(
        "--standby-of",
        metavar="DIR",
        help="a standby cluster of the local cluster in DIR: its first member copies DIR's "
        "cluster, its leader follows DIR's members and is never writable until "
        "`pgsidecar promote-cluster`",
    )
    # one target: argparse names both flags when two are given
    target = up.add_mutually_exclusive_group()
    target.add_argument(
        "--target-time",
        metavar="TS",
        help="with --restore-from: ISO 8601 with a time zone, e.g. 2026-12-03T05:00:00Z",
    )
    target.add_argument(
        "--target-lsn",
        metavar="LSN",
        help="with --restore-from: a WAL position, e.g. 0/3000060 (pg_current_wal_insert_lsn())",
    )
    target.add_argument(
        "--target-xid",
        metavar="XID",
        help="with --restore-from: a transaction id (txid_current()); its commit is kept",
    )
    target.add_argument(
        "--target-name",
        metavar="NAME",
        help="with --restore-from: a restore point made with pg_create_restore_point(NAME)",
    )
    up.add_argument(
        "--backup-schedule",
        action="append",
        default=[],
        metavar="TYPE=WHEN",
        help="scheduled backups (implies --backup), once per slot in the cluster: TYPE is "
        "full, diff or incr, WHEN a cron expression in UTC or an interval, e.g. "
        "--backup-schedule 'full=0 3 * * 0' --backup-schedule 'diff=0 3 * * 1-6'",
    )
    k = up.add_mutually_exclusive_group()
    k.add_argument(
        "--kafka",
        dest="kafka",
        action="store_true",
        default=None,
        help="start a Kafka broker (default when Java is available)",
    )
    k.add_argument("--no-kafka", dest="kafka", action="store_false", help="local journals only")
    for name, helptext in (("down", "stop everything"), ("status", "members and their DSNs")):
        sp = losub.add_parser(name, help=helptext)
        sp.add_argument("--dir", default="./.local-cluster")
        if name == "status":
            sp.add_argument("--json", action="store_true")
    for name, helptext in (
        ("stop", "SIGTERM one member's agent"),
        ("start", "start one member's agent"),
    ):
        sp = losub.add_parser(name, help=helptext)
        sp.add_argument("name")
        sp.add_argument("--dir", default="./.local-cluster")
    lo.set_defaults(func=cmd_local)
