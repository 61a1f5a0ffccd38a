"""`pgsidecar bench failover`: failover figures from a real local cluster, as JSON lines.

For each scenario, repeated N times on a fresh-enough cluster (the same cluster, healthy again
between runs), with a writer inserting sequential ids through a multi-host read-write DSN:

    sigterm     SIGTERM to the master's agent -> seconds until a write commits on the new master
    hard_kill   SIGKILL of the master's agent and postmaster together -> same
    switchover  `switchover` command -> same, plus the longest gap between acknowledged writes
    rejoin      the killed old master started again -> seconds until it streams from the new one

and for every scenario the acknowledged writes lost. Then the agents' resident memory and idle
CPU. The benchmark is the parent of every process it starts and reaps them promptly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from events.rotation import rotated_files
from pgsidecar.config import DEFAULT_TTL
from pgsidecar.lab.local import LocalCluster
from pgsidecar.lab.workload import MemberWriters, Writer


def _wait(pred: Any, timeout: float, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    return None


def _new_master(lc: LocalCluster, old: str) -> str | None:
    m = lc.master()
    return m if m and m != old else None


def _first_write_after(w: Writer, t0: float, timeout: float, not_port: int) -> float | None:
    t = _wait(lambda: w.first_write_after(t0, not_port), timeout, 0.01)
    return None if t is None else t - t0


def _max_gap(w: Writer, start: float, end: float) -> float:
    times = [t for t in w.ok_times if start - 1 <= t <= end + 1]
    return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


def _stream_time(lc: LocalCluster, name: str, t0: float, timeout: float) -> float | None:
    ok = _wait(lambda: (lc.api_status(name, timeout=0.5) or {}).get("streaming"), timeout, 0.05)
    return None if not ok else time.monotonic() - t0


def _handoff_steps(
    lc: LocalCluster, names: list[str | None], t0_wall: float, within: float
) -> list[list[Any]]:
    """The hand-off on one timeline, from the two members' journals: [seconds after the command,
    member, what] for every transition, action and effect outcome in the window."""
    steps: list[list[Any]] = []
    for name in names:
        if name is None:
            continue
        lines: list[str] = []
        for file in rotated_files(lc.member(name).dir / "journal.jsonl"):
            with contextlib.suppress(OSError):
                lines += file.read_text().splitlines()
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            at = rec.get("time", 0) - t0_wall
            if not -0.05 <= at <= within:
                continue
            body, kind = rec.get("body") or {}, rec.get("kind")
            if kind == "transition":
                what = f"{body.get('from')} -> {body.get('to')} ({body.get('trigger')})"
            elif kind == "action":
                what = f"{body.get('name')}: {body.get('outcome')} in {body.get('duration')} s"
            elif body.get("type") == "effect":
                data = body.get("data") or {}
                what = f"effect {data.get('name')} ok={data.get('ok')}"
            elif body.get("type") in ("dcs", "lease"):
                data = body.get("data") or {}
                leader = (data.get("leader") or {}).get("name") if body["type"] == "dcs" else None
                what = (
                    f"{body['type']} leader={leader}"
                    if body["type"] == "dcs"
                    else (f"lease held={data.get('held')}")
                )
            else:
                continue
            steps.append([round(at, 3), name, what])
    return sorted(steps)


def _proc_stat(pid: int) -> tuple[int, float]:
    with open(f"/proc/{pid}/status") as fh:
        rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    return rss, cpu


def run_failover_bench(
    repeat: int, ttl: float, nodes: int, idle_seconds: float, out: Any
) -> list[dict[str, Any]]:
    base = Path(tempfile.mkdtemp(prefix="pgsc-bench-", dir="/tmp"))
    os.chmod(base, 0o755)
    lc = LocalCluster(base / "c")
    results: dict[str, list[dict[str, Any]]] = {
        "sigterm": [],
        "hard_kill": [],
        "switchover": [],
        "rejoin": [],
    }
    profiles: list[dict[str, Any]] = []
    try:
        lc.create(nodes=nodes, ttl=ttl)
        lc.up(detach=False, timeout=180)
        for _ in range(repeat):
            # --- SIGTERM of the master's agent
            lc.wait_healthy(timeout=120)
            old = lc.master()
            assert old is not None
            w = Writer(lc).start()
            clients = MemberWriters(lc).start()
            time.sleep(1.0)
            pid = lc.agent_pid(old)
            assert pid is not None
            t0 = time.monotonic()
            os.kill(pid, signal.SIGTERM)
            dt = _first_write_after(w, t0, ttl * 3, lc.member(old).pg_port)
            lc.stop_member(old)
            time.sleep(0.5)
            w.stop()
            clients.stop()
            results["sigterm"].append(
                {
                    "seconds_to_first_write": dt,
                    "writes_unavailable_seconds": round(_max_gap(w, t0, t0 + (dt or 0)), 3),
                    "client_gap_seconds": round(
                        clients.longest_gap(t0 - 0.5, time.monotonic())[0], 3
                    ),
                    "acked_writes_lost": len(w.lost(lc)),
                }
            )
            lc.start_member(old)

            # --- hard kill of the master (agent + postmaster), then its rejoin
            lc.wait_healthy(timeout=120)
            old = lc.master()
            assert old is not None
            w = Writer(lc).start()
            time.sleep(1.0)
            t0 = time.monotonic()
            lc.kill_member(old, postgres=True)
            dt = _first_write_after(w, t0, ttl * 4, lc.member(old).pg_port)
            time.sleep(0.5)
            w.stop()
            lost = w.lost(lc)
            results["hard_kill"].append(
                {
                    "seconds_to_first_write": dt,
                    "acked_writes_lost": len(lost),
                    # asynchronous replication (the default) may lose the tail the old master
                    # acknowledged but had not yet sent: how far before the kill it reaches
                    "lost_acked_before_kill_seconds": round(
                        max((t0 - w.acked_at[i] for i in lost), default=0.0), 3
                    ),
                }
            )
            t1 = time.monotonic()
            lc.start_member(old)
            results["rejoin"].append({"seconds_to_streaming": _stream_time(lc, old, t1, 120)})

            # --- planned switchover
            lc.wait_healthy(timeout=120)
            old = lc.master()
            assert old is not None
            w = Writer(lc).start()
            clients = MemberWriters(lc).start()
            time.sleep(1.0)
            t0, t0_wall = time.monotonic(), time.time()
            lc.request_switchover(via=old)
            dt = _first_write_after(w, t0, ttl * 3, lc.member(old).pg_port)
            new = _wait(lambda old=old: _new_master(lc, old), ttl * 3)
            time.sleep(1.0)
            w.stop()
            clients.stop()
            gap, gap_from, gap_to = clients.longest_gap(t0 - 0.5, time.monotonic())
            results["switchover"].append(
                {
                    "seconds_to_first_write": dt,
                    "writes_unavailable_seconds": round(_max_gap(w, t0, t0 + (dt or 0)), 3),
                    "client_gap_seconds": round(gap, 3),
                    "acked_writes_lost": len(w.lost(lc)),
                }
            )
            profiles.append(
                {
                    "bench": "switchover_profile",
                    "client_gap": [round(gap_from - t0, 3), round(gap_to - t0, 3)],
                    "steps": _handoff_steps(lc, [old, new], t0_wall, gap_to - t0 + 0.5),
                }
            )

        lines = []
        for scenario, runs in results.items():
            line: dict[str, Any] = {
                "bench": "failover",
                "scenario": scenario,
                "ttl": ttl,
                "repeat": repeat,
            }
            keys = {k for r in runs for k in r}
            for k in sorted(keys):
                vals = [r[k] for r in runs if r.get(k) is not None]
                if k == "acked_writes_lost":
                    line[k] = sum(vals)
                else:
                    line[f"{k}_median"] = round(statistics.median(vals), 3) if vals else None
                    line[f"{k}_runs"] = [None if r.get(k) is None else round(r[k], 3) for r in runs]
            lines.append(line)

        lines.extend(profiles)

        # --- through HAProxy: SIGTERM of the master -> first write via the read-write port
        from pgsidecar.lab.haproxy import haproxy_binary, measure_haproxy_failover

        if haproxy_binary() is not None:
            haproxy_runs: list[float] = []
            for _ in range(repeat):
                lc.wait_healthy(timeout=120)
                old = lc.master()
                haproxy_runs.append(measure_haproxy_failover(lc))
                if old:
                    lc.stop_member(old)
                    lc.start_member(old)
            lines.append(
                {
                    "bench": "failover",
                    "scenario": "sigterm_through_haproxy",
                    "ttl": ttl,
                    "repeat": repeat,
                    "seconds_to_first_write_median": round(statistics.median(haproxy_runs), 3),
                    "seconds_to_first_write_runs": [round(r, 3) for r in haproxy_runs],
                }
            )

        # --- idle footprint of the agents
        lc.wait_healthy(timeout=120)
        before = {m.name: _proc_stat(p) for m in lc.members if (p := lc.agent_pid(m.name))}
        time.sleep(idle_seconds)
        after = {m.name: _proc_stat(p) for m in lc.members if (p := lc.agent_pid(m.name))}
        roles = {r["name"]: r["role"] for r in lc.status()}
        for name, (rss, cpu) in after.items():
            lines.append(
                {
                    "bench": "agent_idle",
                    "member": name,
                    "role": roles.get(name),
                    "rss_mb": round(rss / 1024, 1),
                    "cpu_percent_of_a_core": round(100 * (cpu - before[name][1]) / idle_seconds, 2),
                    "seconds": idle_seconds,
                }
            )
        for line in lines:
            print(json.dumps(line), file=out, flush=True)
    except BaseException:
        # keep the cluster's journals and logs to read why (the processes are stopped)
        print(f"bench failed; the cluster's files are kept in {base}", file=sys.stderr)
        lc.down()
        raise
    # a return inside the try would skip this: a finished bench left its cluster running
    lc.down()
    shutil.rmtree(base, ignore_errors=True)
    return lines


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "failover":
        run_failover_bench(args.repeat, args.ttl, args.nodes, args.idle_seconds, sys.stdout)
        return 0
    if args.what == "dcs-cost":
        from pgsidecar.lab.dcscost import cmd_dcs_cost

        return cmd_dcs_cost(args)
    if args.what == "scale":
        from pgsidecar.lab.scale import cmd_scale

        return cmd_scale(args)
    return 2


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    b = sub.add_parser("bench", help="benchmarks that print JSON lines")
    b.add_argument("what", choices=["failover", "dcs-cost", "scale"])
    b.add_argument("--repeat", type=int, default=3)
    b.add_argument(
        "--ttl", type=float, default=DEFAULT_TTL, help=f"leader lease TTL (default {DEFAULT_TTL:g})"
    )
    b.add_argument("--nodes", type=int, default=3)
    b.add_argument("--idle-seconds", type=float, default=20.0)
    dc = b.add_argument_group("dcs-cost (what an idle member costs etcd, and a switchover)")
    dc.add_argument("--seconds", type=float, default=60.0, help="the idle window (default 60)")
    dc.add_argument(
        "--switchover-window",
        type=float,
        default=30.0,
        help="seconds counted from the switchover command (default 30)",
    )
    dc.add_argument(
        "--patroni",
        action="store_true",
        help="also Patroni 4.1 (the bench extra) at its defaults and at --ttl (at least 20)",
    )
    dc.add_argument("--patroni-bin", default=None, help="the patroni executable (default: on PATH)")
    sc = b.add_argument_group(
        "scale (N clusters of real agents with simulated PostgreSQL on one etcd; --seconds is "
        "the idle window)"
    )
    sc.add_argument("--clusters", default="1,5,10,20", help="numbers of clusters, comma separated")
    sc.add_argument("--members", type=int, default=3, help="members per cluster (default 3)")
    sc.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes running the agents (default: one per core)",
    )
    sc.add_argument("--json", action="store_true", help="the report as one JSON document")
    b.set_defaults(func=cmd_bench)
