"""`pgsidecar bench scale --clusters 1,2` against a real etcd: every figure is there and sane,
every cluster elected exactly one master and kept it while idle, the killed master's cluster
failed over to another member holding the key, and nothing the benchmark started outlives it.
The arithmetic is tests/unit/test_scale_report.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd")

TTL = 5.0
SECONDS = 10.0


def _leftovers(tmpdir: Path, session: int) -> list[str]:
    """Live processes that name ``tmpdir`` (etcd) or belong to ``session`` (the workers)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat[0] == "Z":
            continue
        if str(tmpdir) in cmd or int(stat[3]) == session:
            out.append(f"{pid}: {cmd}")
    return out


@pytest.mark.timeout(400)
def test_one_and_two_clusters_on_one_etcd_report_sane_figures_and_fail_over() -> None:
    tmpdir = Path(tempfile.mkdtemp(prefix="pgsc-scale-test-"))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgsidecar", "bench", "scale", "--clusters", "1,2"]
            + ["--members", "3", "--ttl", str(TTL), "--seconds", str(SECONDS), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TMPDIR": str(tmpdir)},
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=380)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
        assert _leftovers(tmpdir, proc.pid) == [], "the benchmark reaps everything it started"
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    assert proc.returncode == 0, stderr[-3000:]
    report = json.loads(stdout)

    assert report["bench"] == "scale" and report["ok"] is True
    assert [r["clusters"] for r in report["runs"]] == [1, 2]
    for run in report["runs"]:
        n = run["clusters"]
        assert run["members"] == 3 * n
        # every cluster elected exactly one master, kept it while idle, and has one after
        assert run["one_master_each"] and run["masters_kept_through_idle"]
        assert run["one_master_each_after_failover"]
        assert run["findings"] == []  # no two writable members, every record replays

        idle = run["idle"]
        assert 9.0 <= idle["seconds"] <= 15.0
        # renewals at least: each lease is kept alive, at most a few times per TTL per member
        keepalive = idle["calls_per_second_by_method"].get("Lease/LeaseKeepAlive", 0.0)
        assert 0 < keepalive / run["members"] <= 4 / TTL + 1 / SECONDS
        assert idle["calls_per_second"] >= keepalive
        assert idle["calls_per_second_per_member"] == pytest.approx(
            idle["calls_per_second"] / run["members"], abs=0.01
        )
        assert idle["sent_bytes_per_second"] > 0 and idle["received_bytes_per_second"] > 0
        assert 0 < idle["agents_cpu_percent"] < 100 * (os.cpu_count() or 1)
        assert idle["etcd_cpu_percent"] > 0

        fanout = run["fanout"]
        assert fanout["watchers"] == 5 * 3 * n and fanout["missed"] == 0
        assert 0 < fanout["p50_ms"] <= fanout["p95_ms"] <= fanout["max_ms"] < 5000

        failover = run["failover"]
        assert failover["new_master"] not in (None, failover["old_master"])
        assert failover["leader_after"] == failover["new_master"]
        assert failover["term_after"] > failover["term_before"]
        # a hard kill leaves the lease to expire (a TTL after the master's last renewal, which
        # comes every TTL/4 or sooner): never at once, and not many TTLs
        assert TTL / 4 < failover["seconds_to_promoted"] < 3 * TTL + 5

    slope = report["slopes"]["calls_per_second"]
    assert slope is not None and slope["per_cluster"] > 0  # a second cluster costs etcd calls
