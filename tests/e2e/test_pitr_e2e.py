"""Point-in-time recovery on real processes: a local cluster archives into its pgBackRest
repository, and `local up --restore-from DIR/backup --target-time TS` makes a new cluster that
holds every commit before TS and none after, on a new timeline, archiving into its own
repository and leaving the source's untouched."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog

from pgsidecar.backup.member import member_pgbackrest
from pgsidecar.cli import main
from pgsidecar.config import load_config
from pgsidecar.lab.local import LocalCluster
from tests.support.clusterutil import stop_local_cluster, wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("pgbackrest") is None, reason="pgbackrest is not installed (scripts/setup.sh)"
)

UP = ["--ttl", "5", "--no-kafka"]


@pytest.fixture
def dirs() -> Iterator[tuple[Path, Path]]:
    d = Path(tempfile.mkdtemp(prefix="pgsc-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d / "src", d / "dst"
    finally:
        for sub in ("dst", "src"):
            with contextlib.suppress(Exception):  # the other cluster is stopped all the same
                stop_local_cluster(LocalCluster(d / sub))
        shutil.rmtree(d, ignore_errors=True)


def sql(lc: LocalCluster, name: str, text: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(lc.dsn(name), autocommit=True) as conn:
        cur = conn.execute(text)
        return cur.fetchall() if cur.description else []


def archive_max(lc: LocalCluster) -> str | None:
    br = member_pgbackrest(load_config(lc.config_path(lc.members[0].name)), structlog.get_logger())
    assert br is not None
    try:
        st = asyncio.run(br.info())
    except Exception:
        return None
    return st.archives[-1].max if st.archives else None


@pytest.mark.integration
def test_a_cluster_restored_to_a_time_has_the_commits_before_it_and_none_after(
    dirs: tuple[Path, Path],
) -> None:
    src_dir, dst_dir = dirs
    assert main(["local", "up", "--nodes", "1", "--dir", str(src_dir), *UP, "--backup"]) == 0
    src = LocalCluster(src_dir)
    master = src.master()
    assert master is not None
    wait_for(lambda: archive_max(src), 60, what="the stanza and its first archived WAL")
    assert main(["backup", "--dir", str(src_dir)]) == 0

    sql(src, master, "CREATE TABLE t (v int)")
    sql(src, master, "INSERT INTO t SELECT generate_series(1, 10)")
    time.sleep(1.5)
    ((target,),) = sql(src, master, "SELECT now()")
    time.sleep(1.5)
    sql(src, master, "INSERT INTO t SELECT generate_series(11, 20)")
    ((seg,),) = sql(src, master, "SELECT pg_walfile_name(pg_current_wal_lsn())")
    src_timeline = int(seg[:8], 16)
    sql(src, master, "SELECT pg_switch_wal()")
    wait_for(lambda: (archive_max(src) or "") >= seg, 60, what=f"segment {seg} archived")

    argv = ["local", "up", "--nodes", "2", "--dir", str(dst_dir), *UP]
    restore = ["--restore-from", str(src_dir / "backup"), "--target-time", target.isoformat()]
    assert main([*argv, *restore]) == 0
    dst = LocalCluster(dst_dir)
    new_master = dst.master()
    assert new_master is not None
    assert sql(dst, new_master, "SELECT v FROM t ORDER BY v") == [(v,) for v in range(1, 11)]
    # on a timeline of its own (the recovery's promotion, then the agent's)
    ((tl,),) = sql(dst, new_master, "SELECT timeline_id FROM pg_control_checkpoint()")
    assert tl > src_timeline
    # a writable master with a replica that streams the same data
    sql(dst, new_master, "INSERT INTO t VALUES (100)")
    replica = next(m.name for m in dst.members if m.name != new_master)
    wait_for(
        lambda: sql(dst, replica, "SELECT count(*) FROM t")[0][0] == 11,
        60,
        what="the new cluster's replica to stream",
    )
    # it archives into its own repository; the source's archive has no timeline of the restore
    wait_for(lambda: archive_max(dst), 60, what="the new cluster's own stanza")
    assert (dst_dir / "backup" / "archive").is_dir()
    names = [p.name for p in (src_dir / "backup" / "archive").rglob("0*")]
    assert names and max(int(n[:8], 16) for n in names) == src_timeline, names
    assert sql(src, master, "SELECT count(*) FROM t") == [(20,)]
