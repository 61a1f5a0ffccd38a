"""`pgsidecar bench scale`: many clusters of real agents on one etcd, and what that costs.

A platform runs many clusters against one etcd. For each N of ``--clusters`` the benchmark
starts a fresh etcd (dcscost's ``start_etcd``) and N clusters (``scale-001`` ...: distinct
names, so distinct key prefixes) of ``--members`` real agents each: the agent's loop, sources
and effects, the real etcd adapter, each beside a simulated PostgreSQL (the simulator's model,
``pgsidecar.lab.sim.postgres``, one world per cluster) and the simulator's fence hook, built by
the simulator's ``agent_factory``. No Kafka (each journal is kept in memory), no REST API, no
Kubernetes. The agents run in a few worker processes (by default one per core), each running
its share of the clusters on one ordinary asyncio loop: the model's clock is that loop's time
(``PgWorld.now`` is ``loop.time()``), which on an ordinary loop is the system's monotonic clock,
the agents' own (``SystemClock``), so everything runs in real time.

Per N, once every cluster has one master and its other members stream from it:

    idle        over ``--seconds`` with nothing happening: etcd's gRPC calls and bytes per second
                (its ``/metrics``, read as ``bench dcs-cost`` reads them), in total and per
                member; the workers' CPU (the agents and their simulated PostgreSQL) and etcd's
    fan-out     a probe key written under each cluster's prefix, ``PROBES`` times: the time from
                the Put to each of that cluster's agents' watch yielding it (the adapter's
                ``watch()`` notes when each view arrives), all clusters probing at once
    failover    the first cluster's master killed (its agent's tasks cancelled, its simulated
                PostgreSQL crashed, its etcd connections dropped, its lease left to expire):
                seconds until another member is promoted holding the leader key

then each figure's least-squares slope against N. The checks: every cluster elected exactly one
master, kept it through the idle window, and failed over; the simulator's safety checker saw
no two writable members and every agent's record replays to its transitions.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import json
import multiprocessing
import multiprocessing.resource_tracker
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from events.dcs import ClusterView
from events.dcs.etcd import EtcdDCS
from events.settings import EtcdSettings
from pgsidecar.agent.ports import SystemClock
from pgsidecar.lab.dcscost import (
    EtcdCounters,
    idle_cost,
    parse_etcd_metrics,
    start_etcd,
    stop_child,
)
from pgsidecar.procutil import free_port_range

# healthy, then this long before the idle window: the members' first publications settle
SETTLE_SECONDS = 5.0
PROBES = 5
PROBE_INTERVAL = 0.5  # seconds between two probes of one cluster
PROBE_TIMEOUT = 5.0  # a watcher that has not seen a probe by then missed it
STOP_GRACE = 5.0  # agents asked to stop, then killed
PROBE_KEY = "scale-probe"

# the figures whose slope against N the report gives
SLOPE_FIGURES = (
    "calls_per_second",
    "calls_per_second_per_member",
    "sent_bytes_per_second",
    "sent_bytes_per_second_per_member",
    "received_bytes_per_second",
    "received_bytes_per_second_per_member",
    "agents_cpu_percent",
    "agents_cpu_percent_per_member",
    "etcd_cpu_percent",
    "fanout_p50_ms",
    "fanout_p95_ms",
    "fanout_max_ms",
    "failover_seconds",
)


# -- the report's arithmetic (pure) ----------------------------------------------------------------


def idle_figures(
    before: EtcdCounters,
    after: EtcdCounters,
    seconds: float,
    members: int,
    agents_cpu_seconds: float,
    etcd_cpu_seconds: float,
) -> dict[str, Any]:
    """etcd's load over the idle window, in total and per member, and the CPU it took (percent
    of one core) of the agents' processes and of etcd."""
    total = idle_cost(before, after, seconds, 1)  # "per member" of one member: the totals
    per = idle_cost(before, after, seconds, members)
    return {
        "seconds": total["seconds"],
        "calls_per_second": total["calls_per_second_per_member"],
        "calls_per_second_per_member": per["calls_per_second_per_member"],
        "sent_bytes_per_second": total["sent_bytes_per_second_per_member"],
        "sent_bytes_per_second_per_member": per["sent_bytes_per_second_per_member"],
        "received_bytes_per_second": total["received_bytes_per_second_per_member"],
        "received_bytes_per_second_per_member": per["received_bytes_per_second_per_member"],
        "calls_per_second_by_method": total["calls_per_second_per_member_by_method"],
        "agents_cpu_percent": round(100 * agents_cpu_seconds / seconds, 2),
        "agents_cpu_percent_per_member": round(100 * agents_cpu_seconds / seconds / members, 3),
        "etcd_cpu_percent": round(100 * etcd_cpu_seconds / seconds, 2),
    }


def latency_summary(latencies: Sequence[float | None]) -> dict[str, Any]:
    """Fan-out latencies in milliseconds; None is a watcher that missed its probe."""
    seen = sorted(x for x in latencies if x is not None)
    out: dict[str, Any] = {"watchers": len(latencies), "missed": len(latencies) - len(seen)}
    if not seen:
        return {**out, "p50_ms": None, "p95_ms": None, "max_ms": None}
    p95 = statistics.quantiles(seen, n=20, method="inclusive")[-1] if len(seen) > 1 else seen[0]
    return {
        **out,
        "p50_ms": round(1000 * statistics.median(seen), 2),
        "p95_ms": round(1000 * p95, 2),
        "max_ms": round(1000 * seen[-1], 2),
    }


def cluster_healthy(status: dict[str, Any]) -> bool:
    """One member accepts writes and holds the leader key; every other live member streams."""
    writable = status["writable"]
    if len(writable) != 1 or status["leader"] != writable[0]:
        return False
    return set(status["streaming"]) == set(status["alive"]) - {writable[0]}


def one_master_each(statuses: Sequence[dict[str, Any]]) -> bool:
    return bool(statuses) and all(
        len(s["writable"]) == 1 and s["leader"] == s["writable"][0] for s in statuses
    )


def figures(run: dict[str, Any]) -> dict[str, float | None]:
    """The run's figures, flat, by the names in SLOPE_FIGURES."""
    idle, fanout = run["idle"], run["fanout"]
    flat: dict[str, float | None] = {k: idle.get(k) for k in SLOPE_FIGURES if k in idle}
    for k in ("p50_ms", "p95_ms", "max_ms"):
        flat[f"fanout_{k}"] = fanout.get(k)
    flat["failover_seconds"] = run["failover"].get("seconds_to_promoted")
    return flat


def slopes(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float] | None]:
    """Each figure's least-squares line against the number of clusters: ``per_cluster`` (the
    slope) and ``at_zero`` (the intercept); None with fewer than two distinct N."""
    out: dict[str, dict[str, float] | None] = {}
    for name in SLOPE_FIGURES:
        points = [(r["clusters"], figures(r).get(name)) for r in runs]
        xs = [float(n) for n, v in points if v is not None]
        ys = [float(v) for _n, v in points if v is not None]
        if len(set(xs)) < 2:
            out[name] = None
            continue
        line = statistics.linear_regression(xs, ys)
        out[name] = {"per_cluster": round(line.slope, 4), "at_zero": round(line.intercept, 4)}
    return out


# -- in a worker process ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """One worker's share (picklable: sent to the process)."""

    etcd_url: str
    clusters: tuple[str, ...]
    members: int
    ttl: float
    seed: int


class WatchTimedEtcdDCS(EtcdDCS):
    """The real etcd adapter, unchanged for the agent, noting when each view its watch yields
    arrived (for the fan-out latency). ``severed``: the agent was killed; a dead process revokes
    no lease, so its teardown's ``close_session`` does nothing."""

    def __init__(self, settings: EtcdSettings, cluster: str) -> None:
        super().__init__(settings, cluster)
        self.arrivals: collections.deque[tuple[int, float]] = collections.deque(maxlen=256)
        self._arrived = asyncio.Event()
        self.severed = False

    async def watch(self) -> AsyncIterator[ClusterView]:
        views = super().watch()
        try:
            async for view in views:
                self.arrivals.append((view.index, time.monotonic()))
                self._arrived.set()
                yield view
        finally:
            aclose = getattr(views, "aclose", None)  # the adapter's watch is a generator
            if aclose is not None:
                await aclose()

    async def close_session(self) -> None:
        if not self.severed:
            await super().close_session()

    async def seen_at(self, revision: int, within: float) -> float | None:
        """When a view at ``revision`` or later arrived (monotonic), or None after ``within`` seconds."""
        deadline = time.monotonic() + within
        while True:
            self._arrived.clear()
            for index, at in self.arrivals:
                if index >= revision:
                    return at
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)


class ScaleCluster:
    """One cluster in a worker: its simulated PostgreSQL world, the safety checker, and its
    agents, each an incarnation (as in the simulator) so that a kill reaches all its tasks."""

    def __init__(self, name: str, spec: WorkerSpec, rng: random.Random) -> None:
        from pgsidecar.lab.sim.cluster import ClusterSettings
        from pgsidecar.lab.sim.invariants import Checker
        from pgsidecar.lab.sim.postgres import PgTimings, PgWorld, SimClient

        self.name = name
        self.spec = spec
        self.settings = EtcdSettings(endpoints=[spec.etcd_url])
        self.names = tuple(f"m{i + 1}" for i in range(spec.members))
        self.world = PgWorld(rng, timings=PgTimings(slow=0.0))
        self.checker = Checker(self.world, SimClient(self.world))
        self.pgs = {n: self.world.member(n) for n in self.names}
        self.cluster_settings = ClusterSettings(
            cluster=name,
            members=self.names,
            ttl=spec.ttl,
            loop_wait=1.0,
            synchronous_mode="off",
            maximum_lag_on_failover=1024 * 1024,
            clock_drift=0.01,
        )
        self.observer = EtcdDCS(self.settings, name)  # status reads, never a lease
        self.agents: dict[str, tuple[Any, Any, WatchTimedEtcdDCS, Any, asyncio.Task[Any]]] = {}
        self.errors: list[str] = []
        self._closing: list[asyncio.Task[None]] = []

    def start(self) -> None:
        from pgsidecar.lab.sim.agent import agent_factory
        from pgsidecar.lab.sim.cluster import Incarnation, MemberPorts, SimFence, start_incarnation

        loop = asyncio.get_running_loop()
        for number, member in enumerate(self.names, 1):
            incarnation = Incarnation(member, number)
            dcs = WatchTimedEtcdDCS(self.settings, self.name)
            fence = SimFence(member, self.pgs[member], self.checker, incarnation)
            ports = MemberPorts(
                member,
                dcs,
                self.pgs[member],
                SystemClock(),
                fence,
                self.cluster_settings,
                lambda invariant, message: self.checker.violation(invariant, message),
            )
            agent = agent_factory(member, ports)
            task = start_incarnation(loop, self._run(member, agent), incarnation)
            self.agents[member] = (incarnation, agent, dcs, fence, task)

    async def _run(self, member: str, agent: Any) -> None:
        try:
            await agent.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an agent that dies of its own error is a finding
            self.errors.append(f"{self.name}/{member} died: {type(exc).__name__}: {exc}")

    def alive(self) -> list[str]:
        return [m for m, (inc, *_rest) in self.agents.items() if not inc.killed]

    async def status(self) -> dict[str, Any]:
        view = await self.observer.read_cluster()
        alive = self.alive()
        streaming = [m for m in alive if (await self.pgs[m].probe()).receiver_streaming]
        return {
            "cluster": self.name,
            "leader": view.leader.name if view.leader is not None else None,
            "term": view.leader.term if view.leader is not None else None,
            "writable": self.world.writable_members(),
            "streaming": streaming,
            "alive": alive,
            "member_keys": sorted(view.members),
        }

    def kill(self, member: str) -> None:
        """As SIGKILL of the agent and its postmaster together: every task of the agent is
        cancelled, the postmaster dies, the connections to etcd drop, the lease stays."""
        incarnation, _agent, dcs, fence, _task = self.agents[member]
        dcs.severed = True
        incarnation.kill()
        fence.stop()
        self.pgs[member].crash()
        self._closing.append(asyncio.ensure_future(dcs.close()))

    async def probe(self, http: aiohttp.ClientSession, count: int) -> list[float | None]:
        """Write the probe key ``count`` times; for each, every live agent's fan-out latency."""
        key = base64.b64encode(self.observer.key(PROBE_KEY).encode()).decode()
        latencies: list[float | None] = []
        for i in range(count):
            value = base64.b64encode(str(i).encode()).decode()
            sent = time.monotonic()
            async with http.post(
                f"{self.spec.etcd_url}/v3/kv/put", json={"key": key, "value": value}
            ) as resp:
                reply = await resp.json(content_type=None)
            revision = int(reply["header"]["revision"])
            watchers = [self.agents[m][2] for m in self.alive()]
            seen = await asyncio.gather(*(w.seen_at(revision, PROBE_TIMEOUT) for w in watchers))
            latencies += [None if at is None else at - sent for at in seen]
            await asyncio.sleep(PROBE_INTERVAL)
        return latencies

    async def failover(self, within: float) -> dict[str, Any]:
        """Kill the master; seconds until another member is promoted, holding the leader key."""
        writable = self.world.writable_members()
        if len(writable) != 1:
            return {"cluster": self.name, "problem": f"no single master to kill: {writable}"}
        old = writable[0]
        before = await self.observer.read_cluster()
        started = time.monotonic()
        self.kill(old)
        promoted: float | None = None
        new: str | None = None
        while time.monotonic() - started < within:
            now = self.world.writable_members()
            if len(now) == 1 and now[0] != old:
                promoted, new = time.monotonic() - started, now[0]
                break
            await asyncio.sleep(0.01)
        after = await self.observer.read_cluster()
        leader = after.leader.name if after.leader is not None else None
        return {
            "cluster": self.name,
            "old_master": old,
            "new_master": new,
            "leader_after": leader,
            "term_before": before.leader.term if before.leader is not None else None,
            "term_after": after.leader.term if after.leader is not None else None,
            # promoted and holding the key (it took the key before promoting)
            "seconds_to_promoted": (
                round(promoted, 3) if promoted is not None and leader == new else None
            ),
        }

    async def stop(self) -> list[str]:
        """Ask every live agent to stop, kill what is left after the grace; the findings."""
        live = [self.agents[m] for m in self.alive()]
        for _inc, agent, _dcs, _fence, _task in live:
            agent.request_stop()
        tasks = [task for *_rest, task in live]
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_GRACE)
        for incarnation, _agent, dcs, fence, _task in self.agents.values():
            if not incarnation.killed:
                incarnation.kill()
            fence.stop()
            self._closing.append(asyncio.ensure_future(dcs.close()))
        await asyncio.gather(*self._closing, return_exceptions=True)
        await asyncio.sleep(0)
        await self.observer.close()
        self.checker.close()
        return [f"{self.name}: {v.invariant}: {v.message}" for v in self.checker.violations] + (
            self.errors
        )


def _usage() -> dict[str, float]:
    return {
        "cpu_seconds": time.process_time(),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


async def _serve(conn: Connection, spec: WorkerSpec) -> None:
    from pgsidecar.lab.sim.agent import quiet_logs
    from pgsidecar.lab.sim.cluster import use_incarnation_tasks

    quiet_logs()
    use_incarnation_tasks(asyncio.get_running_loop())
    rng = random.Random(spec.seed)
    clusters = {
        name: ScaleCluster(name, spec, random.Random(rng.random())) for name in spec.clusters
    }
    for cluster in clusters.values():
        cluster.start()
    conn.send({"started": len(clusters)})
    async with aiohttp.ClientSession() as http:
        while True:
            command, *args = await asyncio.to_thread(conn.recv)
            try:
                reply: Any
                if command == "status":
                    reply = [await c.status() for c in clusters.values()]
                elif command == "usage":
                    reply = _usage()
                elif command == "probe":
                    found = await asyncio.gather(
                        *(c.probe(http, args[0]) for c in clusters.values())
                    )
                    reply = [x for latencies in found for x in latencies]
                elif command == "failover":
                    reply = await clusters[args[0]].failover(args[1])
                elif command == "stop":
                    findings = await asyncio.gather(*(c.stop() for c in clusters.values()))
                    conn.send({"findings": [f for fs in findings for f in fs], **_usage()})
                    return
                else:
                    reply = {"error": f"unknown command {command!r}"}
            except Exception:
                reply = {"error": traceback.format_exc()}
            conn.send(reply)


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """A worker process: its share of the clusters on one asyncio loop, answering commands."""
    asyncio.run(_serve(conn, spec))


# -- in the parent ---------------------------------------------------------------------------------


class WorkerError(RuntimeError):
    pass


class Workers:
    """The worker processes (children of ours, reaped at ``stop``) and their command pipes."""

    def __init__(self, specs: Sequence[WorkerSpec]) -> None:
        self.specs = list(specs)
        self.procs: list[Any] = []
        self.conns: list[Connection] = []

    def start(self, timeout: float = 60.0) -> None:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no loop, no threads
        for spec in self.specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child, spec), daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        for i in range(len(self.conns)):
            self._recv(i, timeout)

    def _recv(self, i: int, timeout: float) -> Any:
        conn = self.conns[i]
        if not conn.poll(timeout):
            raise WorkerError(f"worker {i} did not answer within {timeout:.0f} s")
        try:
            reply = conn.recv()
        except EOFError:
            raise WorkerError(f"worker {i} exited (code {self.procs[i].exitcode})") from None
        if isinstance(reply, dict) and "error" in reply:
            raise WorkerError(f"worker {i}: {reply['error']}")
        return reply

    def ask(self, command: tuple[Any, ...], timeout: float = 60.0) -> list[Any]:
        for conn in self.conns:
            conn.send(command)
        return [self._recv(i, timeout) for i in range(len(self.conns))]

    def ask_one(self, i: int, command: tuple[Any, ...], timeout: float = 60.0) -> Any:
        self.conns[i].send(command)
        return self._recv(i, timeout)

    def statuses(self) -> list[dict[str, Any]]:
        return [s for reply in self.ask(("status",)) for s in reply]

    def stop(self) -> list[Any]:
        replies = []
        for i, conn in enumerate(self.conns):
            with contextlib.suppress(OSError, WorkerError):
                if self.procs[i].is_alive():
                    conn.send(("stop",))
                    replies.append(self._recv(i, STOP_GRACE + 30))
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
        for conn in self.conns:
            conn.close()
        # the spawn context started multiprocessing's resource tracker, a child of ours that
        # otherwise exits only once we have: stop and reap it here, so the bench leaves no
        # process behind, not even one still exiting as its caller looks (``_stop`` closes its
        # pipe and waits for it; private, hence the guard)
        tracker = getattr(multiprocessing.resource_tracker, "_resource_tracker", None)
        stop = getattr(tracker, "_stop", None)
        if callable(stop):
            with contextlib.suppress(OSError, ChildProcessError):
                stop()
        return replies


def read_etcd(url: str, timeout: float = 5.0) -> tuple[EtcdCounters, float]:
    """etcd's client counters and its own CPU seconds (``process_cpu_seconds_total``)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    cpu = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "process_cpu_seconds_total":
                cpu = sample.value
    return parse_etcd_metrics(text), cpu


def _wait_healthy(workers: Workers, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    statuses = workers.statuses()
    while not all(cluster_healthy(s) for s in statuses):
        if time.monotonic() > deadline:
            bad = [s for s in statuses if not cluster_healthy(s)]
            raise WorkerError(f"not healthy within {timeout:.0f} s: {bad[:3]}")
        time.sleep(0.5)
        statuses = workers.statuses()
    return statuses


def _say(progress: Any, what: str) -> None:
    if progress is not None:
        print(f"bench scale: {what}", file=progress, flush=True)


def measure(
    clusters: int,
    members: int,
    ttl: float,
    seconds: float,
    workers: int,
    base: Path,
    progress: Any = None,
) -> dict[str, Any]:
    """One N: a fresh etcd, the clusters, the idle window, the probes, one failover."""
    names = [f"scale-{i + 1:03d}" for i in range(clusters)]
    n_workers = max(1, min(workers, clusters))
    port = free_port_range(2, start=21000, end=32000)
    url = f"http://127.0.0.1:{port}"
    etcd = start_etcd(base / f"etcd-{clusters}", port, port + 1)
    pool = Workers(
        [
            WorkerSpec(url, tuple(names[i::n_workers]), members, ttl, seed=1000 * clusters + i)
            for i in range(n_workers)
        ]
    )
    run: dict[str, Any] = {"clusters": clusters, "members": clusters * members}
    run["workers"] = n_workers
    try:
        started = time.monotonic()
        pool.start()
        statuses = _wait_healthy(pool, 60 + 3 * clusters * members)
        run["seconds_to_healthy"] = round(time.monotonic() - started, 1)
        _say(progress, f"{clusters} clusters healthy after {run['seconds_to_healthy']} s")
        time.sleep(SETTLE_SECONDS)
        terms = {s["cluster"]: s["term"] for s in pool.statuses()}

        usage0 = pool.ask(("usage",))
        before, etcd_cpu0 = read_etcd(url)
        t0 = time.monotonic()
        time.sleep(seconds)
        after, etcd_cpu1 = read_etcd(url)
        window = time.monotonic() - t0
        usage1 = pool.ask(("usage",))
        agents_cpu = sum(
            u1["cpu_seconds"] - u0["cpu_seconds"] for u0, u1 in zip(usage0, usage1, strict=True)
        )
        run["idle"] = idle_figures(
            before, after, window, clusters * members, agents_cpu, etcd_cpu1 - etcd_cpu0
        )
        run["worker_max_rss_mb"] = [u["max_rss_mb"] for u in usage1]
        statuses = pool.statuses()
        run["one_master_each"] = one_master_each(statuses)
        run["masters_kept_through_idle"] = all(
            terms.get(s["cluster"]) == s["term"] for s in statuses
        )
        _say(progress, f"{clusters} clusters idle: {run['idle']['calls_per_second']} calls/s")

        latencies = [x for reply in pool.ask(("probe", PROBES), timeout=120) for x in reply]
        run["fanout"] = latency_summary(latencies)
        _say(progress, f"{clusters} clusters fan-out: p50 {run['fanout']['p50_ms']} ms")

        run["failover"] = pool.ask_one(
            0, ("failover", names[0], 3 * ttl + 10), timeout=3 * ttl + 60
        )
        _say(progress, f"failover: {run['failover'].get('seconds_to_promoted')} s")
        with contextlib.suppress(WorkerError):
            statuses = _wait_healthy(pool, 2 * ttl + 30)
        run["one_master_each_after_failover"] = one_master_each(statuses)
    finally:
        replies = pool.stop()
        stop_child(etcd)
    run["findings"] = [f for r in replies for f in r.get("findings", [])]
    run["load_average"] = round(os.getloadavg()[0], 2)
    run["ok"] = bool(
        run.get("one_master_each")
        and run.get("masters_kept_through_idle")
        and run.get("one_master_each_after_failover")
        and run["failover"].get("seconds_to_promoted") is not None
        and not run["findings"]
        and run["fanout"]["missed"] == 0
    )
    return run


def run_scale_bench(
    clusters: Sequence[int],
    members: int,
    ttl: float,
    seconds: float,
    workers: int | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Every N of ``clusters`` in turn; the report with each figure's slope against N."""
    workers = workers or os.cpu_count() or 1
    base = Path(tempfile.mkdtemp(prefix="pgsc-scale-"))  # TMPDIR, else /tmp
    try:
        runs = [measure(n, members, ttl, seconds, workers, base, progress) for n in clusters]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {
        "bench": "scale",
        "members_per_cluster": members,
        "ttl": ttl,
        "cpus": os.cpu_count(),
        "runs": runs,
        "slopes": slopes(runs),
        "ok": all(r["ok"] for r in runs),
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a table, one row per N, and the slopes."""
    head = (
        f"{'clusters':>8} {'members':>7} {'calls/s':>8} {'/member':>8} {'sent B/s':>9} "
        f"{'recv B/s':>9} {'agents %':>8} {'etcd %':>7} {'fan-out p50/p95 ms':>19} "
        f"{'failover s':>10} {'ok':>3}"
    )
    lines = [head]
    for r in report["runs"]:
        f = {k: "-" if v is None else v for k, v in figures(r).items()}

        def cell(name: str, width: int, f: dict[str, Any] = f) -> str:
            return f"{f.get(name, '-')!s:>{width}}"

        fan = f"{f.get('fanout_p50_ms', '-')}/{f.get('fanout_p95_ms', '-')}"
        lines.append(
            f"{r['clusters']:>8} {r['members']:>7} {cell('calls_per_second', 8)} "
            f"{cell('calls_per_second_per_member', 8)} {cell('sent_bytes_per_second', 9)} "
            f"{cell('received_bytes_per_second', 9)} {cell('agents_cpu_percent', 8)} "
            f"{cell('etcd_cpu_percent', 7)} {fan:>19} {cell('failover_seconds', 10)} "
            f"{'yes' if r['ok'] else 'NO':>3}"
        )
    lines.append("slope per cluster (least squares):")
    for name, line in report["slopes"].items():
        if line is not None:
            lines.append(f"  {name}: {line['per_cluster']} (at 0 clusters: {line['at_zero']})")
    for r in report["runs"]:
        for finding in r["findings"]:
            lines.append(f"finding at {r['clusters']} clusters: {finding}")
    return "\n".join(lines)


def parse_clusters(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--clusters takes numbers separated by commas, not {text!r}") from None
    if not counts or min(counts) < 1:
        raise SystemExit("--clusters: every count must be at least 1")
    return counts


def cmd_scale(args: argparse.Namespace) -> int:
    report = run_scale_bench(
        parse_clusters(args.clusters),
        args.members,
        args.ttl,
        args.seconds,
        args.workers,
        progress=sys.stderr,
    )
    print(json.dumps(report) if args.json else format_report(report), flush=True)
    return 0 if report["ok"] else 1
