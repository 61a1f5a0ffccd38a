"""A new cluster bootstrapped by its own agents from another cluster's pgBackRest repository (the
agent config's ``bootstrap`` section), on real processes: PostgreSQL 15, pgBackRest, etcd.

The source is a local cluster that archives and has a backup; a time is taken between two
commits. The new cluster's agents start with empty data directories and a bootstrap section
naming the source's repository, its stanza and that time. The member that wins the initialise
race restores and promotes; the other clones from it. The new master holds the first commit and
not the second, is on a timeline after the source's, archives into its own stanza, and the
source's stanza gets no WAL of it.

A restore keeps the source's system identifier, so nothing that compares system identifiers can
tell the two clusters apart: what keeps the new cluster from ever acting as the source is its
own name (its stanza and its DCS keys) — checked here as the DCS holding nothing of it under the
source's name."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog

from events.dcs.factory import create_dcs
from pgsidecar.backup.member import member_pgbackrest
from pgsidecar.cli import main
from pgsidecar.config import load_config
from pgsidecar.lab.local import LocalCluster
from tests.support.clusterutil import clusters_dir, sql, wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("pgbackrest") is None, reason="pgbackrest is not installed (scripts/setup.sh)"
)


@pytest.fixture
def dirs() -> Iterator[tuple[Path, Path]]:
    with clusters_dir() as d:
        yield d / "src", d / "dst"


def archive_max(lc: LocalCluster) -> str | None:
    br = member_pgbackrest(load_config(lc.config_path(lc.members[0].name)), structlog.get_logger())
    assert br is not None
    try:
        st = asyncio.run(br.info())
    except Exception:
        return None
    return st.archives[-1].max if st.archives else None


def actions(lc: LocalCluster, name: str, action: str) -> list[dict[str, Any]]:
    path = lc.dir / name / "journal.jsonl"
    records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [r["body"] for r in records if r["kind"] == "action" and r["body"].get("name") == action]


def read_view_as(lc: LocalCluster, cluster: str) -> Any:
    """The DCS view of ``cluster`` in ``lc``'s own store."""
    cfg = load_config(lc.config_path(lc.members[0].name))

    async def go() -> Any:
        dcs = create_dcs(cfg.dcs, cluster)
        await dcs.connect()
        try:
            return await dcs.read_cluster()
        finally:
            await dcs.close()

    return asyncio.run(go())


def bootstrapped_cluster(
    src: LocalCluster, dst_dir: Path, nodes: int, target: dict[str, Any]
) -> LocalCluster:
    """A new local cluster named "restored" whose agents have a bootstrap section restoring
    ``src``'s stanza to ``target``, with the source's passwords (the restored database holds
    the source's roles). Created, not started."""
    dst = LocalCluster(dst_dir)
    dst.create(
        nodes=nodes,
        ttl=5,
        cluster="restored",
        backup=True,
        extra={
            "bootstrap": {
                "method": "pgbackrest",
                "repository": {"type": "posix", "path": str(src.dir / "backup")},
                "stanza": src.cluster,
                "target": target,
            }
        },
    )
    for name in ("superuser.secret", "replication.secret"):
        shutil.copy(src.dir / "secrets" / name, dst_dir / "secrets" / name)
    shutil.copy(src.dir / "pgpass", dst_dir / "pgpass")
    return dst


def source_cluster(src_dir: Path) -> LocalCluster:
    """A 1-member local cluster that archives, with a full backup."""
    up = ["local", "up", "--nodes", "1", "--dir", str(src_dir), "--ttl", "5", "--no-kafka"]
    assert main([*up, "--backup"]) == 0
    src = LocalCluster(src_dir)
    master = src.master()
    assert master is not None
    wait_for(lambda: archive_max(src), 60, what="the source's stanza and its first WAL")
    assert main(["backup", "--dir", str(src_dir)]) == 0
    return src


@pytest.mark.integration
def test_agents_with_a_bootstrap_section_restore_a_new_cluster_to_a_time(
    dirs: tuple[Path, Path],
) -> None:
    src_dir, dst_dir = dirs
    src = source_cluster(src_dir)
    master = src.master()
    assert master is not None
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
    ((src_system_id,),) = sql(src, master, "SELECT system_identifier FROM pg_control_system()")
    src_leader = src.read_view().leader

    dst = bootstrapped_cluster(src, dst_dir, 2, {"time": target.isoformat()})
    dst.up(timeout=240)

    new_master = dst.master()
    assert new_master is not None
    assert sql(dst, new_master, "SELECT v FROM t ORDER BY v") == [(v,) for v in range(1, 11)]
    (restored,) = actions(dst, new_master, "restore_from_repository")
    assert restored["outcome"] == "ok" and restored["timeline"] > src_timeline
    replica = next(m.name for m in dst.members if m.name != new_master)
    assert actions(dst, replica, "restore_from_repository") == [], "only the winner restores"
    # a timeline of its own: the recovery's promotion, then the agent's
    ((tl,),) = sql(dst, new_master, "SELECT timeline_id FROM pg_control_checkpoint()")
    assert tl > restored["timeline"] > src_timeline
    # nothing of the recovery is left to outrank the agent's postgresql.conf
    ((auto,),) = sql(dst, new_master, "SELECT pg_read_file('postgresql.auto.conf')")
    assert "recovery_target" not in auto and "restore_command" not in auto, auto

    # a restore keeps the system identifier: the clusters differ by name, in the DCS and the
    # repository, and the new one never wrote under the source's name
    ((system_id,),) = sql(dst, new_master, "SELECT system_identifier FROM pg_control_system()")
    assert system_id == src_system_id and restored["system_id"] == str(src_system_id)
    view = dst.read_view()
    assert view.initialize == new_master and set(view.members) == {"pg1", "pg2"}
    under_source_name = read_view_as(dst, src.cluster)
    assert under_source_name.initialize is None and not under_source_name.members
    assert src.read_view().leader == src_leader, "the source cluster did not notice"

    # a writable master with a replica that streams the same data
    sql(dst, new_master, "INSERT INTO t VALUES (100)")
    wait_for(
        lambda: sql(dst, replica, "SELECT count(*) FROM t")[0][0] == 11,
        60,
        what="the new cluster's replica to stream",
    )
    # it archives into its own stanza; the source's stanza holds no timeline of the new cluster
    wait_for(lambda: archive_max(dst), 90, what="the new cluster's own stanza")
    assert (dst_dir / "backup" / "archive" / "restored").is_dir()
    src_archive = src_dir / "backup" / "archive" / src.cluster
    names = [p.name for p in src_archive.rglob("0*")]
    assert names and max(int(n[:8], 16) for n in names) == src_timeline, names
    assert sql(src, master, "SELECT count(*) FROM t") == [(20,)]


@pytest.mark.integration
def test_a_target_after_the_end_of_the_archive_fails_clearly_and_leaves_nothing_behind(
    dirs: tuple[Path, Path],
) -> None:
    """PostgreSQL ends the recovery before the target (the archive ends first) and exits: the
    restore is recorded as failed with PostgreSQL's own words, the partial data wiped, the
    initialize key given back (the race runs again), and no member is master."""
    src_dir, dst_dir = dirs
    src = source_cluster(src_dir)
    master = src.master()
    assert master is not None
    ((now,),) = sql(src, master, "SELECT now()")
    dst = bootstrapped_cluster(src, dst_dir, 1, {"time": (now + timedelta(hours=1)).isoformat()})
    dst.start_etcd()
    dst.start_member("pg1")

    def failed() -> list[dict[str, Any]]:
        path = dst_dir / "pg1" / "journal.jsonl"
        if not path.exists():
            return []
        return [
            a for a in actions(dst, "pg1", "restore_from_repository") if a["outcome"] == "failed"
        ]

    (first, *_) = wait_for(failed, 120, what="the failed restore recorded")
    assert "recovery ended before configured recovery target was reached" in first["error"], first
    # the key went back and the race ran again (and failed again the same way)
    attempts = wait_for(lambda: len(failed()) >= 2 and failed(), 120, what="a second attempt")
    # each attempt got as far as PostgreSQL: the one before had wiped its partial restore (on
    # a data directory left as it was, pgBackRest refuses at once: "not empty")
    assert all("recovery ended before" in a["error"] for a in attempts), attempts
    assert dst.read_view().leader is None and dst.master() is None
    assert src.read_view().leader is not None and sql(src, master, "SELECT 1") == [(1,)]
