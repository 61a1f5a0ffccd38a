"""`pgsidecar lab soak` for about a minute against real processes: the report has every field,
the stresses ran (each kind), the cluster kept its master (no false failover), pgbench made
progress on the cluster and on PostgreSQL alone, the agents' renewal histograms were read, and
nothing the soak started outlives it. The arithmetic is tests/unit/test_soak_report.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pgsidecar.lab.local import DEFAULT_PG_BIN

pytestmark = pytest.mark.skipif(
    not (DEFAULT_PG_BIN / "pgbench").exists() or shutil.which("etcd") is None,
    reason="needs PostgreSQL 15 (pgbench) and etcd",
)


def _processes_naming(path: Path) -> list[str]:
    """Command lines of live processes that mention ``path`` (the soak's cluster and stresses)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(path) in cmd:
            out.append(f"{pid}: {cmd}")
    return out


@pytest.mark.timeout(240)
def test_a_one_minute_soak_reports_every_field_and_no_false_failover() -> None:
    d = Path(tempfile.mkdtemp(prefix="pgsc-soak-test-", dir="/tmp"))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pgsidecar", "lab", "soak", "--hours", "0.02", "--ttl", "5"]
            + ["--json", "--seed", "3", "--dir", str(d)],
            capture_output=True,
            text=True,
            timeout=230,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads(proc.stdout)
        assert _processes_naming(d) == [], "the soak reaps everything it started"
    finally:
        shutil.rmtree(d, ignore_errors=True)

    assert set(report) == {
        "soak",
        "false_failovers",
        "leader_changes",
        "leaderless_seconds",
        "stresses",
        "lease_renewals",
        "fencing_margin_min_seconds",
        "fencing_margin_seconds",
        "agents",
        "pgbench",
        "baseline",
        "machine",
    }
    assert report["soak"]["ttl"] == 5 and report["soak"]["seconds_run"] > 60
    assert report["false_failovers"] == 0, report["leader_changes"]
    by_kind = report["stresses"]["by_kind"]
    assert set(by_kind) == {"cpu", "fsync", "sigstop"}
    assert all(n >= 1 for n in by_kind.values()), f"every kind of stress ran: {by_kind}"
    stopped = [s["target"] for s in report["stresses"]["runs"] if s["kind"] == "sigstop"]
    assert stopped and all(stopped), "each SIGSTOP found a replica's agent"

    renewals = report["lease_renewals"]
    # three agents renewing every ttl/4 for a minute and more
    assert renewals["count"] >= 3 * 40
    assert set(renewals["late"]) == {"over 0.1 s", "over 0.5 s", "over 1 s"}
    masters = [n for n, a in renewals["per_agent"].items() if a["role_at_end"] == "master"]
    assert len(masters) == 1 and not renewals["per_agent"][masters[0]]["sigstopped"]
    # the master renews in time: its fencing deadline never came near
    assert report["fencing_margin_min_seconds"] is not None
    assert 0 < report["fencing_margin_min_seconds"] < 5

    assert set(report["agents"]) == {"pg1", "pg2", "pg3"}
    for name, agent in report["agents"].items():
        assert agent["samples"] >= 30, name
        assert 10 < agent["rss_mb"]["last"] < 200, name
        assert agent["rss_mb"]["slope_mb_per_hour"] is not None, name
        assert agent["cpu_percent_of_a_core"]["mean"] is not None, name
        assert agent["journal_bytes"] > 0, name
        assert agent["spool_bytes"] == 0, "no Kafka asked for: nothing spooled"

    for run in ("pgbench", "baseline"):
        assert report[run]["transactions"] > 100, run
        assert report[run]["tps"] > 0 and report[run]["latency_ms_mean"] > 0, run
        assert report[run]["progress_tps"]["count"] >= 3, run
    assert report["pgbench"]["aborted_clients"] == 0
    assert report["machine"]["cpus"] == os.cpu_count()
