"""Point-in-time recovery on real processes: a local cluster archives into its pgBackRest
repository, and `local up --restore-from DIR/backup` with `--target-time TS`, `--target-lsn LSN`
or `--target-name NAME` makes a new cluster that holds every commit before the target and none
after, on a new timeline, archiving into its own repository and leaving the source's untouched.
One source cluster and one backup serve every target (a module fixture)."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import structlog

from pgsidecar.backup.member import member_pgbackrest
from pgsidecar.cli import main
from pgsidecar.config import load_config
from pgsidecar.lab.local import LocalCluster
from tests.support.clusterutil import clusters_dir, sql, wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("pgbackrest") is None, reason="pgbackrest is not installed (scripts/setup.sh)"
)

UP = ["--ttl", "5", "--no-kafka"]


@dataclass(frozen=True)
class Source:
    """The source cluster after its writes: rows 1-10, ``time``, rows 11-20, ``lsn`` (the insert
    position), rows 21-30, the restore point ``point``, rows 31-40; all archived."""

    dir: Path
    cluster: LocalCluster
    master: str
    timeline: int
    time: datetime
    lsn: str
    point: str


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    with clusters_dir() as d:  # restored clusters stopped first, then the source
        yield d


def archive_max(lc: LocalCluster) -> str | None:
    br = member_pgbackrest(load_config(lc.config_path(lc.members[0].name)), structlog.get_logger())
    assert br is not None
    try:
        st = asyncio.run(br.info())
    except Exception:
        return None
    return st.archives[-1].max if st.archives else None


@pytest.fixture(scope="module")
def source(root: Path) -> Source:
    src_dir = root / "src"
    assert main(["local", "up", "--nodes", "1", "--dir", str(src_dir), *UP, "--backup"]) == 0
    src = LocalCluster(src_dir)
    master = src.master()
    assert master is not None
    wait_for(lambda: archive_max(src), 60, what="the stanza and its first archived WAL")
    assert main(["backup", "--dir", str(src_dir)]) == 0

    sql(src, master, "CREATE TABLE t (v int)")
    sql(src, master, "INSERT INTO t SELECT generate_series(1, 10)")
    time.sleep(1.5)
    ((target_time,),) = sql(src, master, "SELECT now()")
    time.sleep(1.5)
    sql(src, master, "INSERT INTO t SELECT generate_series(11, 20)")
    # the position after the second commit: an LSN target keeps it and nothing after
    ((lsn,),) = sql(src, master, "SELECT pg_current_wal_insert_lsn()::text")
    sql(src, master, "INSERT INTO t SELECT generate_series(21, 30)")
    sql(src, master, "SELECT pg_create_restore_point('before 31')")
    sql(src, master, "INSERT INTO t SELECT generate_series(31, 40)")
    ((seg,),) = sql(src, master, "SELECT pg_walfile_name(pg_current_wal_lsn())")
    sql(src, master, "SELECT pg_switch_wal()")
    wait_for(lambda: (archive_max(src) or "") >= seg, 60, what=f"segment {seg} archived")
    return Source(src_dir, src, master, int(seg[:8], 16), target_time, lsn, "before 31")


def restored(root: Path, name: str, nodes: int, *target: str) -> tuple[LocalCluster, str]:
    """A new local cluster in ROOT/name restored from the source's repository to ``target``
    (its flag and value); its master."""
    dst_dir = root / name
    argv = ["local", "up", "--nodes", str(nodes), "--dir", str(dst_dir), *UP]
    assert main([*argv, "--restore-from", str(root / "src" / "backup"), *target]) == 0
    dst = LocalCluster(dst_dir)
    new_master = dst.master()
    assert new_master is not None
    # `local up` returns once a master is elected; its promotion may still be finishing
    wait_for(
        lambda: sql(dst, new_master, "SELECT NOT pg_is_in_recovery()") == [(True,)],
        60,
        what="the new master to accept writes",
    )
    return dst, new_master


def rows(lc: LocalCluster, name: str) -> list[int]:
    return [v for (v,) in sql(lc, name, "SELECT v FROM t ORDER BY v")]


@pytest.mark.integration
def test_a_cluster_restored_to_a_time_has_the_commits_before_it_and_none_after(
    root: Path, source: Source
) -> None:
    dst, new_master = restored(root, "dst-time", 2, "--target-time", source.time.isoformat())
    assert rows(dst, new_master) == list(range(1, 11))
    # on a timeline of its own (the recovery's promotion, then the agent's)
    ((tl,),) = sql(dst, new_master, "SELECT timeline_id FROM pg_control_checkpoint()")
    assert tl > source.timeline
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
    assert (root / "dst-time" / "backup" / "archive").is_dir()
    names = [p.name for p in (source.dir / "backup" / "archive").rglob("0*")]
    assert names and max(int(n[:8], 16) for n in names) == source.timeline, names
    assert sql(source.cluster, source.master, "SELECT count(*) FROM t") == [(40,)]


@pytest.mark.integration
def test_a_cluster_restored_to_an_lsn_has_the_commit_before_it_and_not_the_next(
    root: Path, source: Source
) -> None:
    dst, new_master = restored(root, "dst-lsn", 1, "--target-lsn", source.lsn)
    assert rows(dst, new_master) == list(range(1, 21))
    ((tl,),) = sql(dst, new_master, "SELECT timeline_id FROM pg_control_checkpoint()")
    assert tl > source.timeline
    sql(dst, new_master, "INSERT INTO t VALUES (100)")  # writable


@pytest.mark.integration
def test_a_cluster_restored_to_a_restore_point_stops_there(
    root: Path, source: Source, capsys: pytest.CaptureFixture[str]
) -> None:
    dst, new_master = restored(root, "dst-name", 1, "--target-name", source.point)
    assert rows(dst, new_master) == list(range(1, 31))
    # a restore point the archive does not hold: PostgreSQL's own message, no agent started
    capsys.readouterr()
    argv = ["local", "up", "--nodes", "1", "--dir", str(root / "dst-none"), *UP]
    restore = ["--restore-from", str(source.dir), "--target-name", "never made"]
    assert main([*argv, *restore]) == 1
    assert "recovery ended before configured recovery target was reached" in capsys.readouterr().err
    none = LocalCluster(root / "dst-none")
    assert not any((m.dir / "agent.pid").exists() for m in none.members)
