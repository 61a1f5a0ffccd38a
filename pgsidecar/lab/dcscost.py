"""`pgsidecar bench dcs-cost`: what one member costs the DCS, read from etcd's own metrics.

A platform runs many clusters against one etcd: each member's steady traffic is what decides how
many fit. For a 3-member cluster left idle (no client writes) on its own etcd, the benchmark reads
etcd's ``/metrics`` before and after a window and reports, per member:

    calls_per_second   gRPC calls etcd finished (``grpc_server_handled_total``, every method;
                       the JSON gateway's requests are gRPC calls inside etcd, so they count)
    sent / received    bytes etcd sent to and received from its clients
                       (``etcd_network_client_grpc_{sent,received}_bytes_total``)

then the cost of a planned switchover: the calls and bytes of a fixed window that starts at the
command, in total and above what the idle rate would have cost in the same time.

With ``--patroni`` the same is measured for Patroni (``patroni[etcd3]`` 4.1, the ``bench`` extra)
with 3 members on an etcd of its own: at its defaults (ttl 30, loop_wait 10) and at the TTL
asked for (Patroni refuses a TTL below 20: it runs at 20 then, and says so); pgsidecar also runs
at Patroni's default TTL so that each figure has one at equal TTL beside it. The benchmark
installs nothing: Patroni must be installed where the PostgreSQL OS user can run it
(``--patroni-bin``), because it runs PostgreSQL itself and PostgreSQL refuses to run as root.
Every process the benchmark starts is its child (Patroni's in their own process group), and is
stopped and reaped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from pgsidecar.procutil import free_port_range, os_user_ids, read_pid, terminate

CALLS = "grpc_server_handled_total"
SENT = "etcd_network_client_grpc_sent_bytes_total"
RECEIVED = "etcd_network_client_grpc_received_bytes_total"

# healthy, then this long before the idle window: start-up's own writes are not idle traffic
SETTLE_SECONDS = 45.0
PATRONI_DEFAULT_TTL = 30.0
PATRONI_MIN_TTL = 20.0
PATRONI_LOOP_WAIT = 10.0
PG_BIN = Path("/usr/lib/postgresql/15/bin")


@dataclass(frozen=True)
class EtcdCounters:
    """etcd's cumulative client counters at one moment."""

    calls: dict[str, float] = field(default_factory=dict)  # "Service/Method" -> calls finished
    sent_bytes: float = 0.0
    received_bytes: float = 0.0

    @property
    def total_calls(self) -> float:
        return sum(self.calls.values())


def parse_etcd_metrics(text: str) -> EtcdCounters:
    """The counters the benchmark needs from etcd's Prometheus text exposition."""
    calls: dict[str, float] = {}
    sent = received = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == CALLS:
                method = f"{sample.labels.get('grpc_service', '?')}/{sample.labels.get('grpc_method', '?')}"
                calls[method] = calls.get(method, 0.0) + sample.value
            elif sample.name == SENT:
                sent += sample.value
            elif sample.name == RECEIVED:
                received += sample.value
    return EtcdCounters(calls=calls, sent_bytes=sent, received_bytes=received)


def _short_method(method: str) -> str:
    # "etcdserverpb.Lease/LeaseKeepAlive" -> "Lease/LeaseKeepAlive"
    return method.rsplit(".", 1)[-1]


def idle_cost(
    before: EtcdCounters, after: EtcdCounters, seconds: float, members: int
) -> dict[str, Any]:
    """Rates per member over the window between two readings."""
    if seconds <= 0 or members <= 0:
        raise ValueError("the window and the member count must be positive")
    per = seconds * members
    by_method = {
        _short_method(m): round((after.calls.get(m, 0.0) - before.calls.get(m, 0.0)) / per, 4)
        for m in sorted(set(before.calls) | set(after.calls))
    }
    return {
        "seconds": round(seconds, 1),
        "members": members,
        "calls_per_second_per_member": round((after.total_calls - before.total_calls) / per, 4),
        "sent_bytes_per_second_per_member": round((after.sent_bytes - before.sent_bytes) / per, 2),
        "received_bytes_per_second_per_member": round(
            (after.received_bytes - before.received_bytes) / per, 2
        ),
        "calls_per_second_per_member_by_method": {k: v for k, v in by_method.items() if v},
    }


def window_cost(
    before: EtcdCounters, after: EtcdCounters, seconds: float, idle: dict[str, Any] | None
) -> dict[str, Any]:
    """Totals over a window (all members), and above what the idle rates would have cost."""
    calls = after.total_calls - before.total_calls
    sent = after.sent_bytes - before.sent_bytes
    received = after.received_bytes - before.received_bytes
    out: dict[str, Any] = {
        "seconds": round(seconds, 1),
        "calls": int(calls),
        "sent_bytes": int(sent),
        "received_bytes": int(received),
    }
    if idle is not None:
        n = idle["members"] * seconds
        out["calls_above_idle"] = int(calls - idle["calls_per_second_per_member"] * n)
        out["sent_bytes_above_idle"] = int(sent - idle["sent_bytes_per_second_per_member"] * n)
        out["received_bytes_above_idle"] = int(
            received - idle["received_bytes_per_second_per_member"] * n
        )
    return out


def scrape(url: str, timeout: float = 5.0) -> EtcdCounters:
    with urllib.request.urlopen(f"{url}/metrics", timeout=timeout) as resp:
        return parse_etcd_metrics(resp.read().decode())


# -- pgsidecar -------------------------------------------------------------------------------------


@contextmanager
def _scratch(prefix: str) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def measure_pgsidecar(
    seconds: float,
    ttl: float,
    switchover_window: float,
    nodes: int = 3,
    settle: float = SETTLE_SECONDS,
    idle_activity: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """A fresh local cluster (its own etcd), idle for ``seconds``, then one switchover (none if
    ``switchover_window`` is 0). ``idle_activity(cluster)``, if given, runs every 2 s of the
    idle window: what PostgreSQL may do with no client (the tests force checkpoints)."""
    from pgsidecar.lab.local import LocalCluster

    with _scratch("pgsc-dcscost-") as base:
        lc = LocalCluster(base / "c")
        try:
            lc.create(nodes=nodes, ttl=ttl)
            lc.up(detach=False, timeout=180)
            url = f"http://127.0.0.1:{lc.meta['etcd']['client_port']}"
            _settle(lambda: lc.wait_healthy(timeout=60), settle)
            activity = None if idle_activity is None else (lambda: idle_activity(lc))
            idle = _idle_window(url, seconds, nodes, activity)
            line: dict[str, Any] = {"system": "pgsidecar", "ttl": ttl, "idle": idle}
            if switchover_window > 0:
                old = lc.master()
                sw = _switchover_window(
                    url, switchover_window, idle, lambda: _pgsidecar_switchover(lc, old)
                )
                lc.wait_healthy(timeout=120)
                sw["new_master"] = lc.master()
                sw["old_master"] = old
                line["switchover"] = sw
            return line
        finally:
            lc.down()


def _pgsidecar_switchover(lc: Any, old: str | None) -> None:
    lc.request_switchover(via=old)


def _settle(wait_healthy: Any, seconds: float = SETTLE_SECONDS) -> None:
    """Healthy, then some seconds more: start-up's own writes are not idle traffic (the first
    autovacuum of a new cluster, about a minute after it started, writes a few hundred kB of
    WAL, which both pgsidecar and Patroni publish)."""
    wait_healthy()
    time.sleep(seconds)
    wait_healthy()


def _idle_window(
    url: str, seconds: float, members: int, activity: Callable[[], None] | None = None
) -> dict[str, Any]:
    before = scrape(url)
    t0 = time.monotonic()
    end = t0 + seconds
    while time.monotonic() < end:
        if activity is not None:
            activity()
        time.sleep(min(2.0, max(0.0, end - time.monotonic())))
    after = scrape(url)
    return idle_cost(before, after, time.monotonic() - t0, members)


def _switchover_window(
    url: str, seconds: float, idle: dict[str, Any], command: Any
) -> dict[str, Any]:
    """The calls and bytes of the ``seconds`` that start with ``command``."""
    before = scrape(url)
    t0 = time.monotonic()
    command()
    time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
    after = scrape(url)
    return window_cost(before, after, time.monotonic() - t0, idle)


# -- Patroni -------------------------------------------------------------------------------------


def start_etcd(d: Path, client_port: int, peer_port: int) -> subprocess.Popen[bytes]:
    """One etcd member on loopback, started as `pgsidecar local up` starts its own."""
    etcd = shutil.which("etcd")
    if etcd is None:
        raise RuntimeError("etcd not found: install Debian's etcd-server package")
    client = f"http://127.0.0.1:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    d.mkdir(parents=True, exist_ok=True)
    argv = [
        etcd,
        *("--name", "bench", "--data-dir", str(d / "data")),
        *("--listen-client-urls", client, "--advertise-client-urls", client),
        *("--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer),
        *("--initial-cluster", f"bench={peer}", "--initial-cluster-state", "new"),
        *("--heartbeat-interval", "100", "--election-timeout", "1000"),
    ]
    with open(d / "etcd.log", "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(f"{client}/health", timeout=1):
                return proc
        if proc.poll() is not None:
            raise RuntimeError(f"etcd exited with {proc.returncode}; see {d / 'etcd.log'}")
        time.sleep(0.2)
    stop_child(proc)
    raise RuntimeError(f"etcd did not answer within 30 s; see {d / 'etcd.log'}")


def stop_child(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30
) -> None:
    """Stop a child of ours (SIGKILL after ``timeout``) and reap it."""
    if proc.poll() is None:
        terminate(proc.pid, sig, timeout=timeout)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def patroni_config(
    name: str,
    d: Path,
    *,
    etcd_port: int,
    pg_port: int,
    api_port: int,
    ttl: float,
    loop_wait: float,
    retry_timeout: float,
    pg_bin: Path = PG_BIN,
) -> dict[str, Any]:
    """A Patroni 4 member on loopback with its defaults but for the timing asked for."""
    return {
        "scope": "bench",
        "name": name,
        "restapi": {"listen": f"127.0.0.1:{api_port}", "connect_address": f"127.0.0.1:{api_port}"},
        "etcd3": {"hosts": f"127.0.0.1:{etcd_port}"},
        "bootstrap": {
            "dcs": {
                "ttl": int(ttl),
                "loop_wait": int(loop_wait),
                "retry_timeout": int(retry_timeout),
                "postgresql": {"use_pg_rewind": True, "parameters": {"wal_log_hints": "on"}},
            },
            "initdb": [{"encoding": "UTF8"}, "data-checksums"],
            "pg_hba": [
                "local all all trust",
                "host replication replicator 127.0.0.1/32 scram-sha-256",
                "host all all 127.0.0.1/32 scram-sha-256",
            ],
        },
        "postgresql": {
            "listen": f"127.0.0.1:{pg_port}",
            "connect_address": f"127.0.0.1:{pg_port}",
            "data_dir": str(d / "data"),
            "bin_dir": str(pg_bin),
            "pgpass": str(d / "pgpass"),
            "authentication": {
                "superuser": {"username": "postgres", "password": "bench-superuser"},
                "replication": {"username": "replicator", "password": "bench-replication"},
                "rewind": {"username": "postgres", "password": "bench-superuser"},
            },
            "parameters": {"unix_socket_directories": str(d)},
        },
    }


def patroni_timing(ttl: float) -> dict[str, float]:
    """Patroni's loop_wait and retry_timeout for a TTL: its defaults (10, 10) where they fit
    (it wants ttl >= loop_wait + 2 retry_timeout), a shorter retry_timeout where they do not;
    its minimum TTL is 20."""
    ttl = max(PATRONI_MIN_TTL, ttl)
    return {
        "ttl": ttl,
        "loop_wait": PATRONI_LOOP_WAIT,
        "retry_timeout": min(10.0, (ttl - PATRONI_LOOP_WAIT) / 2),
    }


class PatroniCluster:
    """Three Patroni members and their etcd under one directory, all children of this process."""

    def __init__(self, base: Path, patroni_bin: str, ttl: float, nodes: int = 3) -> None:
        self.base = base
        self.patroni_bin = patroni_bin
        self.timing = patroni_timing(ttl)
        self.nodes = nodes
        self.port = free_port_range(2 + 2 * nodes, start=21000, end=32000)
        self.names = [f"p{i + 1}" for i in range(nodes)]
        self.etcd: subprocess.Popen[bytes] | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port + 3 + 2 * self.names.index(name)}"

    def start(self) -> None:
        uid, gid = os_user_ids("postgres") if os.geteuid() == 0 else (os.getuid(), os.getgid())
        self.etcd = start_etcd(self.base / "etcd", self.port, self.port + 1)
        for i, name in enumerate(self.names):
            d = self.base / name
            d.mkdir(mode=0o700)
            os.chown(d, uid, gid)
            cfg = patroni_config(
                name,
                d,
                etcd_port=self.port,
                pg_port=self.port + 2 + 2 * i,
                api_port=self.port + 3 + 2 * i,
                ttl=self.timing["ttl"],
                loop_wait=self.timing["loop_wait"],
                retry_timeout=self.timing["retry_timeout"],
            )
            path = d / "patroni.yml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            os.chown(path, uid, gid)
            argv = [self.patroni_bin, str(path)]
            if os.geteuid() == 0:
                # Patroni runs PostgreSQL itself, and PostgreSQL refuses to run as root
                argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", *argv]
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": str(d),
                "LANG": "C.UTF-8",
            }
            with open(self.base / f"{name}.log", "ab") as log:
                self.procs[name] = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            if i == 0:
                # the first one bootstraps alone: the others clone from it
                self.wait(
                    lambda first=name: self.leader() == first,
                    120,
                    "the first member to bootstrap",
                )

    def cluster(self) -> dict[str, Any] | None:
        for name in self.names:
            with suppress(OSError, urllib.error.URLError, ValueError):
                with urllib.request.urlopen(f"{self.api(name)}/cluster", timeout=2) as resp:
                    data: dict[str, Any] = json.loads(resp.read())
                    return data
        return None

    def leader(self) -> str | None:
        c = self.cluster() or {}
        leaders = [m["name"] for m in c.get("members", []) if m.get("role") == "leader"]
        return leaders[0] if len(leaders) == 1 else None

    def healthy(self) -> bool:
        c = self.cluster() or {}
        members = c.get("members", [])
        leaders = [m for m in members if m.get("role") == "leader" and m.get("state") == "running"]
        streaming = [
            m for m in members if m.get("role") != "leader" and m.get("state") == "streaming"
        ]
        return len(leaders) == 1 and len(streaming) == self.nodes - 1

    def wait(self, pred: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"Patroni {name} exited; see {self.base / (name + '.log')}")
            time.sleep(0.5)
        raise RuntimeError(f"Patroni: no {what} within {timeout:.0f} s: {self.cluster()}")

    def wait_healthy(self, timeout: float = 180) -> None:
        self.wait(self.healthy, timeout, "leader with every other member streaming")

    def switchover(self) -> None:
        leader = self.leader()
        req = urllib.request.Request(
            f"{self.api(leader or self.names[0])}/switchover",
            data=json.dumps({"leader": leader}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()

    def stop(self) -> None:
        leader = self.leader()
        for name in sorted(self.procs, key=lambda n: n == leader):
            stop_child(self.procs[name], timeout=60)
            # a PostgreSQL Patroni left behind (it stops its own on SIGTERM)
            pid = read_pid(self.base / name / "data" / "postmaster.pid")
            if pid is not None:
                with suppress(ProcessLookupError, PermissionError):
                    terminate(pid, signal.SIGQUIT, timeout=10)
        if self.etcd is not None:
            stop_child(self.etcd)


def measure_patroni(
    seconds: float, ttl: float, switchover_window: float, patroni_bin: str, nodes: int = 3
) -> dict[str, Any]:
    with _scratch("pgsc-dcscost-patroni-") as base:
        pc = PatroniCluster(base, patroni_bin, ttl, nodes)
        try:
            pc.start()
            _settle(pc.wait_healthy)
            idle = _idle_window(pc.etcd_url, seconds, nodes)
            old = pc.leader()
            sw = _switchover_window(pc.etcd_url, switchover_window, idle, pc.switchover)
            pc.wait_healthy(timeout=120)
            sw["new_master"] = pc.leader()
            sw["old_master"] = old
            version = subprocess.run(
                [patroni_bin, "--version"], capture_output=True, text=True, check=False
            ).stdout.strip()
            return {
                "system": version or "patroni",
                **{k: v for k, v in pc.timing.items()},
                "ttl_asked": ttl,
                "idle": idle,
                "switchover": sw,
            }
        finally:
            pc.stop()


# -- the command ---------------------------------------------------------------------------------


def run_dcs_cost_bench(
    seconds: float,
    ttl: float,
    switchover_window: float,
    patroni_bin: str | None,
    out: Any,
) -> list[dict[str, Any]]:
    """One JSON line per system and TTL. With Patroni: pgsidecar at ``ttl`` and at Patroni's
    default TTL; Patroni at its defaults and at ``ttl`` (raised to its minimum)."""
    runs: list[tuple[str, float]] = [("pgsidecar", ttl)]
    if patroni_bin is not None:
        if ttl != PATRONI_DEFAULT_TTL:
            runs.append(("pgsidecar", PATRONI_DEFAULT_TTL))
        runs.append(("patroni", PATRONI_DEFAULT_TTL))
        if patroni_timing(ttl)["ttl"] != PATRONI_DEFAULT_TTL:
            runs.append(("patroni", ttl))
    lines = []
    for system, run_ttl in runs:
        if system == "pgsidecar":
            line = measure_pgsidecar(seconds, run_ttl, switchover_window)
        else:
            assert patroni_bin is not None
            line = measure_patroni(seconds, run_ttl, switchover_window, patroni_bin)
        line["load_average"] = os.getloadavg()[0]
        print(json.dumps(line), file=out, flush=True)
        lines.append(line)
    return lines


def find_patroni(given: str | None) -> str:
    """The Patroni executable: given, or on PATH. The benchmark installs nothing."""
    path = given or shutil.which("patroni")
    if path is None or not os.access(path, os.X_OK):
        raise SystemExit(
            "pgsidecar bench dcs-cost --patroni: no Patroni executable "
            f"({given or 'none on PATH'}). Install it where the PostgreSQL OS user can run it, e.g. "
            "python3 -m venv /opt/patroni && /opt/patroni/bin/pip install 'patroni[etcd3,psycopg3]==4.1.*', "
            "then pass --patroni-bin /opt/patroni/bin/patroni"
        )
    return path


def cmd_dcs_cost(args: argparse.Namespace) -> int:
    patroni_bin = find_patroni(args.patroni_bin) if args.patroni else None
    run_dcs_cost_bench(args.seconds, args.ttl, args.switchover_window, patroni_bin, sys.stdout)
    return 0
