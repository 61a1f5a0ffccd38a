"""`pgsidecar bench failover` once, against real processes: every scenario the README's table
reports is printed as a JSON line with its figures, no acknowledged write is lost, and a finished
bench stops and removes the cluster it started (a return inside its ``try`` once skipped that
and left etcd, the agents and PostgreSQL running). The figures themselves are the README's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pgsidecar.lab.local import DEFAULT_PG_BIN

pytestmark = pytest.mark.skipif(
    not (DEFAULT_PG_BIN / "postgres").exists()
    or shutil.which("etcd") is None
    or shutil.which("haproxy") is None,
    reason="needs PostgreSQL 15, etcd and HAProxy (scripts/setup.sh installs them)",
)


def _bench_dirs() -> set[Path]:
    return set(Path("/tmp").glob("pgsc-bench-*"))


def _processes_naming(paths: set[Path]) -> list[str]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(str(p) in cmd for p in paths):
            out.append(f"{pid}: {cmd}")
    return out


@pytest.mark.timeout(300)
def test_one_round_prints_every_scenario_and_leaves_nothing_running() -> None:
    before = _bench_dirs()
    proc = subprocess.run(
        [sys.executable, "-m", "pgsidecar", "bench", "failover"]
        + ["--repeat", "1", "--ttl", "5", "--idle-seconds", "2"],
        capture_output=True,
        text=True,
        timeout=290,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    scenarios = {d["scenario"]: d for d in lines if d["bench"] == "failover"}
    assert set(scenarios) == {
        "sigterm",
        "hard_kill",
        "switchover",
        "rejoin",
        "sigterm_through_haproxy",
    }, scenarios
    for name in ("sigterm", "hard_kill", "switchover"):
        assert (scenarios[name]["seconds_to_first_write_median"] or 0) > 0, scenarios[name]
    # a planned hand-off waits for the replicas: nothing acknowledged is lost
    for name in ("sigterm", "switchover"):
        assert scenarios[name]["acked_writes_lost"] == 0, scenarios[name]
    # a hard kill with asynchronous replication (the default) may lose only the tail the old
    # master acknowledged in its last moment and had not yet sent; nothing older
    hard = scenarios["hard_kill"]
    assert hard["lost_acked_before_kill_seconds_median"] < 0.5, hard
    # a hard kill waits out the lease: at least most of a TTL, never an instant hand-off
    assert scenarios["hard_kill"]["seconds_to_first_write_median"] > 5 * 0.5
    assert scenarios["rejoin"]["seconds_to_streaming_median"] > 0
    idle = [d for d in lines if d["bench"] == "agent_idle"]
    assert sorted(d["member"] for d in idle) == ["pg1", "pg2", "pg3"]
    assert [d["role"] for d in idle].count("master") == 1
    assert all(d["rss_mb"] > 0 for d in idle)

    new = _bench_dirs() - before
    assert new == set(), f"the bench left its cluster's files: {new}"
    left = _processes_naming({Path("/tmp/pgsc-bench-")})
    assert left == [], "the bench stopped everything it started"
