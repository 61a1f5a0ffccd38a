"""pgsidecar.postgres.control against real PostgreSQL 15 (plus a few pure helper tests).

Each integration test runs in its own /tmp directory with free ports; its Lab stops every process
it started at teardown. The data directories are copies of one template cluster made at session
start (initdb + replication role), except the test that proves initdb itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from fsm.snapshot import DataState
from pgsidecar.config import Credentials, slot_name
from pgsidecar.postgres.conf import (
    conf_value,
    make_dsn,
    parse_lsn,
    parse_timeline_history,
    pgpass_line,
    strip_auto_conf,
)
from pgsidecar.postgres.control import Conninfo, PostgresControl, PostgresError
from pgsidecar.procutil import os_user_ids, pid_alive
from tests.support.pgtestutil import (
    FAST_PARAMS,
    PG_BIN,
    REPL_PASSWORD,
    SU_PASSWORD,
    Lab,
    RecordingLog,
    make_root,
    make_settings,
    query,
    wait_for,
    wait_pid_gone,
)

integration = pytest.mark.integration


# ---------------------------------------------------------------------------------------- fixtures


async def start_primary(lab: Lab, name: str) -> PostgresControl:
    ctl = lab.control(name)
    ctl.write_config("primary", None, None)
    await ctl.start(30)
    return ctl


def repl_of(ctl: PostgresControl) -> Conninfo:
    return ctl.replication_conninfo("127.0.0.1", ctl.settings.port)


def su_of(ctl: PostgresControl) -> Conninfo:
    return ctl.superuser_conninfo("127.0.0.1", ctl.settings.port)


async def start_standby(lab: Lab, name: str, upstream: PostgresControl) -> PostgresControl:
    await upstream.ensure_slots({upstream.name, name})
    ctl = lab.control(name, from_template=False)
    await ctl.basebackup(repl_of(upstream))
    ctl.write_config("standby", repl_of(upstream), slot_name(name))
    await ctl.start(30)
    return ctl


async def sql(ctl: PostgresControl, text: str, params: object = None) -> list[tuple]:
    return await query(ctl.superuser_conninfo(), ctl.passfile, text, params)


async def wait_streaming(ctl: PostgresControl, upstream: PostgresControl, within: float = 20):
    async def streaming():
        f = await ctl.probe()
        return f if f.receiver_streaming else None

    facts = await wait_for(streaming, within, what=f"{ctl.name} streaming from {upstream.name}")
    assert facts.receiver_upstream == f"127.0.0.1:{upstream.settings.port}"
    return facts


async def kill_postmaster(ctl: PostgresControl) -> None:
    pid = ctl.postmaster_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert await asyncio.wait_for(ctl.wait_exit(), 10) == -signal.SIGKILL


# ------------------------------------------------------------------------------- pure helpers


def test_dsn_quoting_roundtrips_through_libpq() -> None:
    ci = Conninfo("db host", 5433, "us'er\\x", application_name="a b")
    parsed = conninfo_to_dict(ci.dsn(Path("/tmp/dir with space/pgpass"), connect_timeout=3))
    assert parsed == {
        "host": "db host",
        "port": "5433",
        "user": "us'er\\x",
        "dbname": "postgres",
        "application_name": "a b",
        "passfile": "/tmp/dir with space/pgpass",
        "connect_timeout": "3",
    }
    assert make_dsn({"options": "-c statement_timeout=0"}) == "options='-c statement_timeout=0'"
    with pytest.raises(ValueError):
        ci.dsn(Path("/p"), password="x")


def test_pgpass_conf_and_history_helpers() -> None:
    assert pgpass_line("u:1", "p\\a:ss") == "*:*:*:u\\:1:p\\\\a\\:ss"
    with pytest.raises(ValueError):
        pgpass_line("u", "a\nb")
    assert conf_value(True) == "on" and conf_value(10) == "10"
    assert conf_value("it's a\\b") == "'it''s a\\\\b'"
    assert parse_lsn("16/B374D848") == 0x16B374D848 and parse_lsn(None) is None
    hist = "1\t0/3000060\tno recovery target specified\n\n2\t0/5000000\tx\n"
    assert parse_timeline_history(hist) == [(1, 0x3000060), (2, 0x5000000)]
    text, changed = strip_auto_conf(
        "# auto\nprimary_conninfo = 'host=x'\nwork_mem = '8MB'\nPRIMARY_SLOT_NAME='s'\n",
        frozenset({"primary_conninfo", "primary_slot_name"}),
    )
    assert changed and text == "# auto\nwork_mem = '8MB'\n"


def test_write_config_files_without_a_server() -> None:
    """write_config only touches files: role switch, signal files, auto.conf, no password."""
    root = make_root()
    try:
        data = root / "data"
        data.mkdir(mode=0o700)
        (data / "PG_VERSION").write_text("15\n")
        (data / "recovery.signal").write_text("")
        (data / "postgresql.auto.conf").write_text(
            "primary_conninfo = 'host=stale'\nwork_mem = '8MB'\n"
        )
        log = RecordingLog()
        ctl = PostgresControl(
            make_settings(
                data, 5999, parameters={"port": 1, "work_mem": "4MB", "primary_conninfo": "x"}
            ),
            root / "state",
            "m-1",
            log,
        )
        ctl.write_passfile()
        passfile = ctl.passfile
        assert stat.S_IMODE(passfile.stat().st_mode) == 0o600
        assert passfile.stat().st_uid == os_user_ids("postgres")[0]
        assert passfile.read_text() == (
            "*:*:*:postgres:su\\:pa\\\\ss'word\n*:*:*:replicator:repl\\:pa\\\\ss'word\n"
        )

        up = Conninfo("10.0.0.2", 5432, "replicator")
        ctl.write_config("standby", up, "m_1")
        conf = (data / "postgresql.conf").read_text()
        assert "port = 5999" in conf and "port = 1\n" not in conf
        assert "work_mem = '4MB'" in conf
        assert "unix_socket_directories = ''" in conf
        assert "cluster_name = 'm-1'" in conf
        assert "primary_slot_name = 'm_1'" in conf
        assert "recovery_target_timeline = 'latest'" in conf
        line = next(ln for ln in conf.splitlines() if ln.startswith("primary_conninfo"))
        dsn = conninfo_to_dict(line.split("=", 1)[1].strip()[1:-1].replace("''", "'"))
        assert dsn["host"] == "10.0.0.2" and dsn["application_name"] == "m-1"
        assert dsn["passfile"] == str(passfile) and "password" not in dsn
        assert SU_PASSWORD not in conf and REPL_PASSWORD not in conf
        assert (data / "standby.signal").exists() and not (data / "recovery.signal").exists()
        assert "primary_conninfo" not in (data / "postgresql.auto.conf").read_text()
        hba = (data / "pg_hba.conf").read_text()
        assert "host    replication  all   127.0.0.1/32  scram-sha-256" in hba
        assert (
            "warning",
            "pg_parameter_ignored",
            {"parameter": "port", "reason": "managed by the agent"},
        ) in log.events

        assert "10.1.2.3" not in hba  # listen is covered by 127.0.0.1/32 already
        other = PostgresControl(
            make_settings(data, 5999, listen="10.1.2.3", hba_networks=["10.9.0.0/16"]),
            root / "state",
            "m-1",
            log,
        )
        other.write_config("standby", up, "m_1")
        hba = (data / "pg_hba.conf").read_text()
        assert (
            "10.9.0.0/16" in hba and "host    all          all   10.1.2.3/32  scram-sha-256" in hba
        )

        ctl.write_config("primary", up, "m_1")
        conf = (data / "postgresql.conf").read_text()
        assert "primary_conninfo" not in conf and "primary_slot_name" not in conf
        assert not (data / "standby.signal").exists()
        assert (data / "postgresql.conf").stat().st_uid == os_user_ids("postgres")[0]
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


# -------------------------------------------------------------------------------- integration


@integration
async def test_initdb_standby_without_upstream_promote_and_roles() -> None:
    """initdb -> standby with no upstream -> promote -> writable; ensure_roles is idempotent and
    never puts the password in the server log, even with log_statement=all."""
    lab = Lab()
    try:
        ctl = lab.control(
            "boot", from_template=False, parameters={"fsync": False, "log_statement": "all"}
        )
        await ctl.initdb()
        st = ctl.data_dir.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os_user_ids("postgres")[0]
        assert not list(ctl.state_dir.glob(".initdb-pw-*")), "initdb's pwfile must be deleted"
        assert (await ctl.controldata()).data_state == DataState.PRIMARY_CLEAN

        ctl.write_config("standby", None, None)
        await ctl.start(30)
        facts = await ctl.probe()
        assert facts.running and facts.accepting and facts.in_recovery is True
        assert facts.timeline == 1 and facts.data == DataState.STANDBY
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            await sql(ctl, "CREATE TABLE t (x int)")

        assert await sql(ctl, "SHOW data_checksums") == [("on",)]
        await ctl.promote()
        facts = await ctl.probe()
        assert facts.in_recovery is False and facts.timeline == 2 and facts.lsn
        await sql(ctl, "CREATE TABLE t (x int)")
        await sql(ctl, "INSERT INTO t VALUES (1)")
        assert await sql(ctl, "SELECT count(*) FROM t") == [(1,)]
        await ctl.promote()  # already primary: a no-op, not an error

        await ctl.ensure_roles()
        await ctl.ensure_roles()  # idempotent
        assert [e[2]["created"] for e in lab.log.events if e[1] == "pg_roles_ensured"] == [
            True,
            False,
        ]
        rows = await query(
            repl_of(ctl),
            ctl.passfile,
            "SELECT rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user",
        )
        assert rows == [(True, False)]

        await ctl.stop("fast")
        pg_log = ctl.log_path.read_text()
        assert "statement: SELECT 1 FROM pg_roles" not in pg_log  # logging was off in that txn
        assert "CREATE TABLE t" in pg_log  # ... but on elsewhere: the check above means something
        for secret in (SU_PASSWORD, REPL_PASSWORD, "SCRAM-SHA-256$"):
            assert secret not in pg_log
            assert secret not in lab.log.text()
    finally:
        await lab.close()


@integration
async def test_basebackup_standby_streams_and_slot_drop(lab: Lab) -> None:
    a = await start_primary(lab, "a")
    b = await start_standby(lab, "b", a)
    facts = await wait_streaming(b, a)
    assert facts.in_recovery and facts.timeline == 1

    await sql(a, "CREATE TABLE t AS SELECT g AS x FROM generate_series(1, 1000) g")
    target = (await a.probe()).lsn
    assert target and facts.received_lsn is not None and target > facts.received_lsn

    async def caught_up():
        f = await b.probe()
        return f if (f.received_lsn or 0) >= target and (f.replayed_lsn or 0) >= target else None

    f = await wait_for(caught_up, 10, what="standby receive LSN passing the primary's")
    assert f.lsn >= target
    assert await sql(b, "SELECT count(*) FROM t") == [(1000,)]
    assert await sql(a, "SELECT slot_name, active FROM pg_replication_slots") == [("b", True)]

    # b is no longer a member: its slot goes even though its walsender holds it
    await a.ensure_slots({"a"})
    assert await sql(a, "SELECT slot_name FROM pg_replication_slots") == []

    await b.stop("fast")
    cd = await b.controldata()
    assert cd.data_state == DataState.STANDBY and cd.cluster_state == "shut down in recovery"
    # same timeline, nothing diverged
    assert await b.rewind(su_of(a)) == "not_needed"


@integration
async def test_controldata_states(lab: Lab) -> None:
    a = lab.control("a")
    cd = await a.controldata()
    assert cd.data_state == DataState.PRIMARY_CLEAN and cd.cluster_state == "shut down"
    assert cd.system_id and cd.timeline == 1 and cd.checkpoint_lsn and cd.redo_lsn

    a.write_config("primary", None, None)
    await a.start(30)
    await kill_postmaster(a)
    assert (await a.controldata()).data_state == DataState.PRIMARY_CRASHED
    facts = await a.probe()
    assert not facts.running and facts.data == DataState.PRIMARY_CRASHED and facts.timeline == 1

    missing = lab.control("m", from_template=False)
    assert (await missing.controldata()).data_state == DataState.MISSING  # absent
    missing.data_dir.mkdir(mode=0o700)
    (missing.data_dir / "lost+found").mkdir()
    assert (await missing.controldata()).data_state == DataState.MISSING  # empty volume
    (missing.data_dir / "PG_VERSION").write_text("15\n")
    # root-owned 0700: postgres cannot enter it. A config error, never INVALID (-> reclone).
    with pytest.raises(PostgresError, match="not reachable by OS user"):
        await missing.controldata()
    os.chown(missing.data_dir, *os_user_ids("postgres"))
    assert (await missing.controldata()).data_state == DataState.INVALID  # no pg_control
    # (a stopped standby -> STANDBY is covered by the basebackup and rewind tests)


@integration
async def test_stop_fast_and_immediate(lab: Lab) -> None:
    a = await start_primary(lab, "a")
    t0 = time.monotonic()
    await a.stop("fast")
    assert not a.running and a.postmaster_pid is None
    assert await asyncio.wait_for(a.wait_exit(), 1) == 0
    assert (await a.controldata()).data_state == DataState.PRIMARY_CLEAN

    await a.start(30)
    pid = a.postmaster_pid
    await a.stop("immediate")
    assert not pid_alive(pid)
    assert (await a.controldata()).data_state == DataState.PRIMARY_CRASHED
    await a.stop("fast")  # not running: no-op
    assert time.monotonic() - t0 < 15
    # crash recovery on the next start
    await a.start(30)
    assert (await a.probe()).accepting


@integration
async def test_probe_answers_fast_when_server_is_frozen(lab: Lab) -> None:
    """A SIGSTOPped PostgreSQL (as under a paused VM or a stuck disk) must not stall the agent."""
    a = await start_primary(lab, "a")
    assert (await a.probe()).accepting  # the probe keeps its connection open
    frozen = processes_in(a.data_dir)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        facts = await a.probe()
        elapsed = time.monotonic() - t0
        assert facts.running and not facts.accepting
        assert elapsed < 4.5, elapsed
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)

    async def answers():
        return (await a.probe()).accepting

    await wait_for(answers, 10, what="probe answering again after SIGCONT")


@integration
async def test_fence_from_another_thread(lab: Lab) -> None:
    a = await start_primary(lab, "a")
    pid = a.postmaster_pid
    result: list[bool] = []
    t0 = time.monotonic()
    th = threading.Thread(target=lambda: result.append(a.fence()))
    th.start()
    th.join(5)
    assert result == [True]
    rc = await asyncio.wait_for(a.wait_exit(), 3)
    assert rc == 0  # SIGQUIT: the postmaster exits after an immediate shutdown
    assert time.monotonic() - t0 < 2
    assert not pid_alive(pid) and not a.running
    assert a.fence() is False  # nothing left to signal
    assert "pg_exited_fenced" in lab.log.names()
    assert (await a.controldata()).data_state == DataState.PRIMARY_CRASHED


_CHILD = """
import asyncio, json, os, sys
from pathlib import Path
from pgsidecar.config import PostgresSettings
import pgsidecar.postgres.control
from pgsidecar.postgres.control import PostgresControl

print(pgsidecar.postgres.control.__file__, flush=True)  # which checkout the child runs

class Log:
    def info(self, *a, **k): pass
    warning = error = debug = info

async def main():
    cfg = json.loads(sys.argv[1])
    settings = PostgresSettings(bin_dir=cfg["bin_dir"], data_dir=cfg["data_dir"], port=cfg["port"],
                                os_user="postgres", parameters=cfg["parameters"])
    ctl = PostgresControl(settings, Path(cfg["state_dir"]), cfg["name"], Log())
    await ctl.start(30)
    print(ctl.postmaster_pid, flush=True)
    if cfg["mode"] == "exit":
        os._exit(0)  # the agent dies without stopping anything
    await asyncio.sleep(3600)

asyncio.run(main())
"""


# the repository this test file belongs to: the child agent must import this checkout's code
REPO_ROOT = Path(__file__).resolve().parents[2]


def _in_repo(path: str) -> bool:
    return Path(path).resolve().is_relative_to(REPO_ROOT)


async def spawn_agent(
    lab: Lab, ctl: PostgresControl, mode: str
) -> tuple[asyncio.subprocess.Process, int]:
    cfg = {
        "bin_dir": str(PG_BIN),
        "data_dir": str(ctl.data_dir),
        "port": ctl.settings.port,
        "parameters": dict(ctl.settings.parameters),
        "state_dir": str(ctl.state_dir),
        "name": ctl.name,
        "mode": mode,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        json.dumps(cfg),
        stdout=asyncio.subprocess.PIPE,
        cwd=str(REPO_ROOT),  # the checkout under test, wherever it was cloned
    )
    lab.track(proc.pid)
    assert proc.stdout is not None
    code = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
    assert _in_repo(code), (
        f"the child agent imported {code}, not the code under test in {REPO_ROOT}"
    )
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert line.strip().isdigit(), f"child agent failed: {line!r}"
    pg_pid = int(line)
    lab.track(pg_pid)
    return proc, pg_pid


def processes_in(data_dir: Path) -> list[int]:
    """Live processes whose cwd is the data dir: the postmaster and all its children."""
    real = os.path.realpath(data_dir)
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/cwd") == real and pid_alive(int(entry)):
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


@integration
async def test_postmaster_dies_with_its_agent(lab: Lab) -> None:
    """pdeathsig: an agent that dies (here os._exit, same as SIGKILL for the kernel) takes its
    PostgreSQL with it, so a master can never keep accepting writes without its agent."""
    a = lab.control("a")
    a.write_config("primary", None, None)
    proc, pg_pid = await spawn_agent(lab, a, "exit")
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    t0 = time.monotonic()
    assert await wait_pid_gone(pg_pid, 3), "postmaster outlived its agent"
    gone_after = time.monotonic() - t0

    async def no_backends():
        return not processes_in(a.data_dir)

    await wait_for(no_backends, 5, what="backends of the dead postmaster to exit")
    assert gone_after < 2
    # the data dir is reusable at once: a restarted agent starts it (crash recovery)
    assert (await a.controldata()).data_state == DataState.PRIMARY_CRASHED
    await a.start(30)
    assert (await a.probe()).accepting


@integration
async def test_start_stops_a_leftover_postmaster(lab: Lab) -> None:
    """A postmaster for our data dir that is not our child (a previous agent's) is reported by
    probe and stopped by start() before ours runs."""
    a = lab.control("a")
    a.write_config("primary", None, None)
    proc, old_pid = await spawn_agent(lab, a, "sleep")
    facts = await a.probe()
    assert facts.running and facts.accepting and facts.in_recovery is False

    await a.start(30)
    assert not pid_alive(old_pid)
    assert a.postmaster_pid not in (None, old_pid)
    assert "pg_foreign_postmaster_stopping" in lab.log.names()
    assert (await a.probe()).accepting
    proc.kill()
    await proc.wait()


async def fork_timeline(lab: Lab) -> tuple[PostgresControl, PostgresControl, int]:
    """a primary, b its streaming standby; b is promoted (timeline 2) and a writes on timeline 1
    after the fork. Returns (a, b, switchpoint)."""
    a = await start_primary(lab, "a")
    b = await start_standby(lab, "b", a)
    await wait_streaming(b, a)
    await sql(a, "CREATE TABLE common (x int)")
    lsn = (await a.probe()).lsn

    async def replayed():
        return ((await b.probe()).replayed_lsn or 0) >= lsn

    await wait_for(replayed, 10, what="b replaying the common table")
    await b.promote()
    await b.ensure_slots({"a", "b"})
    history = await a.timeline_history(su_of(b))
    assert len(history) == 1 and history[0][0] == 1
    switchpoint = history[0][1]
    await sql(a, "CREATE TABLE diverged AS SELECT g FROM generate_series(1, 1000) g")
    await sql(b, "CREATE TABLE on_new_timeline (x int)")
    assert (await a.probe()).lsn > switchpoint
    return a, b, switchpoint


async def follow(a: PostgresControl, b: PostgresControl) -> None:
    a.write_config("standby", repl_of(b), slot_name(a.name))
    await a.start(30)
    facts = await wait_streaming(a, b)
    assert facts.timeline == 2 and facts.in_recovery
    assert await sql(
        a, "SELECT to_regclass('diverged') IS NULL, to_regclass('on_new_timeline') IS NOT NULL"
    ) == [(True, True)]


@integration
async def test_rewind_after_failover(lab: Lab) -> None:
    a, b, _ = await fork_timeline(lab)
    await a.stop("fast")
    assert (await a.controldata()).data_state == DataState.PRIMARY_CLEAN
    assert await a.rewind(su_of(b)) == "rewound"
    assert (await a.controldata()).data_state == DataState.STANDBY
    await follow(a, b)
    await sql(b, "INSERT INTO on_new_timeline VALUES (7)")
    target = (await b.probe()).lsn

    async def replayed():
        return ((await a.probe()).replayed_lsn or 0) >= target

    await wait_for(replayed, 10, what="the rewound node replaying new writes")
    assert await sql(a, "SELECT x FROM on_new_timeline") == [(7,)]

    # a now follows b on b's timeline: nothing to rewind
    await a.stop("fast")
    assert await a.rewind(su_of(b)) == "not_needed"


@integration
async def test_rewind_crashed_primary(lab: Lab) -> None:
    a, b, _ = await fork_timeline(lab)
    await kill_postmaster(a)
    assert (await a.controldata()).data_state == DataState.PRIMARY_CRASHED
    # the agent may already have written the standby config: single-user recovery copes
    a.write_config("standby", repl_of(b), slot_name("a"))
    assert await a.rewind(su_of(b)) == "rewound"
    assert "pg_crash_recovery" in lab.log.names()
    await follow(a, b)


@integration
async def test_rewind_crashed_standby_without_diverging(lab: Lab) -> None:
    """A standby killed mid-stream is recovered as a standby (no WAL of its own written), so a
    same-timeline rewind is a no-op and it streams again from its upstream."""
    a = await start_primary(lab, "a")
    b = await start_standby(lab, "b", a)
    await wait_streaming(b, a)
    await kill_postmaster(b)
    cd = await b.controldata()
    assert cd.data_state == DataState.STANDBY and cd.cluster_state == "in archive recovery"
    await sql(a, "CREATE TABLE later AS SELECT g FROM generate_series(1, 1000) g")
    assert await b.rewind(su_of(a)) == "not_needed"
    assert "pg_standby_recovery" in lab.log.names()
    assert (await b.controldata()).cluster_state == "shut down in recovery"
    b.write_config("standby", repl_of(a), slot_name("b"))
    await b.start(30)
    await wait_streaming(b, a)
    target = (await a.probe()).lsn

    async def replayed():
        return ((await b.probe()).replayed_lsn or 0) >= target

    await wait_for(replayed, 10, what="b replaying after its crash")
    assert await sql(b, "SELECT count(*) FROM later") == [(1000,)]


@integration
async def test_rewind_refuses_a_running_server(lab: Lab) -> None:
    a = await start_primary(lab, "a")
    with pytest.raises(PostgresError, match="stopped"):
        await a.rewind(su_of(a))
    with pytest.raises(PostgresError, match="running"):
        await a.wipe_data()


@integration
async def test_ensure_slots_create_and_drop(lab: Lab) -> None:
    a = await start_primary(lab, "a")

    async def slots() -> set[str]:
        return {r[0] for r in await sql(a, "SELECT slot_name FROM pg_replication_slots")}

    await a.ensure_slots({"a", "b", "C.3"})
    assert await slots() == {"b", "c_3"}  # never our own; names via slot_name()
    await sql(a, "SELECT pg_create_physical_replication_slot('operator_slot')")
    await sql(a, "SELECT pg_create_physical_replication_slot('d')")  # not ours, even if member-like
    await a.ensure_slots({"a", "b"})
    assert await slots() == {"b", "operator_slot", "d"}
    await a.ensure_slots({"a", "b"})  # idempotent
    assert await slots() == {"b", "operator_slot", "d"}

    # the record of which slots we made survives an agent restart
    again = PostgresControl(a.settings, a.state_dir, "a", RecordingLog())
    await again.ensure_slots({"a"})
    assert await slots() == {"operator_slot", "d"}


@integration
async def test_failures_raise_readable_errors(lab: Lab) -> None:
    a = await start_primary(lab, "a")
    # wrong password in b's passfile: basebackup fails, leaves an empty dir, names the command
    b = lab.control(
        "b", from_template=False, replication=Credentials(username="replicator", password="wrong")
    )
    bad = Conninfo("127.0.0.1", a.settings.port, "replicator")
    with pytest.raises(PostgresError) as err:
        await b.basebackup(bad)
    msg = str(err.value)
    assert (
        "pg_basebackup" in msg
        and "exited with 1" in msg
        and "password authentication failed" in msg
    )
    assert "wrong" not in msg
    assert os.listdir(b.data_dir) == []
    # a server that cannot start (port taken by a) fails fast with its log tail
    c = lab.control("c", port=a.settings.port)
    c.write_config("primary", None, None)
    with pytest.raises(PostgresError, match="exited with 1 during startup"):
        await c.start(30)
    assert not c.running
    facts = await c.probe()  # never raises
    assert not facts.running and not facts.accepting


@integration
async def test_placeholder_history_files_make_a_promotion_name_the_claimed_timeline(
    lab: Lab,
) -> None:
    """Two standbys at the same point, promoted one after the other, as in a failover whose
    first winner lost its lease: PostgreSQL alone names timeline 2 both times. With a
    placeholder history file for 2 the second names 3; a standby on timeline 1 follows it
    (fetching the placeholder from it), the first one rewinds onto it, and its archiver ships
    the placeholder beside the real history file."""
    a = await start_primary(lab, "a")
    archive = lab.root / "archive"
    archive.mkdir()
    uid, gid = os_user_ids("postgres")
    os.chown(archive, uid, gid)
    archiving = {
        **FAST_PARAMS,
        "archive_mode": "on",
        "archive_command": f"test ! -f {archive}/%f && cp %p {archive}/%f",
    }
    await a.ensure_slots({"b", "c", "d"})
    standbys = []
    for name in ("b", "c", "d"):
        ctl = lab.control(
            name, from_template=False, parameters=archiving if name == "c" else dict(FAST_PARAMS)
        )
        await ctl.basebackup(repl_of(a))
        ctl.write_config("standby", repl_of(a), slot_name(name))
        await ctl.start(30)
        standbys.append(ctl)
    b, c, d = standbys
    await sql(a, "CREATE TABLE common AS SELECT 1 AS x")
    for standby in (b, c, d):
        await wait_streaming(standby, a)
    # the same point everywhere: a's shutdown checkpoint reaches every standby before it exits
    await a.stop("fast")
    end = (await a.controldata()).checkpoint_lsn
    assert end is not None

    async def at_end(ctl: PostgresControl) -> bool:
        return ((await ctl.probe()).replayed_lsn or 0) >= end

    for standby in (b, c, d):
        await wait_for(lambda s=standby: at_end(s), 15, what=f"{standby.name} at a's end")

    assert b.next_timeline(1) == 2
    await b.promote()
    assert (await b.probe()).timeline == 2
    await sql(b, "CREATE TABLE lost_with_b (x int)")

    # c, from the same point, would name 2 as well; the cluster's counter said 3
    assert c.next_timeline(1) == 2
    assert c.reserve_timelines(1, 3) == [2]
    placeholder = c.data_dir / "pg_wal" / "00000002.history"
    assert placeholder.read_text().startswith("# pgsidecar:")
    assert c.next_timeline(1) == 3
    assert c.reserve_timelines(1, 3) == [], "an existing file is left alone"
    await c.promote()
    assert (await c.probe()).timeline == 3
    assert "selected new timeline ID: 3" in c.log_path.read_text()
    history = await c.timeline_history(su_of(c))
    assert [tli for tli, _ in history] == [1], "timeline 3's parent is 1: 2 is no ancestor"
    await c.ensure_slots({"b", "c", "d"})
    await sql(c, "CREATE TABLE on_timeline_3 AS SELECT 3 AS x")

    # a standby still on timeline 1 follows timeline 3, fetching 2's placeholder from c
    d.write_config("standby", repl_of(c), slot_name("d"))
    await d.reload()
    facts = await wait_streaming(d, c)
    assert facts.timeline == 3
    target = (await c.probe()).lsn

    async def d_replayed() -> bool:
        return ((await d.probe()).replayed_lsn or 0) >= target

    await wait_for(d_replayed, 15, what="d replaying timeline 3")
    assert await sql(d, "SELECT x FROM on_timeline_3") == [(3,)]
    fetched = d.data_dir / "pg_wal" / "00000002.history"
    assert fetched.read_text() == placeholder.read_text()

    # b forked on its own timeline 2: pg_rewind reads c's history (a real file) and rewinds
    await b.stop("fast")
    assert await b.rewind(su_of(c)) == "rewound"
    b.write_config("standby", repl_of(c), slot_name("b"))
    await b.start(30)
    facts = await wait_streaming(b, c)
    assert facts.timeline == 3
    assert await sql(
        b, "SELECT to_regclass('lost_with_b') IS NULL, to_regclass('on_timeline_3') IS NOT NULL"
    ) == [(True, True)]

    # the archiver ships the placeholder as it ships the real history file
    async def archived() -> bool:
        return {"00000002.history", "00000003.history"} <= set(os.listdir(archive))

    await wait_for(archived, 15, what="both history files archived")
