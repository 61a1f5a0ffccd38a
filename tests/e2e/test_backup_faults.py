"""Backups and archiving under faults, on real processes (pgBackRest, PostgreSQL, etcd, agents):

- the repository unreachable (its directory gone, as an unmounted volume would be) or full (a
  size-limited tmpfs filled up): the master keeps serving writes, the failure shows on /metrics,
  and once the repository is back (or has room again) the WAL written meanwhile reaches it with
  no gap;
- the master killed while a backup from its replica runs: the backup ends (an error, not a hang),
  the repository stays consistent (no partial backup listed, `check` passes), and the next backup
  runs on the new topology: from the old master, now a replica of the new one.

A backup killed midway (pgBackRest's own process) is in tests/e2e/test_pgbackrest.py."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgsidecar.cli import main
from pgsidecar.lab.local import LocalCluster
from tests.e2e.test_backup_cluster import (
    archive_max,
    archived_segments,
    info,
    pgbackrest_of,
    scrape,
    streaming_in_dcs,
    write_and_switch,
)
from tests.support.clusterutil import local_cluster, repository_dir, sql, wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("pgbackrest") is None, reason="pgbackrest is not installed (scripts/setup.sh)"
)


@pytest.fixture
def repo_dir() -> Iterator[Path]:
    with repository_dir() as repo:
        yield repo


def mount_small_tmpfs(where: Path) -> None:
    """A 96 MiB file system at ``where`` (the repository's parent), or skip saying why."""
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96m,mode=755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a full repository here: {done.stderr.strip()}")


def fill(where: Path) -> Path:
    """Fill the file system holding ``where`` to the last byte; the filler file."""
    filler = where / "filler"
    with open(filler, "wb") as f:
        chunk = b"\0" * (1 << 20)
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass
    assert shutil.disk_usage(where).free < (1 << 20), "the repository's file system is not full"
    return filler


def cluster_with_repository(repo_dir: Path, nodes: int = 2):  # type: ignore[no-untyped-def]
    extra = {
        "backup.repository.type": "posix",
        "backup.repository.path": str(repo_dir),
        "backup.archive_timeout": 30,
    }
    return local_cluster(nodes=nodes, ttl=5.0, extra=extra)


def archiver(lc: LocalCluster, name: str) -> tuple[int, int]:
    """(archived_count, failed_count) of pg_stat_archiver on ``name``."""
    ((archived, failed),) = sql(
        lc, name, "SELECT archived_count, failed_count FROM pg_stat_archiver"
    )
    return int(archived), int(failed)


@pytest.mark.integration
@pytest.mark.parametrize("fault", ["gone", "full"])
def test_an_unreachable_or_full_repository_does_not_stop_the_master(
    repo_dir: Path, fault: str
) -> None:
    if fault == "full":
        mount_small_tmpfs(repo_dir.parent)
    with cluster_with_repository(repo_dir) as lc:
        master = lc.master()
        assert master is not None
        wait_for(lambda: archive_max(lc, master), 60, what="the stanza and its first archived WAL")
        before = write_and_switch(lc, master, 0)
        wait_for(lambda: (archive_max(lc, master) or "") >= before, 30, what=f"{before} archived")
        _, failed_before = archiver(lc, master)

        away = repo_dir.with_name("backup.away")
        filler: Path | None = None
        if fault == "gone":
            repo_dir.rename(away)  # the repository is gone, as an unmounted volume would be
        else:
            filler = fill(repo_dir.parent)  # no room for one more segment
        try:
            # the master goes on committing and switching segments while nothing can archive
            written = [write_and_switch(lc, master, v) for v in range(1, 4)]
            wait_for(
                lambda: archiver(lc, master)[1] > failed_before,
                30,
                what="PostgreSQL's archiver to report the failed archive attempts",
            )
            metrics = wait_for(
                lambda: (m := scrape(lc, master)).get("pgsidecar_archive_failing") == 1 and m,
                30,
                what="/metrics to show the archiving failing",
            )
            assert metrics["pgsidecar_archive_failed_count"] > failed_before
            # still the master, still writable, its replica still streaming from it
            assert lc.master() == master
            status = lc.api_status(master) or {}
            assert status.get("role") == "master" and status.get("lease_held") is True
            sql(lc, master, "INSERT INTO t VALUES (100)")
            assert streaming_in_dcs(lc, master)
        finally:
            if filler is not None:
                filler.unlink()
            else:
                away.rename(repo_dir)

        # the repository is back (or has room again): the segments written meanwhile reach it, with no gap
        after = write_and_switch(lc, master, 4)
        wait_for(
            lambda: (archive_max(lc, master) or "") >= after,
            90,
            what=f"the archiver to catch up to {after} once the repository is back",
        )
        segments, _ = archived_segments(repo_dir, lc.cluster)
        numbers = sorted(n for tl, n in segments if tl == int(before[:8], 16))
        assert numbers == list(range(numbers[0], numbers[-1] + 1)), "a gap in the archive"
        for seg in written:
            assert int(seg[8:16], 16) * 0x100 + int(seg[16:], 16) in numbers, seg
        wait_for(
            lambda: scrape(lc, master).get("pgsidecar_archive_failing") == 0,
            30,
            what="/metrics to show the archiving healthy again",
        )


def backup_in_progress(lc: LocalCluster, master: str) -> bool:
    """pgBackRest holds its session on the master (backup start done, files being copied)."""
    try:
        rows = sql(
            lc,
            master,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgBackRest%'",
        )
    except psycopg.Error:
        return False
    return bool(rows[0][0])


@pytest.mark.integration
def test_a_failover_during_a_backup_ends_it_and_the_next_runs_on_the_new_topology(
    repo_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with cluster_with_repository(repo_dir) as lc:
        old = lc.master()
        assert old is not None
        wait_for(lambda: archive_max(lc, old), 60, what="the stanza and its first archived WAL")
        # enough data that the backup's copy lasts some seconds
        sql(
            lc,
            old,
            "CREATE TABLE big AS SELECT g, repeat(md5(g::text), 10) AS v "
            "FROM generate_series(1, 300000) AS g",
        )
        replica = wait_for(lambda: streaming_in_dcs(lc, old), 60, what="a streaming replica")[0]
        (lsn,) = sql(lc, old, "SELECT pg_current_wal_lsn()::text")[0]
        wait_for(
            lambda: sql(lc, replica, f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'")[0][0],
            60,
            what="the replica to replay the table",
        )

        cmd = [sys.executable, "-m", "pgsidecar", "backup", "--dir", str(lc.dir)]
        backup = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            wait_for(lambda: backup_in_progress(lc, old), 30, interval=0.05, what="the backup")
            lc.kill_member(old)  # the master dies while its replica's files are copied
            out, errors = backup.communicate(timeout=120)
        finally:
            if backup.poll() is None:
                backup.kill()
                backup.wait(timeout=10)
        # the backup ended, with an error that says so (not a hang, not a success)
        assert backup.returncode != 0, out
        assert f"files from replica {replica}, started on master {old}" in out
        assert "backup failed" in errors, errors

        wait_for(lambda: lc.master() == replica, 60, what=f"{replica} master after the failover")
        # the repository is consistent: the interrupted backup is not listed
        st = info(lc, replica)
        assert st is not None and st.backups == [], st
        lc.start_member(old)  # the old master rejoins as a replica of the new one
        wait_for(
            lambda: (lc.api_status(old) or {}).get("streaming"),
            90,
            what=f"{old} to rejoin and stream from {replica}",
        )
        wait_for(lambda: streaming_in_dcs(lc, replica) == [old], 30, what=f"{old} published")

        # the next backup runs on the new topology: files from the old master, now a replica
        capsys.readouterr()
        assert main(["backup", "--dir", str(lc.dir)]) == 0
        out = capsys.readouterr().out
        assert f"files from replica {old}, started on master {replica}" in out
        assert main(["backup", "list", "--json", "--dir", str(lc.dir)]) == 0
        (full,) = json.loads(capsys.readouterr().out)["backups"]
        assert full["type"] == "full" and full["size"] > 100 * 1024 * 1024
        # pgBackRest's own check on the new master: archiving works on its timeline
        asyncio.run(pgbackrest_of(lc, replica).check())
