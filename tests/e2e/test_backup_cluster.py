"""A local cluster of real agents archiving into a pgBackRest repository (real pgBackRest, real
PostgreSQL, real etcd): WAL reaches the repository, a switchover's new master archives its
timeline history and goes on with no gap, and `pgsidecar backup` takes a backup from the
streaming replica and lists it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from pgsidecar.backup import PgBackRest, StanzaInfo
from pgsidecar.backup.member import member_pgbackrest
from pgsidecar.cli import main
from pgsidecar.config import load_config
from pgsidecar.lab.local import LocalCluster
from tests.support.clusterutil import (
    local_cluster,
    repository_dir,
    sql,
    stop_local_cluster,
    wait_for,
)

pytestmark = pytest.mark.skipif(
    shutil.which("pgbackrest") is None, reason="pgbackrest is not installed (scripts/setup.sh)"
)

# "000000020000000000000005" (a segment), "00000002.history", ".partial" of a segment
_SEGMENT_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})(\.partial)?-[0-9a-f]{40}")


@pytest.fixture
def repo_dir() -> Iterator[Path]:
    with repository_dir() as repo:
        yield repo


@pytest.fixture
def cluster(repo_dir: Path) -> Iterator[LocalCluster]:
    extra = {
        "backup.repository.type": "posix",
        "backup.repository.path": str(repo_dir),
        "backup.archive_timeout": 30,
    }
    with local_cluster(nodes=2, ttl=5.0, extra=extra) as lc:
        yield lc


def pgbackrest_of(lc: LocalCluster, name: str) -> PgBackRest:
    br = member_pgbackrest(load_config(lc.config_path(name)), structlog.get_logger("test"))
    assert br is not None
    return br


def info(lc: LocalCluster, name: str) -> StanzaInfo | None:
    try:
        return asyncio.run(pgbackrest_of(lc, name).info())
    except Exception:
        return None


def archive_max(lc: LocalCluster, name: str) -> str | None:
    st = info(lc, name)
    if st is None or not st.archives:
        return None
    return st.archives[-1].max


def write_and_switch(lc: LocalCluster, name: str, value: int) -> str:
    """A commit on ``name``, then a WAL switch: returns the segment that held the commit."""
    sql(lc, name, "CREATE TABLE IF NOT EXISTS t (v int)")
    sql(lc, name, f"INSERT INTO t VALUES ({value})")
    (seg,) = sql(lc, name, "SELECT pg_walfile_name(pg_current_wal_lsn())")[0]
    sql(lc, name, "SELECT pg_switch_wal()")
    return str(seg)


def archived_segments(repo: Path, cluster: str) -> tuple[set[tuple[int, int]], set[int]]:
    """(timeline, segment number) of every WAL segment in the stanza's archive (a .partial
    left by a promotion counts for its old timeline), and the timelines with a history file."""
    segments: set[tuple[int, int]] = set()
    histories: set[int] = set()
    for path in (repo / "archive" / cluster).rglob("*"):
        if path.name.endswith(".history"):
            histories.add(int(path.name.split(".")[0], 16))
            continue
        m = _SEGMENT_RE.match(path.name)
        if m:
            tl, log_id, seg = (int(g, 16) for g in m.groups()[:3])
            segments.add((tl, log_id * 0x100 + seg))  # 16 MB segments: 256 per log id
    return segments, histories


def scrape(lc: LocalCluster, name: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{lc.member(name).api_url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        ln.split()[0]: float(ln.split()[1])
        for ln in text.splitlines()
        if ln.startswith("pgsidecar_archive") or ln.startswith("pgsidecar_backup")
    }


def journal(lc: LocalCluster, name: str) -> list[dict[str, Any]]:
    path = lc.dir / name / "journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def streaming_in_dcs(lc: LocalCluster, master: str) -> list[str]:
    members = lc.read_view().members
    return [n for n, m in members.items() if n != master and m.get("streaming")]


def switchover(lc: LocalCluster) -> str:
    """A switchover to a named streaming replica, asserted once: the target is master, then the
    old master streams from it. (An earlier version retried up to three times and waited only
    for *a* master, which the old one still was: a retry hid both a slow switchover and a lost
    one.)"""
    old = lc.master()
    assert old is not None
    (target, *_) = wait_for(
        lambda: streaming_in_dcs(lc, old), 60, what="a replica published as streaming"
    )
    assert main(["switchover", "--to", target, "--dir", str(lc.dir)]) == 0
    wait_for(lambda: lc.master() == target, 30, what=f"{target} master after the switchover")
    wait_for(
        lambda: (lc.api_status(old) or {}).get("streaming"),
        60,
        what=f"{old} to stream from {target}",
    )
    return target


@pytest.mark.integration
def test_archiving_goes_on_across_a_switchover_then_a_backup_from_the_replica(
    cluster: LocalCluster, repo_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lc = cluster
    first = lc.master()
    assert first is not None
    # the master created the stanza after its bootstrap: the repository answers for it
    wait_for(lambda: archive_max(lc, first), 60, what="the stanza and its first archived WAL")

    seg = write_and_switch(lc, first, 1)
    wait_for(
        lambda: (archive_max(lc, first) or "") >= seg,
        30,
        what=f"segment {seg} in the archive",
    )
    # the replica is configured to fetch WAL from the repository if it falls behind
    replica = next(m.name for m in lc.members if m.name != first)
    (restore_command,) = sql(lc, replica, "SHOW restore_command")[0]
    assert "archive-get" in restore_command and f"--stanza={lc.cluster}" in restore_command
    (archive_mode,) = sql(lc, replica, "SHOW archive_mode")[0]
    assert archive_mode == "on"  # set from the start: a promotion archives without a restart

    second = switchover(lc)
    seg2 = write_and_switch(lc, second, 2)
    timeline = int(seg2[:8], 16)  # the new master writes on a timeline of its own
    assert timeline > int(seg[:8], 16)
    wait_for(
        lambda: (archive_max(lc, second) or "") >= seg2,
        60,
        what=f"segment {seg2} of the new master's timeline in the archive",
    )
    segments, histories = archived_segments(repo_dir, lc.cluster)
    assert timeline in histories, f"no {timeline:08X}.history in the archive"
    # no gap: each timeline's segments are consecutive, and the new timeline starts at (or
    # right after) the segment where the old one ended
    by_timeline: dict[int, list[int]] = {}
    for tl, n in sorted(segments):
        by_timeline.setdefault(tl, []).append(n)
    for tl, numbers in by_timeline.items():
        assert numbers == list(range(numbers[0], numbers[-1] + 1)), f"gap in timeline {tl}"
    previous = max(tl for tl in by_timeline if tl < timeline)
    assert by_timeline[timeline][0] <= by_timeline[previous][-1] + 1
    # pgBackRest agrees: check switches WAL on the new master and finds it archived
    asyncio.run(pgbackrest_of(lc, second).check())
    # the new master's /metrics: its stanza confirmed, a WAL file archived a moment ago
    metrics = wait_for(
        lambda: (
            (m := scrape(lc, second)).get("pgsidecar_archive_last_archived_age_seconds") is not None
            and m
        ),
        30,
        what="the archiver's figures on /metrics",
    )
    assert metrics["pgsidecar_backup_stanza_ok"] == 1
    assert metrics["pgsidecar_archive_last_archived_age_seconds"] < 60
    assert metrics["pgsidecar_archive_archived_count"] >= 1

    # a backup: from the streaming replica (the former master), started on the new master
    replica = first
    wait_for(
        lambda: (lc.api_status(replica) or {}).get("streaming"), 30, what=f"{replica} streaming"
    )
    capsys.readouterr()
    assert main(["backup", "--dir", str(lc.dir)]) == 0
    out = capsys.readouterr().out
    assert f"files from replica {replica}, started on master {second}" in out
    assert main(["backup", "list", "--json", "--dir", str(lc.dir)]) == 0
    doc = json.loads(capsys.readouterr().out)
    (full,) = doc["backups"]
    assert full["type"] == "full" and full["size"] > 0 and full["repo_size"] > 0
    assert full["wal_start"] <= full["wal_stop"] <= doc["archive"][-1]["max"]
    assert full["label"] in out
    manifest = repo_dir / "backup" / lc.cluster / full["label"] / "backup.manifest"
    assert "option-backup-standby=true" in manifest.read_text()
    # an incremental on top of it, listed after it as a table
    assert main(["backup", "--type", "incr", "--dir", str(lc.dir)]) == 0
    capsys.readouterr()
    assert main(["backup", "list", "--dir", str(lc.dir)]) == 0
    table = capsys.readouterr().out
    lines = [ln for ln in table.splitlines() if ln.startswith("| 2")]
    assert len(lines) == 2 and "| full " in lines[0] and "| incr " in lines[1], table

    # reinit: the replica's data comes from the repository (restore, then it streams)
    sql(lc, second, "INSERT INTO t VALUES (3)")
    assert main(["reinit", replica, "--dir", str(lc.dir), "--timeout", "120"]) == 0
    restores = [
        r["body"]
        for r in journal(lc, replica)
        if r["kind"] == "action" and r["body"].get("name") == "restore_replica"
    ]
    assert [(r["outcome"], r["backup"]) for r in restores] == [("ok", lines[1].split()[1])]
    wait_for(
        lambda: sql(lc, replica, "SELECT count(*) FROM t WHERE v = 3")[0][0] == 1,
        30,
        what="the restored replica to stream the commit made after the backup",
    )


@pytest.mark.integration
def test_local_up_with_backup_then_a_backup_from_the_master(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`local up --backup`: the repository is DIR/backup; with one member, the backup comes
    from the master."""
    d = Path(tempfile.mkdtemp(prefix="pgsc-", dir="/tmp"))
    os.chmod(d, 0o755)
    lc = LocalCluster(d / "c")
    try:
        argv = ["local", "up", "--nodes", "1", "--dir", str(lc.dir), "--ttl", "5", "--no-kafka"]
        assert main([*argv, "--backup"]) == 0
        lc = LocalCluster(d / "c")  # as `local up` created it
        master = lc.master()
        assert master is not None
        wait_for(lambda: archive_max(lc, master), 60, what="the stanza after the bootstrap")
        capsys.readouterr()
        assert main(["backup", "--dir", str(lc.dir), "--type", "diff"]) == 0
        out = capsys.readouterr().out
        assert f"from master {master}" in out
        assert main(["backup", "list", "--json", "--dir", str(lc.dir)]) == 0
        (only,) = json.loads(capsys.readouterr().out)["backups"]
        # a diff with no full before it is taken as a full
        assert only["type"] == "full"
        assert (lc.dir / "backup" / "backup" / lc.cluster / only["label"]).is_dir()

        # the master's next read of the repository (at most a minute after the last) shows
        # the backup's age in `list --json`, in its /status and on /metrics
        def listed() -> dict[str, Any] | None:
            capsys.readouterr()
            assert main(["list", "--json", "--dir", str(lc.dir)]) == 0
            health = json.loads(capsys.readouterr().out)["backup"]
            return health if health and health.get("last_backup") == only["label"] else None

        health = wait_for(listed, 90, interval=2, what="list --json to show the backup")
        assert health["member"] == master and 0 <= health["last_backup_age"] < 300
        assert health["last_backup_type"] == "full" and health["archive_failing"] is False
        status = (lc.api_status(master) or {})["backup"]
        assert status["last_backup"] == only["label"] and status["last_backup_age"] < 300
        assert status["last_archived_age"] is not None and status["stanza_ok"] is True
        assert scrape(lc, master)["pgsidecar_backup_last_age_seconds"] < 300
        capsys.readouterr()
        assert main(["list", "--dir", str(lc.dir)]) == 0
        line = capsys.readouterr().out.splitlines()[-1]
        assert line.startswith(f" Backups (master {master}): WAL archiving ok;"), line
        assert f"({only['label']}, full)" in line, line

        # archiving that fails (the stanza's archive unreadable to PostgreSQL's OS user) is
        # reported, and the master keeps serving; once it can archive again, that is seen too
        def archive_failing() -> bool | None:
            health = (lc.api_status(master) or {}).get("backup") or {}
            failing = health.get("archive_failing")
            return failing if isinstance(failing, bool) else None

        stanza_archive = lc.dir / "backup" / "archive" / lc.cluster
        mode = stanza_archive.stat().st_mode & 0o7777
        sql(lc, master, "CREATE TABLE h (v int)")
        os.chmod(stanza_archive, 0)
        try:
            sql(lc, master, "INSERT INTO h VALUES (1)")
            sql(lc, master, "SELECT pg_switch_wal()")
            wait_for(archive_failing, 60, interval=1, what="/status to report archiving failing")
            sql(lc, master, "INSERT INTO h VALUES (2)")
            assert (lc.api_status(master) or {}).get("role") == "master"
            capsys.readouterr()
            assert main(["list", "--dir", str(lc.dir)]) == 0
            assert "WAL archiving FAILING" in capsys.readouterr().out.splitlines()[-1]
        finally:
            os.chmod(stanza_archive, mode)
        sql(lc, master, "INSERT INTO h VALUES (3)")
        sql(lc, master, "SELECT pg_switch_wal()")  # wakes the archiver, which retries
        wait_for(lambda: archive_failing() is False, 90, interval=1, what="archiving to recover")
        assert sql(lc, master, "SELECT count(*) FROM h") == [(3,)]
    finally:
        stop_local_cluster(LocalCluster(d / "c"))  # whatever `local up` got to start
        shutil.rmtree(d, ignore_errors=True)
