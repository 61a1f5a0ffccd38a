"""A standby cluster on real processes: `local up --standby-of DIR` makes a cluster whose
leader (a standby leader) streams from the source cluster and whose other member cascades from
it; a failover in the source cluster is followed (the standby leader streams from the source's
new master, on its new timeline); nothing in it is ever writable; a failover inside it elects a new standby leader that still
follows the source; `promote-cluster` makes it a normal cluster with exactly one master holding
every row written before, and the source is left untouched."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgsidecar.cli import main
from pgsidecar.lab.local import LocalCluster
from tests.support.clusterutil import clusters_dir, sql, stop_local_cluster, wait_for

UP = ["--ttl", "5", "--no-kafka", "--nodes", "2"]


@pytest.fixture
def dirs() -> Iterator[tuple[Path, Path]]:
    with clusters_dir() as d:
        yield d / "src", d / "dst"


def count(lc: LocalCluster, name: str) -> int | None:
    try:
        return int(sql(lc, name, "SELECT count(*) FROM t")[0][0])
    except psycopg.Error:
        return None


def writes(lc: LocalCluster, name: str, text: str) -> bool:
    try:
        sql(lc, name, text)
    except psycopg.errors.ReadOnlySqlTransaction:
        return False
    return True


def timeline(lc: LocalCluster, name: str) -> int:
    """The timeline a primary writes now (pg_control_checkpoint() is stale after a promotion
    until the next checkpoint)."""
    ((walfile,),) = sql(lc, name, "SELECT pg_walfile_name(pg_current_wal_lsn())")
    return int(walfile[:8], 16)


def roles(lc: LocalCluster) -> dict[str, str]:
    return {r["name"]: r["role"] for r in lc.status()}


def assert_read_only(lc: LocalCluster) -> None:
    for m in lc.members:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            sql(lc, m.name, "INSERT INTO t VALUES (-1)")
        assert sql(lc, m.name, "SELECT pg_is_in_recovery()") == [(True,)]


def standby_leader(lc: LocalCluster) -> str | None:
    leaders = [n for n, r in roles(lc).items() if r == "standby_leader"]
    return leaders[0] if len(leaders) == 1 else None


@pytest.mark.integration
def test_standby_cluster_follows_fails_over_read_only_and_is_promoted(
    dirs: tuple[Path, Path],
) -> None:
    src_dir, dst_dir = dirs
    assert main(["local", "up", "--dir", str(src_dir), *UP]) == 0
    src = LocalCluster(src_dir)
    master = src.master()
    assert master is not None
    sql(src, master, "CREATE TABLE t (v int)")
    sql(src, master, "INSERT INTO t SELECT generate_series(1, 10)")
    first_tl = timeline(src, master)

    assert main(["local", "up", "--dir", str(dst_dir), *UP, "--standby-of", str(src_dir)]) == 0
    dst = LocalCluster(dst_dir)
    leader = standby_leader(dst)
    assert leader is not None, roles(dst)
    other = next(m.name for m in dst.members if m.name != leader)
    assert roles(dst)[other] == "replica"
    assert dst.master() is None, "a standby cluster has no master"
    st = dst.api_status(leader)
    assert st is not None and st["standby_cluster"]["source"]
    assert st["upstream"] == "(source cluster)"

    # rows written on the source reach both members of the standby cluster
    sql(src, master, "INSERT INTO t SELECT generate_series(11, 20)")
    for name in (leader, other):
        wait_for(lambda n=name: count(dst, n) == 20, 60, what=f"{name} to have the source's rows")
    assert_read_only(dst)

    # the source fails over: its master's agent and PostgreSQL die, its replica is promoted on a
    # new timeline; the standby cluster follows the new master (the source's other address)
    src.kill_member(master)
    src_master = wait_for(
        lambda: m if (m := src.master()) not in (None, master) else None,
        60,
        what="the source's replica to be promoted",
    )
    # the lease is taken before the promotion ends: write once it accepts writes
    wait_for(
        lambda: writes(src, src_master, "INSERT INTO t SELECT generate_series(21, 25)"),
        30,
        what=f"{src_master} to accept writes",
    )
    wait_for(
        lambda: count(dst, leader) == 25,
        60,
        what="the standby leader to follow the source's new master",
    )
    src_tl = timeline(src, src_master)
    assert src_tl > first_tl
    ((dst_tl,),) = sql(dst, leader, "SELECT received_tli FROM pg_stat_wal_receiver")
    assert dst_tl == src_tl, "the standby leader receives the source's new timeline"
    master = src_master

    # the standby leader's agent dies: the other member becomes standby leader, still
    # following the source and still read-only
    dst.kill_member(leader)
    wait_for(lambda: standby_leader(dst) == other, 60, what=f"{other} to become standby leader")
    sql(src, master, "INSERT INTO t SELECT generate_series(26, 35)")
    wait_for(lambda: count(dst, other) == 35, 60, what="the new standby leader to stream")
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        sql(dst, other, "INSERT INTO t VALUES (-1)")
    assert dst.master() is None
    # the old standby leader comes back as a replica of the new one
    dst.start_member(leader, detach=True)
    dst.wait_healthy(timeout=120)
    wait_for(lambda: count(dst, leader) == 35, 60, what="the returned member to catch up")
    assert_read_only(dst)

    # promote-cluster: exactly one master, holding every row written before
    assert main(["promote-cluster", "--dir", str(dst_dir), "--wait", "60"]) == 0
    new_master = wait_for(dst.master, 60, what="a master in the promoted cluster")
    assert new_master == other
    assert [n for n, r in roles(dst).items() if r == "master"] == [new_master]
    assert count(dst, new_master) == 35
    wait_for(
        lambda: writes(dst, new_master, "INSERT INTO t VALUES (1000)"),
        30,
        what=f"{new_master} to accept writes",
    )
    dst.wait_healthy(timeout=120)
    wait_for(lambda: count(dst, leader) == 36, 60, what="the replica to follow the new master")

    # the source is untouched: same master, same timeline, none of the standby's writes
    assert src.master() == master
    assert sql(src, master, "SELECT count(*), max(v) FROM t") == [(35, 35)]
    assert timeline(src, master) == src_tl
    assert sql(dst, new_master, "SELECT count(*) FROM t WHERE v = 1000") == [(1,)]
    assert sql(dst, new_master, "SELECT pg_is_in_recovery()") == [(False,)]


@pytest.mark.integration
@pytest.mark.skipif(
    shutil.which("pgbackrest") is None, reason="pgbackrest is not installed (scripts/setup.sh)"
)
def test_standby_leader_replays_the_source_archive_when_no_source_member_answers(
    dirs: tuple[Path, Path],
) -> None:
    """The source archives (--backup); the standby cluster gets its restore_command. WAL the
    source wrote while the standby leader was down, and archived, reaches the standby leader
    after the whole source cluster has stopped: from the repository, not from a stream."""
    src_dir, dst_dir = dirs
    one = ["--ttl", "5", "--no-kafka", "--nodes", "1"]
    assert main(["local", "up", "--dir", str(src_dir), *one, "--backup"]) == 0
    src = LocalCluster(src_dir)
    master = src.master()
    assert master is not None
    sql(src, master, "CREATE TABLE t (v int)")
    sql(src, master, "INSERT INTO t SELECT generate_series(1, 10)")

    assert main(["local", "up", "--dir", str(dst_dir), *one, "--standby-of", str(src_dir)]) == 0
    dst = LocalCluster(dst_dir)
    leader = standby_leader(dst)
    assert leader is not None, roles(dst)
    wait_for(lambda: count(dst, leader) == 10, 60, what="the standby leader to have the rows")

    # the standby leader is down while the source writes, archives, and then stops entirely
    dst.kill_member(leader)
    sql(src, master, "INSERT INTO t SELECT generate_series(11, 20)")
    ((segment,),) = sql(src, master, "SELECT pg_walfile_name(pg_current_wal_lsn())")
    sql(src, master, "SELECT pg_switch_wal()")
    wait_for(
        lambda: sql(src, master, "SELECT last_archived_wal FROM pg_stat_archiver")[0][0] >= segment,
        60,
        what=f"the source to archive {segment}",
    )
    stop_local_cluster(src)

    dst.start_member(leader, detach=True)
    wait_for(lambda: standby_leader(dst) == leader, 60, what=f"{leader} to lead the standby again")
    wait_for(
        lambda: count(dst, leader) == 20, 60, what="the rows written meanwhile, from the archive"
    )
    # nothing streams (no source member runs): the rows came through restore_command
    assert sql(
        dst, leader, "SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'"
    ) == [(0,)]
    assert_read_only(dst)
