"""pgsidecar.backup.pgbackrest against real pgBackRest (Debian's package) and real PostgreSQL 15.

Each test has its own /tmp directory (repository included), free ports, and a Lab that stops every
PostgreSQL it started. pgBackRest runs as the postgres OS user, as the agent runs it when root.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from pgsidecar.backup import (
    BackupError,
    BackupSettings,
    PgBackRest,
    PgInstance,
    PosixRepository,
    RecoveryTarget,
)
from pgsidecar.config import slot_name
from pgsidecar.postgres.control import PostgresControl
from pgsidecar.procutil import free_port, os_user_ids
from tests.support.pgtestutil import FAST_PARAMS, OS_USER, PG_BIN, Lab, query, wait_for

pytestmark = pytest.mark.integration

STANZA = "main"


class Member:
    """A PostgreSQL member (PostgresControl) with its pgBackRest (stanza ``stanza``)."""

    def __init__(self, ctl: PostgresControl, br: PgBackRest) -> None:
        self.ctl = ctl
        self.br = br

    async def sql(self, text: str, params: object = None) -> list[tuple[Any, ...]]:
        return await query(self.ctl.superuser_conninfo(), self.ctl.passfile, text, params)


def new_member(
    lab: Lab,
    name: str,
    *,
    stanza: str = STANZA,
    archive: bool = True,
    from_template: bool = True,
    settings: BackupSettings | None = None,
    br_dir: str = "state",
) -> Member:
    """``br_dir``: the directory (under the member's) pgBackRest's config, logs and locks go in."""
    port = free_port()
    base = lab.root / name
    settings = settings or BackupSettings(repository=PosixRepository(path=lab.root / "repo"))
    br = PgBackRest(
        settings,
        stanza,
        PgInstance(data_dir=base / "data", port=port),
        state_dir=base / br_dir,
        os_user=OS_USER,
        passfile=base / "state" / "pgpass",
        log=lab.log,
    )
    params: dict[str, str | int | float | bool] = dict(FAST_PARAMS)
    if archive:
        params.update(br.archive_parameters())
    ctl = lab.control(name, from_template=from_template, port=port, parameters=params)
    br.write_config()
    return Member(ctl, br)


async def archiving_primary(lab: Lab, name: str = "m1", **kw: Any) -> Member:
    m = new_member(lab, name, **kw)
    m.ctl.write_config("primary", None, None)
    await m.ctl.start(30)
    await m.br.stanza_create()
    return m


async def switch_and_wait_archived(m: Member, within: float = 30) -> str:
    """Switch WAL; wait until the switched segment is in the repository; return its name."""
    (segment,) = (await m.sql("SELECT pg_walfile_name(pg_switch_wal())"))[0]

    async def archived() -> bool:
        rows = await m.sql("SELECT last_archived_wal FROM pg_stat_archiver")
        return rows[0][0] is not None and rows[0][0] >= segment

    await wait_for(archived, within, what=f"{segment} archived")
    return str(segment)


def recovery_signal(data_dir: Path) -> None:
    """The agent's write_config('primary') removes recovery.signal; a restored cluster that must
    recover to a target needs it back (the wiring does this for PITR)."""
    path = data_dir / "recovery.signal"
    path.write_text("")
    uid, gid = os_user_ids(OS_USER)
    os.chown(path, uid, gid)


async def wait_promoted(m: Member, within: float = 60) -> None:
    async def promoted() -> bool:
        return not (await m.sql("SELECT pg_is_in_recovery()"))[0][0]

    await wait_for(promoted, within, what=f"{m.ctl.name} promoted")


async def timeline_of(m: Member) -> int:
    (name,) = (await m.sql("SELECT pg_walfile_name(pg_current_wal_lsn())"))[0]
    return int(name[:8], 16)


def pgbench_init(m: Member, scale: int) -> float:
    started = time.monotonic()
    subprocess.run(
        [
            str(PG_BIN / "pgbench"),
            "-i",
            "-q",
            "-s",
            str(scale),
            "-h",
            "127.0.0.1",
            "-p",
            str(m.ctl.settings.port),
            "-U",
            "postgres",
            "postgres",
        ],
        env={**os.environ, "PGPASSFILE": str(m.ctl.passfile)},
        check=True,
        capture_output=True,
        timeout=600,
    )
    return time.monotonic() - started


def children_running(config_path: Path, command: str) -> list[int]:
    """pids of this process's pgbackrest children running ``command`` with ``config_path``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        args = [a.decode() for a in argv if a]
        if (
            ppid == os.getpid()
            and args
            and args[0].endswith("pgbackrest")
            and f"--config={config_path}" in args
            and args[-1] == command
        ):
            found.append(int(entry))
    return found


# ------------------------------------------------------------------------------------- tests


async def test_archiving_reaches_the_repository(lab: Lab) -> None:
    m = await archiving_primary(lab)
    segment = await switch_and_wait_archived(m)
    archive_dir = lab.root / "repo" / "archive" / STANZA / "15-1" / segment[:16]
    assert any(p.name.startswith(segment + "-") for p in archive_dir.iterdir())
    info = await m.br.info()
    assert info.name == STANZA and info.backups == []
    (arch,) = info.archives
    assert arch.id == "15-1" and arch.max is not None and arch.max >= segment
    (system_id,) = (await m.sql("SELECT system_identifier::text FROM pg_control_system()"))[0]
    assert info.system_ids == [int(system_id)]
    # stanza-create (with its check) is idempotent
    await m.br.stanza_create()


async def test_full_then_incremental_listed_with_sizes_and_wal(lab: Lab) -> None:
    m = await archiving_primary(lab)
    await m.sql(
        "CREATE TABLE t AS SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 20000) g"
    )
    full = await m.br.backup("full")
    await m.sql("INSERT INTO t SELECT g, 'y' FROM generate_series(20001, 30000) g")
    incr = await m.br.backup("incr")

    info = await m.br.info()
    assert [b.label for b in info.backups] == [full.label, incr.label]
    assert [b.type for b in info.backups] == ["full", "incr"]
    assert incr.prior == full.label and full.prior is None
    assert full.size > 10_000_000 and full.repo_size > 0
    # an incremental copies only what changed since the full
    assert 0 < incr.delta < full.delta
    assert full.stop >= full.start and incr.start >= full.stop
    for b in (full, incr):
        assert b.wal_start is not None and b.wal_stop is not None
        assert b.wal_start <= b.wal_stop
        assert b.lsn_start is not None and b.lsn_stop is not None
    assert full.wal_stop is not None and incr.wal_start is not None
    assert full.wal_stop <= incr.wal_start
    (arch,) = info.archives
    assert arch.min is not None and arch.max is not None
    assert arch.min <= full.wal_start and arch.max >= incr.wal_stop  # type: ignore[operator]


async def test_point_in_time_restore_to_a_time_between_two_commits(lab: Lab) -> None:
    src = await archiving_primary(lab)
    await src.sql("CREATE TABLE t (id int PRIMARY KEY, what text)")
    await src.br.backup("full")
    await src.sql("INSERT INTO t VALUES (1, 'first')")
    await asyncio.sleep(1.0)
    (between,) = (await src.sql("SELECT clock_timestamp()"))[0]
    (lsn_between,) = (await src.sql("SELECT pg_current_wal_lsn()::text"))[0]
    await asyncio.sleep(1.0)
    await src.sql("INSERT INTO t VALUES (2, 'second')")
    await switch_and_wait_archived(src)

    for name, target in (
        ("pitr-time", RecoveryTarget.time(between)),
        ("pitr-lsn", RecoveryTarget.lsn(lsn_between)),
    ):
        # the restored cluster does not archive (into the source's stanza or any other)
        dst = new_member(lab, name, archive=False, from_template=False)
        await dst.br.restore(dst.ctl.data_dir, target)
        auto = (dst.ctl.data_dir / "postgresql.auto.conf").read_text()
        assert f"restore_command = '{dst.br.restore_command()}'" in auto
        dst.ctl.write_config("primary", None, None)
        recovery_signal(dst.ctl.data_dir)
        await dst.ctl.start(60)
        await wait_promoted(dst)
        assert await dst.sql("SELECT id, what FROM t ORDER BY id") == [(1, "first")], name
        assert await timeline_of(dst) == 2
        await dst.ctl.stop("fast")
    # the source goes on, on its own timeline
    assert await timeline_of(src) == 1
    assert len(await src.sql("SELECT * FROM t")) == 2


# a space, a quote and PostgreSQL's '%' in the paths of archive_command and restore_command
ODD_DIR = "pg backrest's 100%"


async def test_restore_as_standby_then_stream_from_the_primary(lab: Lab) -> None:
    primary = await archiving_primary(lab, br_dir=ODD_DIR)
    await primary.sql("CREATE TABLE t (id int)")
    await primary.br.backup("full")
    await primary.sql("INSERT INTO t VALUES (1)")
    await switch_and_wait_archived(primary)

    replica = new_member(lab, "m2", from_template=False, br_dir=ODD_DIR)
    await primary.ctl.ensure_slots({"m1", "m2"})
    await replica.br.restore(replica.ctl.data_dir, standby=True)
    assert (replica.ctl.data_dir / "standby.signal").exists()
    (archived,) = (await primary.sql("SELECT last_archived_wal FROM pg_stat_archiver"))[0]
    upstream = primary.ctl.replication_conninfo("127.0.0.1", primary.ctl.settings.port)
    replica.ctl.write_config("standby", upstream, slot_name("m2"))
    await replica.ctl.start(60)

    async def streaming() -> bool:
        return (await replica.ctl.probe()).receiver_streaming

    await wait_for(streaming, 30, what="m2 streaming from m1")
    # it replayed the archived segment through restore_command before it streamed
    replica.ctl.server_log.flush(2)  # the agent writes the log file: what was said is in it
    assert f'restored log file "{archived}" from archive' in replica.ctl.log_path.read_text()
    await primary.sql("INSERT INTO t VALUES (2)")

    async def caught_up() -> bool:
        return await replica.sql("SELECT count(*) FROM t") == [(2,)]

    await wait_for(caught_up, 20, what="row 2 streamed to m2")
    assert (await replica.sql("SELECT pg_is_in_recovery()"))[0][0] is True


async def test_backup_from_a_standby(lab: Lab) -> None:
    primary = await archiving_primary(lab)
    await primary.sql("CREATE TABLE t AS SELECT 1 AS id")
    await primary.br.backup("full")
    replica = new_member(lab, "m2", from_template=False)
    await primary.ctl.ensure_slots({"m1", "m2"})
    await replica.br.restore(replica.ctl.data_dir, standby=True)
    upstream = primary.ctl.replication_conninfo("127.0.0.1", primary.ctl.settings.port)
    replica.ctl.write_config("standby", upstream, slot_name("m2"))
    await replica.ctl.start(60)
    await wait_for(lambda: _streaming(replica), 30, what="m2 streaming before the standby backup")
    await primary.sql("INSERT INTO t VALUES (2)")
    taken = await replica.br.backup("full", standby=replica.br.pg, primary=primary.br.pg)
    assert taken.type == "full"
    log = (replica.br.log_dir / f"{STANZA}-backup.log").read_text()
    # pgBackRest waited for the standby to replay to the backup's start before copying from it
    assert "replay on the standby reached" in log
    # a standby backup restores like any other
    dst = new_member(lab, "m3", archive=False, from_template=False)
    await dst.br.restore(dst.ctl.data_dir, RecoveryTarget("immediate"), backup_set=taken.label)
    dst.ctl.write_config("primary", None, None)
    recovery_signal(dst.ctl.data_dir)
    await dst.ctl.start(60)
    await wait_promoted(dst)
    assert await dst.sql("SELECT id FROM t ORDER BY id") == [(1,), (2,)]


async def _streaming(m: Member) -> bool:
    return (await m.ctl.probe()).receiver_streaming


async def test_backup_killed_midway_leaves_the_repository_usable(lab: Lab) -> None:
    """pgbench scale 10: a full backup, one killed by SIGKILL midway, the next one, a restore.
    Prints the times (docs/backup.md quotes them)."""
    m = await archiving_primary(lab)
    init_s = pgbench_init(m, 10)
    (db_bytes,) = (await m.sql("SELECT pg_database_size('postgres')"))[0]
    t0 = time.monotonic()
    first = await m.br.backup("full")
    full_s = time.monotonic() - t0

    task = asyncio.create_task(m.br.backup("full"))

    async def copying() -> list[int] | None:
        label_dirs = [
            p
            for p in (lab.root / "repo" / "backup" / STANZA).iterdir()
            if p.is_dir() and p.name.endswith("F") and p.name != first.label
        ]
        if not label_dirs or not (label_dirs[0] / "pg_data").is_dir():
            return None
        pids = children_running(m.br.config_path, "backup")
        return pids or None

    pids = await wait_for(copying, 60, interval=0.05, what="a second backup copying files")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(BackupError, match="killed by signal 9"):
        await task
    # it died midway: its partial backup is in the repository, and none of its workers is left
    partial = [
        p.name
        for p in (lab.root / "repo" / "backup" / STANZA).iterdir()
        if p.is_dir() and p.name.endswith("F") and p.name != first.label
    ]
    assert len(partial) == 1
    assert children_running(m.br.config_path, "backup") == []

    info = await m.br.info()
    assert info.ok and [b.label for b in info.backups] == [first.label]
    await m.sql("UPDATE pgbench_accounts SET abalance = 1 WHERE aid <= 1000")
    t0 = time.monotonic()
    second = await m.br.backup("full")
    second_s = time.monotonic() - t0
    info = await m.br.info()
    assert [b.label for b in info.backups] == [first.label, second.label]
    await m.br.check()

    dst = new_member(lab, "restored", archive=False, from_template=False)
    t0 = time.monotonic()
    await dst.br.restore(dst.ctl.data_dir, RecoveryTarget("immediate"))
    restore_s = time.monotonic() - t0
    dst.ctl.write_config("primary", None, None)
    recovery_signal(dst.ctl.data_dir)
    t0 = time.monotonic()
    await dst.ctl.start(120)
    await wait_promoted(dst, 120)
    recover_s = time.monotonic() - t0
    assert await dst.sql("SELECT count(*) FROM pgbench_accounts WHERE abalance = 1") == [(1000,)]
    print(
        f"\npgbench scale 10: database {db_bytes / 2**20:.0f} MiB, init {init_s:.1f}s; "
        f"full backup {full_s:.1f}s ({first.repo_size / 2**20:.1f} MiB in the repository, "
        f"{m.br.settings.compression}); full after a killed one {second_s:.1f}s; "
        f"restore {restore_s:.1f}s; recovery to promotion {recover_s:.1f}s; "
        f"at {datetime.now().isoformat(timespec='seconds')}"
    )
