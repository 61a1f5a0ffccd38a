"""``pgsidecar history`` and ``pgsidecar replay``: the recorded transitions and inputs, read from
a journal file, the cluster's Kafka topic, or every member's journal of a local cluster."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pgsidecar.cli.common import add_target, config_from_args
from pgsidecar.config import ConfigError

if TYPE_CHECKING:
    from events.kafka import Skipped
    from fsm.records import Record


def load_records(args: argparse.Namespace) -> tuple[list[Record], list[Skipped], str]:
    """Records from --journal FILE, else the cluster's Kafka topic (--config / --dir of a cluster
    with Kafka), else every member's journal of a local cluster (--dir without Kafka)."""
    from events.kafka import journal_skipped
    from events.sinks import read_journal

    if args.journal:
        recs, skipped = read_journal(Path(args.journal))
        return recs, journal_skipped(skipped), f"journal {args.journal}"
    cfg = config_from_args(args)
    if cfg.kafka.bootstrap_servers:
        from events.kafka import client_security, default_topic, read_topic, record_keys

        topic = cfg.kafka.topic or default_topic(cfg.cluster)
        keys = record_keys(cfg.kafka)
        if keys is None:
            print(
                f"pgsidecar: the records of topic {topic} are not verified (no "
                "kafka.record_key_file): anyone who can write to the topic can forge them",
                file=sys.stderr,
            )
        recs, skipped_in_topic = asyncio.run(
            read_topic(
                cfg.kafka.bootstrap_servers,
                topic,
                timeout=args.timeout,
                security=client_security(cfg.kafka),
                keys=keys,
            )
        )
        return recs, skipped_in_topic, f"topic {topic}"
    if args.dir:
        from pgsidecar.lab.local import LocalCluster

        lc = LocalCluster(Path(args.dir))
        all_recs: list[Record] = []
        all_skipped: list[Skipped] = []
        for m in lc.members:
            path = m.dir / "journal.jsonl"
            if path.exists():
                r, s = read_journal(path)
                all_recs += r
                all_skipped += journal_skipped(s)
        return all_recs, all_skipped, f"journals under {args.dir}"
    raise ConfigError(
        "this agent has no Kafka configured: give --journal FILE (its state_dir/journal.jsonl)"
    )


def cmd_history(args: argparse.Namespace) -> int:
    from pgsidecar.history import format_history, parse_since

    recs, skipped, source = load_records(args)
    since = parse_since(args.since, time.time()) if args.since else None
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

    recs, skipped, source = load_records(args)
    for sk in skipped:
        # unauthenticated (unsigned or forged) and malformed records are never replayed
        print(f"pgsidecar: not replayed: {sk}", file=sys.stderr)
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


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, helptext in (
        ("history", "each node's timeline of roles, from Kafka or journals"),
        ("replay", "replay recorded inputs into a fresh machine and compare its transitions"),
    ):
        sp = sub.add_parser(name, help=helptext)
        add_target(sp)
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
