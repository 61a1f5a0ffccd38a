"""Scheduled backups on a real local cluster (real agents, PostgreSQL, etcd, pgBackRest): three
members share a schedule of every minute, and each slot gets one backup, taken from a streaming
replica, whichever member claimed it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog

from pgsidecar.backup import StanzaInfo
from pgsidecar.backup.member import member_pgbackrest
from pgsidecar.cli import main
from pgsidecar.config import load_config
from pgsidecar.lab.local import LocalCluster
from tests.support.clusterutil import stop_local_cluster, wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("pgbackrest") is None, reason="pgbackrest is not installed (scripts/setup.sh)"
)


@pytest.fixture
def cluster_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pgsc-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d / "c"
    finally:
        stop_local_cluster(LocalCluster(d / "c"))  # whatever `local up` got to start
        shutil.rmtree(d, ignore_errors=True)


def info(lc: LocalCluster) -> StanzaInfo | None:
    br = member_pgbackrest(load_config(lc.config_path(lc.members[0].name)), structlog.get_logger())
    assert br is not None
    try:
        return asyncio.run(br.info())
    except Exception:
        return None


def all_replicas_streaming(lc: LocalCluster) -> bool:
    master = lc.master()
    if master is None:
        return False
    return all(m.get("streaming") is True for m in lc.status() if m.get("name") != master)


def scheduled_actions(lc: LocalCluster) -> list[dict[str, Any]]:
    out = []
    for m in lc.members:
        path = lc.dir / m.name / "journal.jsonl"
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec["kind"] == "action" and rec["body"].get("name") == "scheduled_backup":
                out.append({**rec["body"], "node": rec["node"]})
    return out


@pytest.mark.integration
def test_three_members_take_one_backup_per_slot_from_a_replica(cluster_dir: Path) -> None:
    argv = ["local", "up", "--nodes", "3", "--dir", str(cluster_dir), "--ttl", "5", "--no-kafka"]
    # incremental every minute; the first, with no full before it, is taken as a full
    schedule = ["--backup-schedule", "full=0 0 1 1 *", "--backup-schedule", "incr=* * * * *"]
    assert main([*argv, *schedule]) == 0
    lc = LocalCluster(cluster_dir)
    # A slot that comes before the replicas stream is backed up from the master, as it should be
    # (no replica to copy from yet); the replica rule is checked on the slots that start after
    # every replica was seen streaming (a slot is a whole minute: the next one from then on).
    wait_for(lambda: all_replicas_streaming(lc), 120, interval=0.5, what="every replica streaming")
    streaming_since = datetime.now(UTC)
    first_slot_with_replicas = (streaming_since + timedelta(minutes=1)).strftime(
        "%Y-%m-%dT%H:%M:00Z"
    )

    def after_streaming_ok() -> int:
        return sum(
            1
            for a in scheduled_actions(lc)
            if a["outcome"] == "ok" and a["slot"] >= first_slot_with_replicas
        )

    def backups() -> int:
        st = info(lc)
        return len(st.backups) if st is not None else 0

    wait_for(lambda: backups() >= 3, 300, interval=2, what="three scheduled backups")
    wait_for(lambda: after_streaming_ok() >= 2, 300, interval=2, what="two backups with replicas")

    def settled() -> tuple[list[dict[str, Any]], StanzaInfo] | None:
        """The journals and the repository at a moment when no scheduled backup runs (the
        journals read again after the repository say the same)."""
        before = scheduled_actions(lc)
        st = info(lc)
        claimed = [a for a in before if a["outcome"] in ("claimed", "taken_over")]
        ended = [a for a in before if a["outcome"] in ("ok", "failed")]
        if st is None or len(claimed) != len(ended) or scheduled_actions(lc) != before:
            return None
        return before, st

    actions, st = wait_for(settled, 120, interval=1, what="a moment with no backup running")
    claims = [a for a in actions if a["outcome"] in ("claimed", "taken_over")]
    ok = [a for a in actions if a["outcome"] == "ok"]
    # one claim per slot across the three members, and no slot claimed twice
    per_slot = Counter(a["slot"] for a in claims)
    assert per_slot and set(per_slot.values()) == {1}, per_slot
    # every backup in the repository is one successful slot's, started in that slot's minute
    assert len(st.backups) == len(ok), (st.backups, ok)
    minutes = sorted(b.start.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:00Z") for b in st.backups)
    assert minutes == sorted(a["slot"] for a in ok)
    assert sorted(b.label for b in st.backups) == sorted(a["label"] for a in ok)
    # from a streaming replica, never the master, once the replicas stream (no failover here:
    # the master is the one that bootstrapped)
    master = lc.master()
    with_replicas = [a for a in ok if a["slot"] >= first_slot_with_replicas]
    assert len(with_replicas) >= 2, ok
    for a in with_replicas:
        assert a["source"] != master, a
        manifest = lc.dir / "backup" / "backup" / lc.cluster / a["label"] / "backup.manifest"
        assert "option-backup-standby=true" in manifest.read_text(), a["label"]
    assert [b.type for b in st.backups][:2] == ["full", "incr"]
    # the outcome on /metrics, which the alert rules use (deploy/monitoring): every member
    # exports the cluster-wide record, the newest success no older than the newest ok backup
    with urllib.request.urlopen(f"{lc.member(master).api_url}/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    success = re.search(
        r'^pgsidecar_backup_last_success_timestamp_seconds\{type="incr"\} (\S+)$', metrics, re.M
    )
    assert success is not None and float(success.group(1)) > streaming_since.timestamp(), metrics
    assert re.search(r'^pgsidecar_backup_last_scheduled_failed\{type="incr"\} 0', metrics, re.M)
