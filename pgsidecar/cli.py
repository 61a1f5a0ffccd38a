"""The `pgsidecar` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import structlog

from pgsidecar.config import AgentConfig, ConfigError, load_config

EXIT_CONFIG = 2


def setup_logging(level: str = "info") -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=lvl, stream=sys.stderr, format="%(message)s")
    # the transitions library logs every callback at INFO: our own transition records say more
    logging.getLogger("transitions").setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def _config_from_args(args: argparse.Namespace) -> AgentConfig:
    if getattr(args, "config", None):
        return load_config(args.config)
    if getattr(args, "dir", None):
        from pgsidecar.lab.local import LocalCluster

        lc = LocalCluster(Path(args.dir))
        if not lc.members:
            raise ConfigError(
                f"{args.dir} holds no local cluster (no cluster.json); run `pgsidecar local up` first"
            )
        return load_config(lc.config_path(lc.members[0].name))
    raise ConfigError("give --config FILE (an agent's config) or --dir DIR (a local cluster)")


# -- run ----------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"pgsidecar: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(cfg.log_level)
    from pgsidecar.agent import build_agent

    agent = build_agent(cfg)
    return asyncio.run(agent.run())


# -- list / switchover -----------------------------------------------------------------------------


async def _read_view(cfg: AgentConfig) -> Any:
    from events.dcs.factory import create_dcs

    dcs = create_dcs(cfg.dcs, cfg.cluster)
    try:
        await dcs.connect()
        return await dcs.read_cluster()
    finally:
        await dcs.close()


def _fmt_lsn(lsn: int | None) -> str:
    from fsm.records import format_lsn

    return "-" if lsn is None else format_lsn(lsn)


def cmd_list(args: argparse.Namespace) -> int:
    # patronictl-like table, --json and --watch live with the other operator commands
    from pgsidecar.cli_ops import cmd_list as list_members

    return list_members(args)


def _parse_at(text: str) -> float:
    """An ISO 8601 time (UTC if no offset), or +SECONDS from now."""
    import datetime as dt
    import time as _time

    if text.startswith("+"):
        try:
            return _time.time() + float(text[1:])
        except ValueError:
            raise ConfigError(f"--at {text!r}: expected +SECONDS or an ISO 8601 time") from None
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"--at {text!r}: expected an ISO 8601 time such as 2026-11-25T22:00:00Z"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


def cmd_switchover(args: argparse.Namespace) -> int:
    from events.dcs.factory import create_dcs
    from pgsidecar.ops import (
        SwitchoverError,
        cancel_switchover,
        request_switchover,
        wait_for_leader,
    )

    cfg = _config_from_args(args)

    async def go() -> int:
        dcs = create_dcs(cfg.dcs, cfg.cluster)
        await dcs.connect()
        try:
            try:
                if args.cancel:
                    sw = await cancel_switchover(dcs)
                    print(
                        f"switchover cancelled: {sw.get('from')} -> {sw.get('to') or 'best replica'}"
                    )
                    return 0
                at = _parse_at(args.at) if args.at else None
                cmd = await request_switchover(dcs, args.to, at)
            except SwitchoverError as exc:
                print(f"pgsidecar: switchover refused: {exc}", file=sys.stderr)
                return 1
            when = f" at {args.at}" if args.at else ""
            print(f"switchover requested: {cmd['from']} -> {cmd['to'] or 'best replica'}{when}")
            if args.wait <= 0 or args.at:
                return 0
            view = await wait_for_leader(dcs, cmd["from"], args.wait)
            if view is None or view.leader is None:
                print(f"pgsidecar: no new master within {args.wait:g} s", file=sys.stderr)
                return 1
            print(f"new master: {view.leader.name} (term {view.leader.term})")
            return 0
        finally:
            await dcs.close()

    return asyncio.run(go())


# -- history / replay ------------------------------------------------------------------------------


def _want_kafka(args: argparse.Namespace) -> bool:
    if args.kafka is not None:
        if args.kafka:
            from pgsidecar.lab.kafka_broker import java_available

            if not java_available():
                raise ConfigError("--kafka needs Java (apt-get install openjdk-17-jre-headless)")
        return bool(args.kafka)
    from pgsidecar.lab.kafka_broker import java_available

    return java_available()


def _load_records(args: argparse.Namespace) -> tuple[list[Any], list[Any], str]:
    """Records from --journal FILE, else the cluster's Kafka topic (--config / --dir of a cluster
    with Kafka), else every member's journal of a local cluster (--dir without Kafka)."""
    from events.sinks import read_journal

    if args.journal:
        from events.kafka import journal_skipped

        recs, skipped = read_journal(Path(args.journal))
        return recs, journal_skipped(skipped), f"journal {args.journal}"
    cfg = _config_from_args(args)
    if cfg.kafka.bootstrap_servers:
        from events.kafka import default_topic, read_topic

        topic = cfg.kafka.topic or default_topic(cfg.cluster)
        recs, skipped = asyncio.run(
            read_topic(cfg.kafka.bootstrap_servers, topic, timeout=args.timeout)
        )
        return recs, skipped, f"topic {topic}"
    if args.dir:
        from events.kafka import journal_skipped
        from pgsidecar.lab.local import LocalCluster

        lc = LocalCluster(Path(args.dir))
        recs: list[Any] = []
        skipped: list[Any] = []
        for m in lc.members:
            path = m.dir / "journal.jsonl"
            if path.exists():
                r, s = read_journal(path)
                recs += r
                skipped += journal_skipped(s)
        return recs, skipped, f"journals under {args.dir}"
    raise ConfigError(
        "this agent has no Kafka configured: give --journal FILE (its state_dir/journal.jsonl)"
    )


def cmd_history(args: argparse.Namespace) -> int:
    import time as _time

    from pgsidecar.history import format_history, parse_since

    recs, skipped, source = _load_records(args)
    since = parse_since(args.since, _time.time()) if args.since else None
    for sk in skipped:
        print(f"pgsidecar: skipped a record: {sk}", file=sys.stderr)
    print(
        format_history(
            recs,
            node=args.node,
            since=since,
            as_json=args.json,
            skipped=skipped if not args.json else (),
        )
    )
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from pgsidecar.replay import replay

    recs, skipped, source = _load_records(args)
    nodes = [args.node] if args.node else sorted({r.node for r in recs})
    if not nodes:
        print(f"pgsidecar: no records in {source}", file=sys.stderr)
        return 1
    bad = 0
    for node in nodes:
        res = replay(recs, node, args.from_seq, args.to_seq)
        if res.inputs == 0:
            print(f"{node}: no input records in {source}", file=sys.stderr)
            bad += 1
            continue
        status = "ok" if res.ok else f"{len(res.divergences)} divergence(s)"
        print(
            f"{node}: {res.inputs} inputs replayed, {res.transitions_recorded} transitions recorded, "
            f"{res.transitions_replayed} reproduced: {status}"
        )
        for d in res.divergences:
            bad += 1
            print(f"  divergence {d.describe()}")
            for inp in d.inputs:
                print(
                    f"    input seq {inp.get('seq')}: {json.dumps({k: v for k, v in inp.items() if k != 'seq'})[:300]}"
                )
    return 1 if bad else 0


# -- local ----------------------------------------------------------------------------------------


def _print_local_status(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"{'Member':<8} {'Role':<10} {'PG port':>7} {'Running':<8} {'Streaming':<9} {'TL':>3}  DSN"
    )
    for r in rows:
        print(
            f"{r['name']:<8} {r['role']:<10} {r['port']:>7} {'yes' if r['pg_running'] else 'no':<8} "
            f"{'yes' if r['streaming'] else '-':<9} {r['timeline'] or '-':>3}  {r['dsn']}"
        )


def yaml_mode(lc: Any) -> str:
    import yaml

    cfg = yaml.safe_load(lc.config_path(lc.members[0].name).read_text())
    return str((cfg.get("settings") or {}).get("synchronous_mode", "off"))


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
                    kafka=_want_kafka(args),
                )
            rows = lc.up(detach=True, timeout=args.timeout)
            cfg_mode = yaml_mode(lc)
            if cfg_mode != "off":
                sync = lc.wait_sync(timeout=args.timeout)
                print(
                    f"synchronous mode {cfg_mode}: synchronous standby {', '.join(sync)} recorded in the DCS"
                )
            _print_local_status(rows, False)
            master = next(r for r in rows if r["role"] == "master")
            print(f'\nmaster: {master["name"]}\n  psql "{master["dsn"]}"')
            return 0
        if not lc.meta:
            print(f"pgsidecar: {args.dir} holds no local cluster", file=sys.stderr)
            return 1
        if args.local_cmd == "down":
            lc.down()
            print("stopped")
            return 0
        if args.local_cmd == "status":
            _print_local_status(lc.status(), args.json)
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


# commands whose parsers live in the lab (pgsidecar/lab/): their modules are imported only when
# the command line names one of them, or asks for the list of commands
LAB_PARSERS = {"bench": "pgsidecar.lab.bench", "chaos": "pgsidecar.lab.faults"}


def _command(argv: list[str] | None) -> str | None:
    args = sys.argv[1:] if argv is None else argv
    return next((a for a in args if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The CLI's parser. ``argv`` (default sys.argv[1:]) decides whether the lab's commands are
    added: `pgsidecar run` in a container never imports the lab (tests/test_layers.py)."""
    p = argparse.ArgumentParser(prog="pgsidecar", description="PostgreSQL high-availability agent")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run the agent beside one PostgreSQL instance")
    r.add_argument("--config", required=True, help="agent YAML config")
    r.set_defaults(func=cmd_run)

    def target(sp: argparse.ArgumentParser) -> None:
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--config", help="an agent's config file (names the DCS and the cluster)")
        g.add_argument("--dir", help="a local cluster's directory")

    ls = sub.add_parser("list", help="members of the cluster, as the DCS sees them")
    target(ls)
    ls.add_argument("--json", action="store_true")
    ls.add_argument(
        "--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C"
    )
    ls.set_defaults(func=cmd_list)

    sw = sub.add_parser(
        "switchover", help="planned switchover: the target catches up, then promotes"
    )
    target(sw)
    sw.add_argument("--to", help="target member (default: the most advanced replica)")
    sw.add_argument(
        "--wait", type=float, default=30.0, help="seconds to wait for the new master (0: do not)"
    )
    sw.add_argument(
        "--at", help="scheduled: ISO 8601 time (UTC unless an offset is given) or +SECONDS"
    )
    sw.add_argument("--cancel", action="store_true", help="cancel a pending (scheduled) switchover")
    sw.set_defaults(func=cmd_switchover)

    for name, helptext in (
        ("history", "each node's timeline of roles, from Kafka or journals"),
        ("replay", "replay recorded inputs into a fresh machine and compare its transitions"),
    ):
        sp = sub.add_parser(name, help=helptext)
        target(sp)
        sp.add_argument("--journal", help="read this journal file instead of Kafka")
        sp.add_argument("--node", help="only this node")
        sp.add_argument("--timeout", type=float, default=30.0, help="seconds to read the topic")
        if name == "history":
            sp.add_argument(
                "--since", help="only records after TIME (10m, 2h, epoch seconds, ISO time)"
            )
            sp.add_argument("--json", action="store_true")
            sp.set_defaults(func=cmd_history)
        else:
            sp.add_argument("--from", dest="from_seq", type=int, default=None)
            sp.add_argument("--to", dest="to_seq", type=int, default=None)
            sp.set_defaults(func=cmd_replay)

    lo = sub.add_parser("local", help="a local cluster on loopback (etcd + N members)")
    losub = lo.add_subparsers(dest="local_cmd", required=True)
    up = losub.add_parser("up", help="create (if needed) and start a local cluster")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--dir", default="./.local-cluster")
    up.add_argument("--ttl", type=float, default=10.0, help="leader lease TTL, seconds")
    up.add_argument(
        "--base-port",
        type=int,
        default=None,
        help="first of 2+2N consecutive ports (default: free range)",
    )
    up.add_argument("--dcs", choices=["etcd", "consul"], default="etcd")
    up.add_argument("--cluster", default="local")
    up.add_argument("--timeout", type=float, default=180)
    up.add_argument(
        "--synchronous-mode",
        choices=["off", "on", "strict"],
        default="off",
        help="synchronous replication; returns once a synchronous standby is recorded",
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

    from pgsidecar import cli_ops

    cli_ops.add_parsers(sub)
    command = _command(argv)
    if command is None or command in LAB_PARSERS:
        import importlib

        for module in LAB_PARSERS.values():
            importlib.import_module(module).add_parser(sub)
    from pgsidecar import cli_members

    cli_members.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"pgsidecar: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
