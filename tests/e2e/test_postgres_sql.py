"""pgsidecar.postgres against real PostgreSQL 15: the one connection path, and what a promoted
master reports as pending a restart."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pgsidecar.config import slot_name
from pgsidecar.postgres import sql as sql_module
from pgsidecar.postgres.control import PostgresControl, PostgresError
from tests.support.fenceutil import REPO
from tests.support.pgtestutil import Lab, query, wait_for

pytestmark = pytest.mark.integration


async def primary_and_standby(
    lab: Lab, standby_parameters: dict[str, Any] | None = None
) -> tuple[PostgresControl, PostgresControl]:
    a = lab.control("a")
    a.write_config("primary", None, None)
    await a.start(30)
    await a.ensure_slots({"a", "b"})
    b = lab.control("b", from_template=False)
    await b.basebackup(a.replication_conninfo("127.0.0.1", a.settings.port))
    b.write_config(
        "standby",
        a.replication_conninfo("127.0.0.1", a.settings.port),
        slot_name("b"),
        parameters=standby_parameters,
    )
    await b.start(30)

    async def streaming() -> bool:
        return (await b.probe()).receiver_streaming

    await wait_for(streaming, 20, what="b streaming from a")
    return a, b


async def setting(ctl: PostgresControl, name: str) -> str:
    rows = await query(
        ctl.superuser_conninfo(), ctl.passfile, "SELECT current_setting(%s)", (name,)
    )
    return str(rows[0][0])


async def test_a_promoted_master_has_no_pending_restart(lab: Lab) -> None:
    """The agent's promotion: the primary's settings written while still a standby, reload,
    promote, the primary config, reload. Nothing the standby had may leave a setting that only
    a restart can change (recovery_target_timeline did), or `restart --pending-only` restarts a
    healthy master for nothing."""
    a, b = await primary_and_standby(lab)
    params: dict[str, Any] = {"synchronous_standby_names": ""}
    b.write_config("standby", None, None, parameters={**params, "log_statement": "none"})
    await b.reload()
    await b.promote()
    # a reloadable marker tells when the postmaster has read the primary's file
    params["log_statement"] = "ddl"
    b.write_config("primary", None, None, parameters=params)
    await b.reload()

    async def reloaded() -> bool:
        return await setting(b, "log_statement") == "ddl"

    await wait_for(reloaded, 10, what="b's postmaster reading the primary config")
    assert (await b.probe()).in_recovery is False
    assert await b.pending_restart_settings() == []

    # and it does report a change that needs one, so the empty list above means something
    b.write_config("primary", None, None, parameters={**params, "max_connections": 110})
    await b.reload()

    async def pending() -> list[str]:
        return await b.pending_restart_settings()

    assert await wait_for(pending, 10, what="max_connections pending") == ["max_connections"]


async def receiver_status(b: PostgresControl) -> str | None:
    rows = await query(
        b.superuser_conninfo(), b.passfile, "SELECT status FROM pg_stat_wal_receiver"
    )
    return str(rows[0][0]) if rows else None


async def test_a_silent_sender_is_not_streaming_before_the_receiver_times_out(lab: Lab) -> None:
    """A sender that goes silent with its socket open (a partitioned master; here its walsender
    stopped by SIGSTOP): the probe stops counting the stream once nothing has arrived for
    wal_receiver_timeout / 2 + the slack (6 s here), while pg_stat_wal_receiver still says
    'streaming' (it does until the timeout, 10 s, ends the walreceiver)."""
    a, b = await primary_and_standby(lab, {"wal_receiver_timeout": "10s"})
    rows = await query(a.superuser_conninfo(), a.passfile, "SELECT pid FROM pg_stat_replication")
    (walsender,) = (int(r[0]) for r in rows)
    assert await receiver_status(b) == "streaming"
    os.kill(walsender, signal.SIGSTOP)
    try:

        async def silent() -> bool:
            return not (await b.probe()).receiver_streaming

        await wait_for(
            silent, 6 + sql_module.STREAM_SILENCE_SLACK + 1, what="the stream judged silent"
        )
        assert await receiver_status(b) == "streaming"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(walsender, signal.SIGCONT)

    async def streaming_again() -> bool:
        return (await b.probe()).receiver_streaming

    # the sender answers again on the same connection: the stream counts again
    await wait_for(streaming_again, 10, what="b streaming again")


async def test_an_idle_healthy_stream_counts_as_streaming_throughout(lab: Lab) -> None:
    """Nothing to send for many times the ping interval (wal_receiver_timeout 2 s: a ping after
    1 s of silence, limit 2 s): the sender's answers keep the stream counted, probe after probe,
    so the member key's `streaming` does not flap on a quiet cluster."""
    _a, b = await primary_and_standby(lab, {"wal_receiver_timeout": "2s"})
    loop = asyncio.get_running_loop()
    until = loop.time() + 3 * (1 + sql_module.STREAM_SILENCE_SLACK)
    seen: list[bool] = []
    while loop.time() < until:
        seen.append((await b.probe()).receiver_streaming)
        await asyncio.sleep(0.1)
    assert len(seen) > 20 and all(seen), seen


async def test_replication_state_reads_the_standbys(lab: Lab) -> None:
    a, b = await primary_and_standby(lab)
    await query(a.superuser_conninfo(), a.passfile, "CREATE TABLE t AS SELECT 1 AS x")
    flushed = (await a.probe()).lsn
    assert flushed

    async def caught_up() -> Any:
        state = await a.replication_state()
        s = state.standbys.get("b")
        return state if s is not None and s.flush_lsn >= flushed else None

    state = await wait_for(caught_up, 10, what="b's flush position passing a's")
    stats, flush = state  # the shape syncrep reads: {name: (state, sync_state, flush)}, flush
    assert stats["b"][0] == "streaming" and stats["b"][1] == "async"
    assert flush >= stats["b"][2] >= flushed


async def test_every_sql_path_goes_through_the_one_connect(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each public operation that speaks SQL opens its connections through sql.connect, which
    sets a connect timeout and a statement_timeout on every one of them."""
    a, b = await primary_and_standby(lab)
    opened: list[tuple[str, dict[str, str]]] = []
    real_connect = psycopg.AsyncConnection.connect

    def spy(conninfo: str = "", **kwargs: Any) -> Any:
        caller = sys._getframe(1).f_code
        where = "sql.connect" if caller is sql_module.connect.__code__ else caller.co_qualname
        opened.append((where, conninfo_to_dict(conninfo)))
        return real_connect(conninfo, **kwargs)

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", spy)
    su_a = a.superuser_conninfo("127.0.0.1", a.settings.port)
    await b.sql.close_probe()  # the probe keeps its connection: make it open a new one
    operations: dict[str, Callable[[], Awaitable[Any]]] = {
        "probe": b.probe,
        "reload": b.reload,
        "checkpoint": a.checkpoint,
        "ensure_roles": a.ensure_roles,
        "ensure_slots": lambda: a.ensure_slots({"a", "b"}),
        "pending_restart_settings": a.pending_restart_settings,
        "replication_state": a.replication_state,
        "timeline_history": lambda: b.timeline_history(su_a),
    }
    for what, operation in operations.items():
        before = len(opened)
        await operation()
        assert len(opened) > before, f"{what} opened no connection: the spy sees nothing"
    await b.stop("fast")
    await b.start(30)  # start waits for the server to answer as ours
    await b.promote()
    assert opened and all(where == "sql.connect" for where, _ in opened), opened
    for _, dsn in opened:
        assert int(dsn["connect_timeout"]) >= 2
        assert dsn["options"].startswith("-c statement_timeout=")
        assert int(dsn["options"].rpartition("=")[2]) > 0
        assert "password" not in dsn


async def test_statement_timeout_and_errors_come_back_as_postgres_error(lab: Lab) -> None:
    a = lab.control("a")
    a.write_config("primary", None, None)
    await a.start(30)
    async with a.sql.session("SHOW", statement_timeout=7) as conn:
        cur = await conn.execute("SHOW statement_timeout")
        assert await cur.fetchone() == ("7s",)
    with pytest.raises(PostgresError, match="sleeping failed: .*statement timeout"):
        await a.sql.one("sleeping", "SELECT pg_sleep(5)", timeout=0.3)
    with pytest.raises(PostgresError, match='bad query failed: .*"nonsense"'):
        await a.sql.one("bad query", "SELECT nonsense")
    # the client-side bound holds even when the server never gets to cancel (a long lock wait
    # in a statement with no timeout is modelled by the session bound below the statement's)
    with pytest.raises(PostgresError, match="waiting timed out after 0.3s"):
        async with a.sql.session("waiting", timeout=0.3, statement_timeout=30) as conn:
            await conn.execute("SELECT pg_sleep(5)")
    await a.stop("fast")
    with pytest.raises(PostgresError, match=f"cannot connect to 127.0.0.1:{a.settings.port}"):
        await a.pending_restart_settings()


# Run in a child process: on the old code this freed the libpq connection under the running
# query and psycopg's C generator read it, a crash of the whole process (pytest's, in-process).
# MALLOC_PERTURB_ makes glibc fill freed memory with junk, so the use after free crashes every
# time instead of now and then (the fault suite's frozen-agent case, CI of 5532f73).
CLOSE_UNDER_A_PROBE = """
import asyncio, json, os, signal, sys, time
from pathlib import Path
from pgsidecar.postgres.conf import Conninfo
from pgsidecar.postgres.control import PostgresError
from pgsidecar.postgres.sql import Sql
from tests.support.pgtestutil import RecordingLog, query

async def main() -> None:
    ci, passfile = Conninfo(**json.loads(sys.argv[1])), Path(sys.argv[2])
    sql = Sql(ci, passfile, "closing", RecordingLog())
    outcomes = []
    for _ in range(3):
        await sql.probe_row()  # the kept connection
        rows = await query(ci, passfile,
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgsidecar-closing'")
        (backend,), = rows
        os.kill(backend, signal.SIGSTOP)
        probe = asyncio.ensure_future(sql.probe_row())
        await asyncio.sleep(0.3)  # its query sent, waiting for the answer
        os.kill(backend, signal.SIGKILL)  # the server side goes away: the socket reads EOF
        time.sleep(0.3)  # the loop blocked: that EOF waits for the probe's task...
        await sql.close_probe()  # ...while the exit watch closes the connection first
        try:
            await probe
            outcomes.append("answered")
        except PostgresError as exc:
            outcomes.append(str(exc))
        for _ in range(100):  # the postmaster's crash restart; then a fresh connection answers
            try:
                await sql.probe_row()
                outcomes.append("next probe answered")
                break
            except PostgresError:
                await asyncio.sleep(0.1)
    await sql.close_probe()
    print(json.dumps(outcomes))

asyncio.run(main())
"""


async def test_closing_the_probe_connection_under_a_running_probe(lab: Lab) -> None:
    """The exit watch probes a server that has just died, which drops the kept probe
    connection, while the probe loop still waits for its query's answer on it. The connection
    must not be freed under that query: the probe fails with PostgresError and the next one
    opens a new connection. (It was freed: the agent crashed with SIGSEGV or hung.)"""
    a = lab.control("a")
    a.write_config("primary", None, None)
    await a.start(30)
    ci = dataclasses.asdict(a.superuser_conninfo("127.0.0.1", a.settings.port))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLOSE_UNDER_A_PROBE,
        json.dumps(ci),
        str(a.passfile),
        cwd=str(REPO),
        env={**os.environ, "MALLOC_PERTURB_": "165", "PYTHONFAULTHANDLER": "1"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, f"the child ended with {proc.returncode}: {err.decode()[-3000:]}"
    outcomes = json.loads(out.decode().strip().splitlines()[-1])
    assert (
        outcomes
        == [
            "probe query: the connection was closed under it",
            "next probe answered",
        ]
        * 3
    ), outcomes


async def test_the_rewind_source_checkpoint_waits_for_a_promotion_to_finish(lab: Lab) -> None:
    """pg_rewind takes the source's timeline from its control file; a source still in recovery
    (a promotion not finished) would give the rewound member a minimum recovery point on the old
    timeline. So the checkpoint before a rewind waits until the source has left recovery, then
    brings the control file to the new timeline; and a source that never leaves recovery is a
    clear error after the wait, not a rewind from a standby."""
    a, b = await primary_and_standby(lab)

    with pytest.raises(PostgresError, match="still in recovery after 1 s"):
        await a.sql.checkpoint_if_promoted(b.superuser_conninfo(), promote_wait=1.0)

    waiting = asyncio.create_task(a.sql.checkpoint_if_promoted(b.superuser_conninfo()))
    await asyncio.sleep(1.0)
    assert not waiting.done(), "returned while the source was still a standby"
    await b.promote()
    await asyncio.wait_for(waiting, 30)
    # the control file names the new timeline at once: what pg_rewind will read
    assert (await b.controldata()).timeline == 2
