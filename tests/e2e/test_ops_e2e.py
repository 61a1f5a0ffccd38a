"""Operator controls that need the agents, end to end on a real cluster: cluster-wide PostgreSQL
parameters applied by reload or marked pending restart, a rolling restart of the pending ones,
reinit of a replica, and a forced failover when no member may be promoted automatically."""

from __future__ import annotations

import json

import psycopg
import pytest

from pgsidecar.cli import main
from tests.support.clusterutil import local_cluster, wait_for

pytestmark = pytest.mark.integration

TTL = 5.0


def show(lc, name: str, param: str) -> str:  # type: ignore[no-untyped-def]
    with psycopg.connect(lc.dsn(name), autocommit=True) as c:
        return str(c.execute(f"SHOW {param}").fetchone()[0])  # type: ignore[index]


def listing(lc, capsys) -> dict:  # type: ignore[no-untyped-def]
    capsys.readouterr()
    assert main(["list", "--dir", str(lc.dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def wait_all_streaming(lc, capsys, master: str) -> None:  # type: ignore[no-untyped-def]
    """The switchover precondition, waited for explicitly: ``pgsidecar list --json`` shows
    ``master`` as leader and every other member a running, streaming replica."""

    def ready() -> bool:
        doc = listing(lc, capsys)
        rows = doc["members"]
        return (
            doc["leader"] == master
            and len(rows) == len(lc.members)
            and all(r["pg_running"] and r["streaming"] for r in rows if r["name"] != master)
        )

    wait_for(ready, 30, interval=0.5, what="every replica running and streaming")


def switchover(lc, capsys, *args: str) -> None:  # type: ignore[no-untyped-def]
    """Request a switchover once: it must be accepted (no retry hides a wrong refusal)."""
    capsys.readouterr()
    rc = main(["switchover", "--dir", str(lc.dir), *args])
    err = capsys.readouterr().err
    assert rc == 0, f"switchover {' '.join(args)} refused: {err}"


def test_parameters_reload_pending_restart_rolling_restart_and_reinit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with local_cluster(ttl=TTL) as lc:
        master = lc.master()
        names = [m.name for m in lc.members]
        # a reloadable parameter reaches every member without a restart
        assert (
            main(["config", "set", "--dir", str(lc.dir), "postgresql.parameters.work_mem=8MB"]) == 0
        )
        wait_for(
            lambda: all(show(lc, n, "work_mem") == "8MB" for n in names),
            30,
            what="work_mem applied",
        )
        # one that needs a restart is marked pending on every member
        assert (
            main(
                ["config", "set", "--dir", str(lc.dir), "postgresql.parameters.max_connections=120"]
            )
            == 0
        )
        wait_for(
            lambda: all(m.get("pending_restart") for m in listing(lc, capsys)["members"]),
            30,
            what="pending restart on every member",
        )
        assert main(["restart", "--all", "--pending-only", "--dir", str(lc.dir)]) == 0
        assert all(show(lc, n, "max_connections") == "120" for n in names)
        assert lc.master() == master, "a rolling restart without --switchover keeps the master"
        wait_for(
            lambda: not any(m.get("pending_restart") for m in listing(lc, capsys)["members"]),
            30,
            what="pending restarts cleared",
        )
        # reinit of a replica: a fresh clone, streaming again
        victim = next(n for n in names if n != master)
        assert main(["reinit", "--dir", str(lc.dir), master]) == 1, (
            "reinit of the master is refused"
        )
        assert main(["reinit", "--dir", str(lc.dir), victim]) == 0
        journal = (lc.member(victim).dir / "journal.jsonl").read_text().splitlines()
        recs = [json.loads(x) for x in journal if x.strip()]
        assert any(r["kind"] == "transition" and r["body"]["trigger"] == "reinit" for r in recs)
        assert (
            sum(1 for r in recs if r["kind"] == "action" and r["body"]["name"] == "basebackup") >= 2
        )


def test_forced_failover_when_no_member_may_be_promoted(capsys: pytest.CaptureFixture[str]) -> None:
    with local_cluster(ttl=TTL, extra={"settings.synchronous_mode": "on"}) as lc:
        sync = lc.wait_sync(timeout=30)
        master = lc.master()
        rest = next(m.name for m in lc.members if m.name not in (master, sync[0]))
        assert main(["failover", "--dir", str(lc.dir), "--to", rest]) == 1
        assert "healthy master" in capsys.readouterr().err
        # the master and its synchronous standby die: the last member may not promote itself
        lc.kill_member(master)
        lc.kill_member(sync[0])
        wait_for(lambda: lc.read_view().leader is None, TTL * 3, what="the old lease to lapse")
        import time

        time.sleep(TTL)
        assert lc.master() is None, "a member outside the synchronous set must not promote itself"
        assert main(["failover", "--dir", str(lc.dir), "--to", rest, "--timeout", "5"]) == 1
        assert (
            main(["failover", "--dir", str(lc.dir), "--to", rest, "--force", "--timeout", "30"])
            == 0
        )
        wait_for(lambda: lc.master() == rest, 20, what=f"{rest} serving as master")


def test_scheduled_switchover_fires_at_its_time_and_can_be_cancelled(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import time

    with local_cluster(ttl=TTL) as lc:
        master = lc.master()
        target = next(m.name for m in lc.members if m.name != master)
        wait_all_streaming(lc, capsys, master)
        switchover(lc, capsys, "--to", target, "--at", "+600")
        assert main(["switchover", "--dir", str(lc.dir), "--cancel"]) == 0
        assert lc.read_view().switchover is None
        assert (
            main(
                ["switchover", "--dir", str(lc.dir), "--to", target, "--at", "2000-01-01T00:00:00Z"]
            )
            == 1
        )
        assert "in the past" in capsys.readouterr().err
        # the target must be a streaming replica at the moment of the request: wait for that
        # precondition, then ask once
        wait_all_streaming(lc, capsys, master)
        t0 = time.monotonic()
        switchover(lc, capsys, "--to", target, "--at", "+4")
        time.sleep(2)
        assert lc.master() == master, "a scheduled switchover must not fire early"
        wait_for(lambda: lc.master() == target, 20, what="the scheduled switchover")
        assert time.monotonic() - t0 >= 3.5
