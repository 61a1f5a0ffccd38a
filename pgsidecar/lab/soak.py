"""`pgsidecar lab soak`: the endurance run. A 3-member local cluster under a steady pgbench TPC-B
load (several clients through the multi-host read-write DSN), with periodic stress on the same
machine drawn from a seed, and a JSON report of what an operator worries about over hours:

- ``false_failovers``: leader changes (a new (leader, term) on the master's /status, sampled every
  second). The stresses never target the master, so every leader change is a false failover.
- ``lease_renewals``: the agents' ``pgsidecar_lease_renewal_latency_seconds`` histograms (from
  /metrics at the end): how many renewals came late, and by how much.
- ``fencing_margin_min_seconds``: the lowest ``pgsidecar_fencing_margin_seconds`` of the master,
  sampled every second (the time left before it would fence itself).
- ``agents``: each agent's resident memory and CPU sampled over the run, with the slope of a
  least-squares line (MB per hour: a leak shows as a steady slope), its journal and Kafka spool
  size at the end.
- ``pgbench`` beside ``baseline``: throughput and latency under the cluster, and of PostgreSQL
  alone (one server, no agent, no replicas) for a fraction of the run before the cluster starts.

The stresses, one at a time: ``cpu`` (a busy loop per core), ``fsync`` (a writer that fsyncs every
8 kB into a 1 MB file on the cluster's file system), ``sigstop`` (SIGSTOP of a replica's agent,
SIGCONT after a fraction of the TTL). Every process the soak starts is its child and is stopped
and reaped by pid when it ends, also on Ctrl-C or SIGTERM (the report then covers the run so far).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pgsidecar.config import DEFAULT_TTL
from pgsidecar.lab.local import DEFAULT_PG_BIN, LocalCluster
from pgsidecar.procutil import free_port, os_user_ids, stop_child

STRESS_KINDS = ("cpu", "fsync", "sigstop")
RENEWAL_METRIC = "pgsidecar_lease_renewal_latency_seconds"
# a renewal later than these (seconds after it was due) is reported as late
LATE_THRESHOLDS = (0.1, 0.5, 1.0)


# -- the schedule -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stress:
    kind: str  # cpu | fsync | sigstop
    start: float  # seconds after the load started
    seconds: float
    victim: int = 0  # sigstop: which replica (index among the replicas, by name)


def _clamp(x: float, lo: float, hi: float) -> float:
    return max(lo, min(hi, x))


def draw_schedule(seed: int, seconds: float, ttl: float) -> list[Stress]:
    """The stresses of a run of ``seconds``, drawn from ``seed`` before anything starts. The kinds
    come in rounds, each round every kind once in a drawn order, so even a short run sees each;
    gaps and durations scale with the run (a 1-hour run: a stress every 4-8 minutes, 10-30 s
    long; a 1-minute run: every 4-8 s, 3-8 s long). A SIGSTOP lasts 0.2-0.6 TTL: a replica's
    agent that misses a renewal or two, never long enough for its session to lapse."""
    rng = random.Random(seed)
    gap_lo, gap_hi = _clamp(seconds / 16, 3, 240), _clamp(seconds / 8, 6, 480)
    dur_lo, dur_hi = _clamp(seconds / 20, 3, 10), _clamp(seconds / 9, 5, 30)
    out: list[Stress] = []
    kinds: list[str] = []
    t = rng.uniform(gap_lo, gap_hi)
    while t < seconds - 2:
        if not kinds:
            kinds = list(STRESS_KINDS)
            rng.shuffle(kinds)
        kind = kinds.pop(0)
        if kind == "sigstop":
            dur = rng.uniform(0.2, 0.6) * ttl
        else:
            dur = rng.uniform(dur_lo, dur_hi)
        dur = min(dur, seconds - 1 - t)
        out.append(Stress(kind, round(t, 2), round(dur, 2), rng.randrange(2)))
        t += dur + rng.uniform(gap_lo, gap_hi)
    return out


# -- the report's arithmetic ---------------------------------------------------------------------


def slope_per_hour(samples: Sequence[tuple[float, float]]) -> float | None:
    """The slope of the least-squares line through (seconds, value) samples, per hour (None
    with fewer than two distinct times)."""
    if len({t for t, _ in samples}) < 2:
        return None
    fit = statistics.linear_regression([t for t, _ in samples], [v for _, v in samples])
    return fit.slope * 3600


def distribution(values: Iterable[float]) -> dict[str, float | int | None]:
    """count, min, mean, p50, p90, p99, max of ``values`` (None for an empty series)."""
    xs = sorted(values)
    if not xs:
        return {
            "count": 0,
            "min": None,
            "mean": None,
            "p50": None,
            "p90": None,
            "p99": None,
            "max": None,
        }

    def q(p: float) -> float:
        # nearest rank
        return xs[min(len(xs) - 1, max(0, math.ceil(p * len(xs)) - 1))]

    return {
        "count": len(xs),
        "min": xs[0],
        "mean": statistics.fmean(xs),
        "p50": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
        "max": xs[-1],
    }


def histogram_summary(buckets: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """A Prometheus histogram's cumulative buckets [(le, count), ... (inf, total)] as a report:
    the total, how many observations were above each of LATE_THRESHOLDS (exact when the
    threshold is a bucket bound), each quantile as the bound of the bucket it falls in, and the
    count in each bucket (not cumulative)."""
    bs = sorted(buckets)
    total = bs[-1][1] if bs else 0

    def above(x: float) -> int:
        below = max((c for le, c in bs if le <= x), default=0)
        return int(total - below)

    def quantile(p: float) -> float | None:
        if not total:
            return None
        for le, c in bs:
            if c >= p * total:
                return le
        return math.inf

    per_bucket: dict[str, int] = {}
    prev = 0.0
    for le, c in bs:
        per_bucket[f"le {le:g}"] = int(c - prev)
        prev = c
    return {
        "count": int(total),
        "late": {f"over {x:g} s": above(x) for x in LATE_THRESHOLDS},
        "p50_at_most": quantile(0.5),
        "p99_at_most": quantile(0.99),
        "max_at_most": quantile(1.0),
        "buckets": per_bucket,
    }


def merge_buckets(histograms: Iterable[Sequence[tuple[float, float]]]) -> list[tuple[float, float]]:
    """The sum of histograms with the same bucket bounds."""
    total: dict[float, float] = {}
    for h in histograms:
        for le, c in h:
            total[le] = total.get(le, 0.0) + c
    return sorted(total.items())


@dataclass(frozen=True)
class LeaderChange:
    at: float
    old: str
    old_term: int | None
    new: str
    new_term: int | None


def leader_changes(
    series: Sequence[tuple[float, str | None, int | None]],
) -> list[LeaderChange]:
    """Leader changes in a series of (seconds, leader, term) samples: every sample whose
    (leader, term) differs from the last one seen. A sample without a leader (a moment with no
    master, or none answering) changes nothing by itself: a lapse that ends with the same
    leader under the same term was no election; the same member under a new term was one."""
    out: list[LeaderChange] = []
    last: tuple[str, int | None] | None = None
    for t, name, term in series:
        if name is None:
            continue
        if last is not None and (name, term) != last:
            out.append(LeaderChange(t, last[0], last[1], name, term))
        last = (name, term)
    return out


def leaderless_seconds(series: Sequence[tuple[float, str | None, int | None]]) -> float:
    """Seconds between samples in which no member was master (each leaderless sample counts up
    to the next sample)."""
    total = 0.0
    for (t, name, _), (t2, _, _) in zip(series, series[1:], strict=False):
        if name is None:
            total += t2 - t
    return total


PROGRESS = re.compile(
    r"progress: (?P<at>[\d.]+) s, (?P<tps>[\d.]+) tps, lat (?P<lat>[\d.]+|NaN) ms"
)
SUMMARY = {
    "transactions": re.compile(r"number of transactions actually processed: (\d+)"),
    "failed": re.compile(r"number of failed transactions: (\d+)"),
    "latency_ms": re.compile(r"latency average = ([\d.]+) ms"),
    "tps": re.compile(r"tps = ([\d.]+) \(without initial connection time\)"),
}


def parse_progress(line: str) -> tuple[float, float, float | None] | None:
    """(seconds, tps, average latency ms) of a pgbench ``-P`` line, else None."""
    m = PROGRESS.search(line)
    if m is None:
        return None
    lat = None if m["lat"] == "NaN" else float(m["lat"])
    return float(m["at"]), float(m["tps"]), lat


def parse_summary(text: str) -> dict[str, float]:
    """What pgbench prints at the end of a run: transactions, failed, latency_ms, tps."""
    out: dict[str, float] = {}
    for key, rx in SUMMARY.items():
        m = rx.search(text)
        if m is not None:
            out[key] = float(m[1])
    return out


# -- processes -----------------------------------------------------------------------------------


class Children:
    """Every process the soak starts, stopped and reaped by pid at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def spawn(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, **kw)
        self.procs.append(proc)
        return proc

    def stop(
        self, proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10
    ) -> None:
        stop_child(proc, sig, timeout)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)


@dataclass
class Pgbench:
    """One pgbench run with ``-P``, its progress lines read as they come."""

    children: Children
    argv: list[str]
    env: dict[str, str]
    progress: list[tuple[float, float, float | None]] = field(default_factory=list)
    stderr_tail: list[str] = field(default_factory=list)
    stdout: list[str] = field(default_factory=list)
    aborted_clients: int = 0
    started: float = 0.0
    proc: subprocess.Popen[str] | None = None
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Pgbench:
        self.started = time.monotonic()
        self.proc = self.children.spawn(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
        )
        for stream, sink in ((self.proc.stdout, self._out), (self.proc.stderr, self._err)):
            th = threading.Thread(target=sink, args=(stream,), daemon=True)
            th.start()
            self._threads.append(th)
        return self

    def _out(self, stream: Any) -> None:
        for line in stream:
            self.stdout.append(line)

    def _err(self, stream: Any) -> None:
        for line in stream:
            p = parse_progress(line)
            if p is not None:
                # seconds since this run started -> since the soak's load started is the caller's
                self.progress.append(p)
                continue
            if "aborted" in line:
                self.aborted_clients += 1
            self.stderr_tail = [*self.stderr_tail[-20:], line.rstrip()]

    def wait(self, timeout: float | None = None) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout=timeout)
        for th in self._threads:
            th.join(timeout=5)
        if self.proc in self.children.procs:
            self.children.procs.remove(self.proc)
        return rc

    def stop(self) -> None:
        if self.proc is not None:
            # no summary then: the progress lines have the run. (Not SIGINT: a soak started in
            # the background by a shell inherits SIGINT ignored, and so would pgbench.)
            self.children.stop(self.proc, signal.SIGTERM)
            for th in self._threads:
                th.join(timeout=5)

    def summary(self) -> dict[str, float]:
        return parse_summary("".join(self.stdout))


def pgbench_binary(pg_bin: Path) -> str:
    for candidate in (pg_bin / "pgbench", shutil.which("pgbench")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise SystemExit(
        f"pgbench not found in {pg_bin} or on PATH: it ships with Debian's postgresql-15 "
        "(or postgresql-contrib) package"
    )


class PlainPostgres:
    """One PostgreSQL server alone (no agent, no replica) for the baseline: initdb, start,
    stop. Run as root, it runs as the PostgreSQL OS user, as the cluster's members do."""

    def __init__(self, children: Children, dir: Path, pg_bin: Path) -> None:
        self.children = children
        self.dir = dir
        self.data = dir / "pgdata"
        self.pg_bin = pg_bin
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.user: dict[str, Any] = {}
        if os.geteuid() == 0:
            uid, gid = os_user_ids("postgres")
            self.user = {"user": uid, "group": gid, "extra_groups": []}
            dir.mkdir(parents=True, exist_ok=True)
            os.chown(dir, uid, gid)

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def start(self) -> None:
        subprocess.run(
            [str(self.pg_bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            **self.user,
        )
        with open(self.dir / "postgresql.log", "ab") as log:
            self.proc = self.children.spawn(
                [
                    str(self.pg_bin / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "unix_socket_directories=",
                    # the members' settings that weigh on pgbench (pgsidecar/postgres/config.py)
                    "-c",
                    "shared_buffers=32MB",
                    "-c",
                    "wal_level=replica",
                    "-c",
                    "wal_log_hints=on",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                **self.user,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [str(self.pg_bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(
            f"the baseline PostgreSQL did not start; see {self.dir / 'postgresql.log'}"
        )

    def stop(self) -> None:
        if self.proc is not None:
            # SIGINT: PostgreSQL's fast shutdown
            self.children.stop(self.proc, signal.SIGINT, timeout=30)
            self.proc = None


# -- sampling ------------------------------------------------------------------------------------


def proc_sample(pid: int) -> tuple[float, float] | None:
    """(resident MB, CPU seconds used) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            rss_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return rss_kb / 1024, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fetch_metrics(url: str, timeout: float = 1.0) -> str | None:
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=timeout) as resp:
            text: str = resp.read().decode()
            return text
    except (OSError, urllib.error.URLError, ValueError):
        return None


def metric_samples(text: str, name: str) -> list[tuple[str, dict[str, str], float]]:
    """The samples of metric family ``name`` in Prometheus text: (sample name, labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: list[tuple[str, dict[str, str], float]] = []
    for family in text_string_to_metric_families(text):
        if family.name == name:
            out.extend((s.name, dict(s.labels), s.value) for s in family.samples)
    return out


def renewal_buckets(text: str) -> list[tuple[float, float]]:
    return [
        (float(labels["le"]), value)
        for sample, labels, value in metric_samples(text, RENEWAL_METRIC)
        if sample.endswith("_bucket")
    ]


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / f).stat().st_size
    return total


# -- the run -------------------------------------------------------------------------------------


@dataclass
class SoakOptions:
    hours: float
    ttl: float
    synchronous_mode: str = "off"
    seed: int = 0
    clients: int = 4
    scale: int = 4
    kafka: bool = False
    dir: Path | None = None
    keep_dir: bool = False
    pg_bin: Path = DEFAULT_PG_BIN

    @property
    def seconds(self) -> float:
        return self.hours * 3600

    @property
    def baseline_seconds(self) -> float:
        # a tenth of the run, at least 5 s, at most 5 minutes
        return _clamp(self.seconds / 10, 5, 300)

    @property
    def sample_every(self) -> float:
        # memory and CPU: a few hundred points over the run
        return _clamp(self.seconds / 300, 1, 10)


class Soak:
    def __init__(self, opts: SoakOptions, log: Any = None) -> None:
        self.opts = opts
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.children = Children()
        self.base = opts.dir or Path(tempfile.mkdtemp(prefix="pgsc-soak-", dir="/tmp"))
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        self.lc = LocalCluster(self.base / "cluster")
        self.pgbench_bin = pgbench_binary(opts.pg_bin)
        self.schedule = draw_schedule(opts.seed, opts.seconds, opts.ttl)
        self.interrupted = False
        # the samples
        self.t0 = 0.0
        self.elapsed = 0.0  # seconds of load, up to the end of the run or its interruption
        self.leaders: list[tuple[float, str | None, int | None]] = []
        self.margins: list[float] = []
        self.usage: dict[str, list[tuple[float, float, float]]] = {}  # name -> (t, rss, cpu s)
        self.stresses_done: list[dict[str, Any]] = []
        self.runs: list[Pgbench] = []
        self._stopped_pid: int | None = None
        self.sigstopped: set[str] = set()  # the replicas whose agent a stress stopped
        self._stress_procs: list[subprocess.Popen[Any]] = []

    # -- pgbench ---------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        return {**os.environ, "PGPASSFILE": str(self.lc.dir / "pgpass"), "PGCONNECT_TIMEOUT": "3"}

    def _pgbench(self, dsn: str, seconds: float, env: dict[str, str]) -> Pgbench:
        c = self.opts.clients
        argv = [
            self.pgbench_bin,
            "-n",  # no vacuum before the run: the tables are fresh
            "-c",
            str(c),
            "-j",
            str(min(c, os.cpu_count() or 1)),
            "-T",
            str(max(1, int(seconds))),
            "-P",
            "1" if seconds < 600 else "5",
            dsn,
        ]
        return Pgbench(self.children, argv, env).start()

    def _init_tables(self, dsn: str, env: dict[str, str]) -> None:
        subprocess.run(
            [self.pgbench_bin, "-i", "-q", "-s", str(self.opts.scale), dsn],
            check=True,
            capture_output=True,
            env=env,
            timeout=600,
        )

    def baseline(self) -> dict[str, Any]:
        pg = PlainPostgres(self.children, self.base / "baseline", self.opts.pg_bin)
        try:
            pg.start()
            env = {**os.environ, "PGCONNECT_TIMEOUT": "3"}
            self._init_tables(pg.dsn, env)
            secs = self.opts.baseline_seconds
            self.log(f"baseline: pgbench against PostgreSQL alone for {secs:.0f} s")
            run = self._pgbench(pg.dsn, secs, env)
            run.wait(timeout=secs + 60)
            return pgbench_report([run], secs)
        finally:
            pg.stop()
            shutil.rmtree(self.base / "baseline", ignore_errors=True)

    # -- the cluster -------------------------------------------------------------------------

    def start_cluster(self) -> None:
        extra: dict[str, Any] = {}
        if self.opts.synchronous_mode != "off":
            extra["settings.synchronous_mode"] = self.opts.synchronous_mode
        self.lc.create(nodes=3, ttl=self.opts.ttl, extra=extra, kafka=self.opts.kafka)
        self.lc.up(detach=False, timeout=300)
        if self.opts.synchronous_mode != "off":
            self.lc.wait_sync(timeout=120)

    def _multi_host_dsn(self) -> str:
        from pgsidecar.lab.workload import multi_host_dsn

        return multi_host_dsn(self.lc)

    # -- stresses ----------------------------------------------------------------------------

    def _start_stress(self, s: Stress, master: str | None) -> dict[str, Any]:
        done: dict[str, Any] = {"kind": s.kind, "start": s.start, "seconds": s.seconds}
        if s.kind == "cpu":
            for _ in range(os.cpu_count() or 1):
                self._stress_procs.append(
                    self.children.spawn([sys.executable, "-c", "while True: pass"])
                )
        elif s.kind == "fsync":
            path = self.base / "fsync-stress.dat"
            code = (
                "import os, sys\n"
                "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)\n"
                "block, i = b'x' * 8192, 0\n"
                "while True:\n"
                "    os.pwrite(fd, block, (i % 128) * 8192)\n"
                "    os.fsync(fd)\n"
                "    i += 1\n"
            )
            self._stress_procs.append(self.children.spawn([sys.executable, "-c", code, str(path)]))
        elif s.kind == "sigstop":
            # never the master: with none seen yet, no target (the stress is recorded without one)
            replicas = (
                sorted(m.name for m in self.lc.members if m.name != master)
                if master is not None
                else []
            )
            name = replicas[s.victim % len(replicas)] if replicas else None
            pid = self.lc.agent_pid(name) if name is not None else None
            if name is not None and pid is not None:
                os.kill(pid, signal.SIGSTOP)
                self._stopped_pid = pid
                done["target"] = name
                self.sigstopped.add(name)
        return done

    def _end_stress(self) -> None:
        if self._stopped_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._stopped_pid, signal.SIGCONT)
            self._stopped_pid = None
        for proc in self._stress_procs:
            self.children.stop(proc, signal.SIGKILL)
        self._stress_procs = []
        with contextlib.suppress(OSError):
            (self.base / "fsync-stress.dat").unlink()

    # -- sampling ----------------------------------------------------------------------------

    def _sample_leader(self, now: float) -> str | None:
        leader: tuple[str, int | None] | None = None
        for m in self.lc.members:
            pid = self.lc.agent_pid(m.name)
            if pid is None or pid == self._stopped_pid:
                continue
            st = self.lc.api_status(m.name, timeout=0.5) or {}
            if st.get("role") == "master":
                leader = (m.name, st.get("term"))
                break
        self.leaders.append((now, leader[0] if leader else None, leader[1] if leader else None))
        if leader is not None:
            text = fetch_metrics(self.lc.member(leader[0]).api_url, timeout=0.5)
            if text:
                for _, _, value in metric_samples(text, "pgsidecar_fencing_margin_seconds"):
                    if not math.isnan(value):
                        self.margins.append(value)
        return leader[0] if leader else None

    def _sample_usage(self, now: float) -> None:
        for m in self.lc.members:
            pid = self.lc.agent_pid(m.name)
            got = proc_sample(pid) if pid else None
            if got is not None:
                self.usage.setdefault(m.name, []).append((now, got[0], got[1]))

    # -- the whole run -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        load_start = os.getloadavg()
        report: dict[str, Any] = {}
        try:
            baseline = self.baseline()
            self.log(
                f"cluster: 3 members, ttl {self.opts.ttl:g} s, synchronous mode {self.opts.synchronous_mode}"
            )
            self.start_cluster()
            env = self._env()
            dsn = self._multi_host_dsn()
            self._init_tables(dsn, env)
            self.lc.wait_healthy(timeout=120)
            self.log(
                f"soak: {self.opts.seconds:.0f} s of pgbench ({self.opts.clients} clients) with "
                f"{len(self.schedule)} stresses (seed {self.opts.seed})"
            )
            self._loop(dsn, env)
            report = self.report(baseline, load_start)
        finally:
            self._end_stress()
            for run in self.runs:
                run.stop()
            self.children.stop_all()
            if self.lc.meta:
                self.lc.down()
            if not self.opts.keep_dir and self.opts.dir is None:
                shutil.rmtree(self.base, ignore_errors=True)
        return report

    def _loop(self, dsn: str, env: dict[str, str]) -> None:
        seconds = self.opts.seconds
        self.t0 = time.monotonic()
        pending = list(self.schedule)
        active: tuple[Stress, float] | None = None
        next_leader = next_usage = next_pgbench = 0.0
        master: str | None = None
        try:
            while (now := time.monotonic() - self.t0) < seconds:
                # pgbench for the rest of the run; started again if it ended early (a client
                # aborted by a failover ends the run)
                current = self.runs[-1] if self.runs else None
                if (
                    (current is None or current.proc is None or current.proc.poll() is not None)
                    and seconds - now > 2
                    and now >= next_pgbench
                ):
                    if current is not None:
                        current.wait(timeout=10)
                    self.runs.append(self._pgbench(dsn, seconds - now, env))
                    next_pgbench = now + 1.0  # a pgbench that cannot connect is not a busy loop
                if active is not None and now >= active[1]:
                    self._end_stress()
                    active = None
                if active is None and pending and now >= pending[0].start:
                    s = pending.pop(0)
                    self.log(f"{now:7.1f} s: stress {s.kind} for {s.seconds:g} s")
                    self.stresses_done.append(self._start_stress(s, master))
                    active = (s, now + s.seconds)
                if now >= next_leader:
                    master = self._sample_leader(now) or master
                    next_leader = now + 1.0
                if now >= next_usage:
                    self._sample_usage(now)
                    next_usage = now + self.opts.sample_every
                time.sleep(0.1)
        except KeyboardInterrupt:
            self.interrupted = True
            self.log("interrupted: stopping the load and reporting the run so far")
        self.elapsed = time.monotonic() - self.t0
        self._end_stress()
        self._sample_usage(self.elapsed)
        for run in self.runs:
            if run.proc is None or run.proc.poll() is not None:
                continue
            if self.interrupted:
                run.stop()
                continue
            try:
                run.wait(timeout=15)  # its -T ends with the run: the summary follows
            except subprocess.TimeoutExpired:
                run.stop()

    def report(
        self, baseline: dict[str, Any], load_start: tuple[float, float, float]
    ) -> dict[str, Any]:
        elapsed = self.elapsed
        changes = leader_changes(self.leaders)
        texts = {m.name: fetch_metrics(m.api_url) or "" for m in self.lc.members}
        per_agent_buckets = {n: renewal_buckets(t) for n, t in texts.items()}
        renewals: dict[str, Any] = histogram_summary(merge_buckets(per_agent_buckets.values()))
        renewals["failures"] = int(
            sum(
                v
                for t in texts.values()
                for _, _, v in metric_samples(t, "pgsidecar_lease_renewal_failures_total")
            )
        )
        # the agent a SIGSTOP froze renews late by design; the master's lateness is what counts
        roles = {r["name"]: r["role"] for r in self.lc.status()}
        renewals["per_agent"] = {
            n: {
                "role_at_end": roles.get(n),
                "sigstopped": n in self.sigstopped,
                "count": int(b[-1][1]) if b else 0,
                **histogram_summary(b)["late"],
            }
            for n, b in per_agent_buckets.items()
        }
        warm = self.opts.seconds / 10
        agents: dict[str, Any] = {}
        for m in self.lc.members:
            samples = self.usage.get(m.name, [])
            cpu_pct = [
                (b[0], 100 * (b[2] - a[2]) / (b[0] - a[0]))
                for a, b in zip(samples, samples[1:], strict=False)
                if b[0] > a[0]
            ]
            steady = [(t, rss) for t, rss, _ in samples if t >= warm]
            slope = slope_per_hour(steady if len(steady) >= 2 else [(t, r) for t, r, _ in samples])
            agents[m.name] = {
                "rss_mb": {
                    "first": round(samples[0][1], 1) if samples else None,
                    "last": round(samples[-1][1], 1) if samples else None,
                    "max": round(max(r for _, r, _ in samples), 1) if samples else None,
                    "slope_mb_per_hour": None if slope is None else round(slope, 2),
                },
                "cpu_percent_of_a_core": {
                    "mean": round(statistics.fmean(p for _, p in cpu_pct), 2) if cpu_pct else None,
                    "max": round(max(p for _, p in cpu_pct), 2) if cpu_pct else None,
                },
                "samples": len(samples),
                "journal_bytes": sum(
                    tree_bytes(p) for p in m.dir.glob("journal.jsonl*") if p.is_file()
                ),
                "spool_bytes": tree_bytes(m.dir / "kafka-spool")
                if (m.dir / "kafka-spool").exists()
                else 0,
            }
        margin = distribution(self.margins)
        by_kind = {k: sum(1 for s in self.stresses_done if s["kind"] == k) for k in STRESS_KINDS}
        return {
            "soak": {
                "hours": self.opts.hours,
                "seconds_run": round(elapsed, 1),
                "interrupted": self.interrupted,
                "ttl": self.opts.ttl,
                "synchronous_mode": self.opts.synchronous_mode,
                "seed": self.opts.seed,
                "members": len(self.lc.members),
                "kafka": self.opts.kafka,
                "pgbench_clients": self.opts.clients,
                "pgbench_scale": self.opts.scale,
            },
            "false_failovers": len(changes),
            "leader_changes": [asdict(c) | {"at": round(c.at, 1)} for c in changes],
            "leaderless_seconds": round(leaderless_seconds(self.leaders), 1),
            "stresses": {
                "count": len(self.stresses_done),
                "by_kind": by_kind,
                "runs": self.stresses_done,
            },
            "lease_renewals": renewals,
            "fencing_margin_min_seconds": None
            if margin["min"] is None
            else round(float(margin["min"]), 3),
            "fencing_margin_seconds": {
                k: (round(v, 3) if isinstance(v, float) else v) for k, v in margin.items()
            },
            "agents": agents,
            "pgbench": pgbench_report(self.runs, elapsed),
            "baseline": baseline,
            "machine": {
                "cpus": os.cpu_count(),
                "loadavg_at_start": [round(x, 2) for x in load_start],
                "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            },
        }


def pgbench_report(runs: Sequence[Pgbench], seconds: float) -> dict[str, Any]:
    """Throughput and latency of one or more consecutive pgbench runs, from their summaries
    when they ended on their own, else from their progress lines."""
    tps_series = [tps for r in runs for _, tps, _ in r.progress]
    lat_series = [lat for r in runs for _, _, lat in r.progress if lat is not None]
    summaries = [r.summary() for r in runs]
    transactions = sum(s.get("transactions", 0) for s in summaries)
    if not transactions:
        # interrupted runs print no summary: count from the progress (1 line per interval)
        for r in runs:
            prev = 0.0
            for at, tps, _ in r.progress:
                transactions += tps * (at - prev)
                prev = at
    lat = [s["latency_ms"] for s in summaries if "latency_ms" in s]
    tps_dist = distribution(tps_series)
    return {
        "seconds": round(seconds, 1),
        "transactions": int(transactions),
        "tps": round(transactions / seconds, 1) if seconds > 0 else None,
        "latency_ms_mean": round(statistics.fmean(lat), 3)
        if lat
        else (round(statistics.fmean(lat_series), 3) if lat_series else None),
        "progress_tps": {
            k: (round(v, 1) if isinstance(v, float) else v) for k, v in tps_dist.items()
        },
        "progress_latency_ms_max": round(max(lat_series), 3) if lat_series else None,
        "runs": len(runs),
        "aborted_clients": sum(r.aborted_clients for r in runs),
        "failed_transactions": int(sum(s.get("failed", 0) for s in summaries)),
    }


# -- the command ---------------------------------------------------------------------------------


def cmd_soak(args: argparse.Namespace) -> int:
    if not args.hours > 0:
        print("pgsidecar: --hours must be above 0", file=sys.stderr)
        return 2
    opts = SoakOptions(
        hours=args.hours,
        ttl=args.ttl,
        synchronous_mode=args.synchronous_mode,
        seed=args.seed,
        clients=args.clients,
        scale=args.scale,
        kafka=args.kafka,
        dir=Path(args.dir) if args.dir else None,
        keep_dir=args.keep_dir,
    )

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        soak = Soak(opts)
        report = soak.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2), flush=True)
    if soak.interrupted:
        return 130
    return 1 if report.get("false_failovers") else 0


def add_parser(lab_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `soak` to `pgsidecar lab`."""
    s = lab_sub.add_parser(
        "soak",
        help="endurance: a local cluster under pgbench load and machine stress; JSON report",
        description=(
            "A 3-member local cluster under a steady pgbench TPC-B load through the multi-host "
            "read-write DSN, with CPU hogs, an fsync-heavy writer and short SIGSTOPs of a "
            "replica's agent drawn from --seed; reports false failovers, late lease renewals, "
            "the fencing margin, agent memory and CPU over time, journal and spool size, and "
            "pgbench beside a run of PostgreSQL alone. Exit 1 on a false failover."
        ),
    )
    s.add_argument(
        "--hours", type=float, required=True, help="length of the run (fractions allowed)"
    )
    s.add_argument(
        "--ttl",
        type=float,
        default=DEFAULT_TTL,
        help=f"leader lease TTL, seconds (default {DEFAULT_TTL:g})",
    )
    s.add_argument("--synchronous-mode", choices=["off", "on", "strict"], default="off")
    s.add_argument("--seed", type=int, default=0, help="draws the stress schedule")
    s.add_argument("--clients", type=int, default=4, help="pgbench clients")
    s.add_argument("--scale", type=int, default=4, help="pgbench scale factor")
    s.add_argument(
        "--kafka",
        action="store_true",
        help="run a Kafka broker too (the agents' spool then has something to do); needs Java",
    )
    s.add_argument("--dir", help="where the cluster goes (kept); default a temporary dir, removed")
    s.add_argument("--keep-dir", action="store_true", help="keep the temporary dir")
    s.add_argument("--json", action="store_true", help="one line of JSON")
    s.set_defaults(func=cmd_soak)
