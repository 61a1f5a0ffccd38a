"""Synchronous mode end to end (real PostgreSQL and etcd): the master records its synchronous
standby in the DCS before relying on it; after a hard kill only that standby takes over, and no
acknowledged write is lost; in strict mode, with no standby left, writes block rather than
being acknowledged unsafely."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support.clusterutil import Writer, local_cluster, new_master, wait_for

pytestmark = pytest.mark.integration

TTL = 5.0


def sync_members(lc) -> list[str]:  # type: ignore[no-untyped-def]
    view = lc.read_view()
    sync = view.sync or {}
    if view.leader is None or sync.get("leader") != view.leader.name:
        return []
    return list(sync.get("members") or [])


def log_events(path: Path, offset: int) -> list[dict[str, Any]]:
    """The agent's JSON log lines written after ``offset`` (bytes), in the order written."""
    with path.open("rb") as fh:
        fh.seek(offset)
        lines = fh.read().decode(errors="replace").splitlines()
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line PostgreSQL or a tool wrote, not the agent's structured log
    return out


def test_hard_kill_in_sync_mode_loses_no_acknowledged_write_and_promotes_the_sync_standby() -> None:
    with local_cluster(ttl=TTL, extra={"settings.synchronous_mode": "on"}) as lc:
        sync = lc.wait_sync(timeout=30)
        old = lc.master()
        assert old not in sync and len(sync) == 1
        w = Writer(lc).start()
        wait_for(lambda: len(w.acked) > 200, 30, what="writes acknowledged")
        lc.kill_member(old, postgres=True)
        new = wait_for(lambda: new_master(lc, old), TTL + 15, what="a new master")
        assert new == sync[0], "only the recorded synchronous standby may take over"
        wait_for(lambda: w.first_write_after(time.monotonic() - 0.5, lc.member(old).pg_port), 20)
        w.stop()
        assert w.lost(lc) == [], "synchronous mode must not lose an acknowledged write"
        # the new master records its own synchronous standby (the old master is gone)
        wait_for(
            lambda: sync_members(lc) and lc.read_view().sync.get("leader") == new,
            30,
            what="a new sync record",
        )


def test_sync_standby_lost_in_on_mode_master_goes_on_and_record_shrinks_first() -> None:
    with local_cluster(ttl=TTL, extra={"settings.synchronous_mode": "on"}) as lc:
        sync = lc.wait_sync(timeout=30)
        master = lc.master()
        dead = sync[0]
        log = lc.member(master).dir / "agent.log"
        offset = log.stat().st_size
        lc.kill_member(dead, postgres=True)
        # the record drops the dead standby, the other replica becomes synchronous
        other = next(m.name for m in lc.members if m.name not in (master, dead))
        wait_for(
            lambda: sync_members(lc) == [other],
            30,
            what="the other replica recorded as synchronous",
        )
        with psycopg.connect(lc.dsn(master), autocommit=True) as c:
            c.execute("SET statement_timeout = '5s'")
            c.execute("CREATE TABLE after_loss (x int)")
            c.execute("INSERT INTO after_loss VALUES (1)")
        # the order the name promises, as the master's log shows it: the DCS record dropped the
        # dead standby before synchronous_standby_names stopped naming it (so there was no moment
        # when PostgreSQL no longer waited for a member the record still allowed to be promoted)
        events = log_events(log, offset)
        shrunk = [
            i
            for i, e in enumerate(events)
            if e.get("event") == "action"
            and e.get("name") == "sync_set"
            and e.get("outcome") == "shrunk"
            and dead in (e.get("removed") or [])
        ]
        names = [
            i
            for i, e in enumerate(events)
            if e.get("event") == "synchronous_standby_names"
            and f'"{dead}"' not in str(e.get("value"))
        ]
        assert shrunk, f"no record shrink removing {dead} in {log}"
        assert names, f"synchronous_standby_names never stopped naming {dead}"
        assert shrunk[0] < names[0], (
            "synchronous_standby_names dropped the dead standby before the DCS record did: "
            f"{events[names[0]]} came before {events[shrunk[0]]}"
        )


def test_strict_mode_blocks_writes_without_a_standby() -> None:
    with local_cluster(ttl=TTL, extra={"settings.synchronous_mode": "strict"}) as lc:
        lc.wait_sync(timeout=30)
        master = lc.master()
        for m in lc.members:
            if m.name != master:
                lc.stop_member(m.name)
        wait_for(lambda: sync_members(lc) == [], 30, what="the record emptied")
        # a commit waits for a synchronous standby that does not exist: it must not return
        result: dict[str, object] = {}

        def write() -> None:
            try:
                with psycopg.connect(lc.dsn(master), autocommit=True) as c:
                    c.execute("SET application_name = 'must_block'")
                    c.execute("CREATE TABLE must_block (x int)")
                    result["ok"] = True
            except psycopg.Error as exc:
                result["error"] = exc

        t = threading.Thread(target=write, daemon=True)
        t.start()
        t.join(timeout=4)
        assert t.is_alive() and "ok" not in result, "the write was acknowledged without a standby"
        with psycopg.connect(lc.dsn(master), autocommit=True) as c:
            c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'must_block'"
            )
        t.join(timeout=10)
        assert "ok" not in result
        # nothing was promised: no member may be promoted on this master's behalf either
        assert lc.master() == master
