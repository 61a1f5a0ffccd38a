"""Operator commands against real processes: the CLI against a real etcd only, where every refusal
is checked to change nothing; and one real local cluster, where a pause is seen by the agents (a
replica whose PostgreSQL is killed is not restarted until resume) and PostgreSQL parameters are
validated by the master's PostgreSQL before anything is stored. The pure checks are in
tests/unit/test_cli_ops.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgsidecar.cli import main
from pgsidecar.ops import (
    OpsError,
    request_switchover,
)
from tests.support.clusterutil import local_cluster, wait_for

MB = 1024 * 1024


class Cli:
    """Runs `pgsidecar ...` in-process (in a thread: the CLI runs its own event loop) against the
    test's etcd, through an agent config naming the DCS and the cluster."""

    def __init__(self, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.config = config
        self.capsys = capsys

    async def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        args = [*argv, "--config", str(self.config)]
        rc = await asyncio.to_thread(main, args)
        out, err = self.capsys.readouterr()
        return rc, out, err


def _agent_config(path: Path, endpoint: str, prefix: str, cluster: str) -> Path:
    cfg = {
        "name": "operator",
        "cluster": cluster,
        "state_dir": str(path / "state"),
        "postgresql": {"data_dir": str(path / "pgdata")},
        "dcs": {"type": "etcd", "prefix": prefix, "etcd": {"endpoints": [endpoint]}},
    }
    f = path / "agent.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


@pytest.fixture
async def dcs_cli(etcd_dcs_factory: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Any:
    dcs = etcd_dcs_factory(cluster="ops")
    await dcs.connect()
    await dcs.try_initialize("pg1")  # the cluster exists
    cfg = _agent_config(tmp_path, etcd_dcs_factory.server.endpoint, dcs.prefix, dcs.cluster)
    return dcs, Cli(cfg, capsys)


async def test_config_set_show_round_trip(dcs_cli: Any) -> None:
    dcs, cli = dcs_cli
    rc, out, err = await cli(
        "config", "set", "ttl=7", "maximum_lag_on_failover=2MB", "synchronous_mode=on"
    )
    assert rc == 0, err
    assert "changed ttl: (unset) -> 7.0" in out
    assert (await dcs.read_cluster()).config == {
        "ttl": 7.0,
        "maximum_lag_on_failover": 2 * MB,
        "synchronous_mode": "on",
    }
    rc, out, _ = await cli("config", "show")
    assert rc == 0
    assert yaml.safe_load(out) == {
        "ttl": 7.0,
        "maximum_lag_on_failover": 2 * MB,
        "synchronous_mode": "on",  # quoted in the YAML: a bare `on` would read as true
    }
    rc, out, _ = await cli("config", "set", "ttl=null", "election_timeout=2")
    assert rc == 0
    assert (await dcs.read_cluster()).config == {
        "maximum_lag_on_failover": 2 * MB,
        "synchronous_mode": "on",
        "election_timeout": 2.0,
    }
    rc, out, _ = await cli("config", "set", "election_timeout=2")
    assert rc == 0 and "nothing to change" in out


@pytest.mark.parametrize(
    "assignments,message",
    [
        (["ttl=1"], "ttl"),
        (["ttl=8", "bogus=1"], "unknown config key 'bogus'"),  # the valid one is not stored either
        (["pause=sometimes"], "pause"),
        (["synchronous_mode=2"], "synchronous_mode"),
        (["postgresql.parameters.work_mem=1MB"], "no member's PostgreSQL is running"),
        # the DCS is not a root shell: refused before connecting, with how to allow one
        (["postgresql.parameters.archive_command=sh -c id"], "--allow-from-dcs"),
        (["postgresql.parameters.shared_preload_libraries=evil"], "loads code"),
    ],
)
async def test_config_set_refusals_change_nothing(
    dcs_cli: Any, assignments: list[str], message: str
) -> None:
    dcs, cli = dcs_cli
    await dcs.put_config({"ttl": 5.0})
    before = await dcs.read_cluster()
    rc, out, err = await cli("config", "set", *assignments)
    assert rc == 1
    assert message in err and "refused" in err
    after = await dcs.read_cluster()
    assert after.config == {"ttl": 5.0}
    assert after.index == before.index, "nothing was written to the DCS"


async def test_config_show_says_which_stored_parameters_this_member_refuses(
    dcs_cli: Any,
) -> None:
    dcs, cli = dcs_cli
    # stored by someone with DCS write access, past the CLI
    await dcs.put_config(
        {"postgresql": {"parameters": {"archive_command": "sh -c id", "work_mem": "8MB"}}}
    )
    rc, out, _ = await cli("config", "show")
    assert rc == 0
    assert yaml.safe_load(out)["postgresql"]["parameters"]["work_mem"] == "8MB"
    refused = [line for line in out.splitlines() if line.startswith("# refused")]
    assert len(refused) == 1 and "archive_command runs a shell command" in refused[0]


async def test_pause_resume(dcs_cli: Any) -> None:
    dcs, cli = dcs_cli
    await dcs.put_config({"ttl": 5.0})
    rc, out, err = await cli("pause")
    assert rc == 0, err
    assert "changed pause: (unset) -> True" in out and "paused" in out
    assert (await dcs.read_cluster()).config == {"ttl": 5.0, "pause": True}  # merged
    index = (await dcs.read_cluster()).index
    rc, _, err = await cli("pause")
    assert rc == 1 and "already paused" in err
    assert (await dcs.read_cluster()).index == index
    # commands that need the agents to act are refused while paused
    with pytest.raises(OpsError, match="paused"):
        await request_switchover(dcs, None)
    rc, out, err = await cli("resume")
    assert rc == 0, err
    assert (await dcs.read_cluster()).config == {"ttl": 5.0}
    rc, _, err = await cli("resume")
    assert rc == 1 and "not paused" in err


async def test_commands_refuse_a_cluster_that_does_not_exist(
    etcd_dcs_factory: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dcs = etcd_dcs_factory(cluster="nothing-here")
    await dcs.connect()
    cfg = _agent_config(tmp_path, etcd_dcs_factory.server.endpoint, dcs.prefix, dcs.cluster)
    cli = Cli(cfg, capsys)
    for argv in (("pause",), ("config", "set", "ttl=5"), ("config", "show")):
        rc, _, err = await cli(*argv)
        assert rc == 1 and "no cluster 'nothing-here'" in err, argv
    view = await dcs.read_cluster()
    assert view.config is None and view.index == (await dcs.read_cluster()).index


def _editor(tmp_path: Path, script: str) -> str:
    """An $EDITOR that rewrites the file it is given with ``script`` (Python, ``text`` in/out)."""
    path = tmp_path / "editor.py"
    path.write_text(
        "import sys\n"
        "p = sys.argv[1]\n"
        "text = open(p).read()\n" + script + "\nopen(p, 'w').write(text)\n"
    )
    return f"{sys.executable} {path}"


async def test_config_edit(dcs_cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dcs, cli = dcs_cli
    await dcs.put_config({"ttl": 5.0})
    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.setenv(
        "EDITOR", _editor(tmp_path, "text = text.replace('ttl: 5.0', 'ttl: 9\\npause: true')")
    )
    rc, out, err = await cli("config", "edit")
    assert rc == 0, err
    assert (await dcs.read_cluster()).config == {"ttl": 9.0, "pause": True}

    # refusals: nothing changes
    index = (await dcs.read_cluster()).index
    for script, message in (
        ("text = text + '\\nttl: [unclosed'", "not valid YAML"),
        ("text = text + '\\nloop_wait: 10'", "unknown config key 'loop_wait'"),
        ("text = text.replace('ttl: 9.0', 'ttl: fast')", "ttl"),
        ("raise SystemExit(3)", "exited with 3"),
    ):
        monkeypatch.setenv("EDITOR", _editor(tmp_path, script))
        rc, _, err = await cli("config", "edit")
        assert rc == 1 and message in err, (script, err)
        assert (await dcs.read_cluster()).index == index


# ------------------------------------------------------------------------------ a real cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with local_cluster(ttl=5.0) as lc:
        yield lc


def _cli(lc: Any, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([*argv, "--dir", str(lc.dir)])
    out, err = capsys.readouterr()
    return rc, out, err


def _dcs_config(lc: Any, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    rc, out, err = _cli(lc, capsys, "config", "show")
    assert rc == 0, err
    return yaml.safe_load(out) or {}


@pytest.mark.integration
def test_pause_is_seen_by_the_agents(cluster: Any, capsys: pytest.CaptureFixture[str]) -> None:
    lc = cluster
    master = lc.master()
    assert master is not None
    replica = next(m.name for m in lc.members if m.name != master)
    rc, _, err = _cli(lc, capsys, "pause")
    assert rc == 0, err
    try:
        wait_for(
            lambda: all((lc.api_status(m.name) or {}).get("paused") for m in lc.members),
            10,
            what="every agent to see the pause",
        )
        rc, out, _ = _cli(lc, capsys, "list")
        member_lines = [ln for ln in out.splitlines() if ln.startswith("| pg")]
        assert len(member_lines) == 3 and all("paused" in ln for ln in member_lines)
        rc, _, err = _cli(lc, capsys, "switchover")
        assert rc == 1 and "paused" in err

        pm = lc.postmaster_pid(replica)
        assert pm is not None
        os.kill(pm, signal.SIGKILL)
        wait_for(
            lambda: (lc.api_status(replica) or {}).get("pg_running") is False,
            10,
            what=f"{replica}'s agent to see its PostgreSQL gone",
        )
        # paused: the agent leaves it down (normally it restarts it within a second)
        time.sleep(3)
        assert lc.postmaster_pid(replica) is None, "the agent restarted PostgreSQL while paused"
        st = lc.api_status(replica) or {}
        assert st.get("pg_running") is False and st.get("role") == "replica"
        assert lc.master() == master, "the master keeps its lease while paused"
    finally:
        rc, _, err = _cli(lc, capsys, "resume")
    assert rc == 0, err
    # resumed: the agent takes the cluster as it finds it and restarts the replica
    wait_for(
        lambda: (lc.api_status(replica) or {}).get("streaming"),
        30,
        what=f"{replica} to be restarted and stream after resume",
    )
    assert lc.postmaster_pid(replica) is not None
    assert lc.master() == master


@pytest.mark.integration
@pytest.mark.parametrize(
    "assignment,message",
    [
        ("postgresql.parameters.work_mem=lots", "not a number"),
        ("postgresql.parameters.max_connections=0", "below the minimum 1"),
        ("postgresql.parameters.shared_buffers=64kB", "below the minimum 16"),
        ("postgresql.parameters.wal_level=archive", "not one of minimal, replica, logical"),
        ("postgresql.parameters.no_such_setting=1", "knows no parameter 'no_such_setting'"),
        ("postgresql.parameters.datestyle=sideways", "refuses 'sideways'"),  # its check hook
        ("postgresql.parameters.port=6543", "set by the agent"),
        ("postgresql.parameters.server_version=99", "read-only"),
    ],
)
def test_postgresql_parameters_are_validated_by_the_master(
    cluster: Any, capsys: pytest.CaptureFixture[str], assignment: str, message: str
) -> None:
    lc = cluster
    before = _dcs_config(lc, capsys)
    rc, out, err = _cli(lc, capsys, "config", "set", "ttl=6", assignment)
    assert rc == 1, out
    assert message in err, err
    name = assignment.split("=")[0].rsplit(".", 1)[1]
    assert f"postgresql.parameters.{name}" in err
    assert _dcs_config(lc, capsys) == before, "a refused change stores nothing"


@pytest.mark.integration
def test_valid_postgresql_parameters_are_stored(
    cluster: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    lc = cluster
    rc, out, err = _cli(
        lc,
        capsys,
        "config",
        "set",
        "postgresql.parameters.work_mem=64MB",
        "postgresql.parameters.shared_buffers=256MB",  # postmaster context: pg_settings checks
        "postgresql.parameters.random_page_cost=1.1",
        "postgresql.parameters.log_min_duration_statement=250ms",
        "postgresql.parameters.DateStyle=ISO, DMY",
    )
    assert rc == 0, err
    params = _dcs_config(lc, capsys)["postgresql"]["parameters"]
    assert params == {
        "work_mem": "64MB",
        "shared_buffers": "256MB",
        "random_page_cost": "1.1",
        "log_min_duration_statement": "250ms",
        "datestyle": "ISO, DMY",
    }
    rc, _, err = _cli(
        lc,
        capsys,
        "config",
        "set",
        *(f"postgresql.parameters.{p}=null" for p in params),
    )
    assert rc == 0, err
    assert "postgresql" not in _dcs_config(lc, capsys)


@pytest.mark.integration
def test_list_json_and_watch(cluster: Any, capsys: pytest.CaptureFixture[str]) -> None:
    lc = cluster
    # the members publish their state about once a second: wait until every one has settled
    # (an earlier test of this module restarts PostgreSQL on some of them)
    deadline = time.monotonic() + 30
    while True:
        rc, out, _ = _cli(lc, capsys, "list", "--json")
        assert rc == 0
        doc = json.loads(out)
        settled = all(
            m["state"] == ("running" if m["leader"] else "streaming") for m in doc["members"]
        )
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert doc["cluster"] == lc.cluster and doc["paused"] is False
    assert doc["leader"] == lc.master()
    assert sorted(m["name"] for m in doc["members"]) == [m.name for m in lc.members]
    for m in doc["members"]:
        assert m["state"] == ("running" if m["leader"] else "streaming")
        assert isinstance(m["pending_restart"], bool) and isinstance(m["tags"], dict)

    # --watch refreshes until Ctrl-C, which ends it cleanly
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgsidecar", "list", "--dir", str(lc.dir), "--watch", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        tables = 0
        deadline = time.monotonic() + 20
        while tables < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("+ Cluster:"):
                tables += 1
        assert tables == 2, "two refreshes"
        proc.send_signal(signal.SIGINT)
        # keep draining its output: a refresh blocked on a full pipe would not see the signal
        proc.communicate(timeout=30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def _code(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


@pytest.mark.integration
def test_synchronous_mode_set_live_is_seen_by_the_health_checks(
    cluster: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`config set synchronous_mode=on` on a running cluster: the master records a synchronous
    set, and /synchronous, /asynchronous, /read-only-sync and `list` follow it."""
    lc = cluster
    master = lc.master()
    assert master is not None
    url = {m.name: m.api_url for m in lc.members}
    rc, _, err = _cli(lc, capsys, "config", "set", "synchronous_mode=on")
    assert rc == 0, err
    try:

        def sync_members() -> list[str]:
            return [n for n in url if n != master and _code(url[n] + "/synchronous") == 200]

        (sync,) = wait_for(sync_members, 20, what="one synchronous standby")
        (other,) = [n for n in url if n not in (master, sync)]
        assert _code(url[sync] + "/asynchronous") == 503
        assert _code(url[other] + "/asynchronous") == 200
        assert _code(url[other] + "/synchronous") == 503
        assert _code(url[master] + "/read-only-sync") == 200
        assert _code(url[master] + "/synchronous") == 503
        rc, out, _ = _cli(lc, capsys, "list")
        line = next(ln for ln in out.splitlines() if ln.startswith(f"| {sync} "))
        assert "sync replica" in line
    finally:
        rc, _, err = _cli(lc, capsys, "config", "set", "synchronous_mode=null")
    assert rc == 0, err
    wait_for(
        lambda: all(_code(url[n] + "/synchronous") == 503 for n in url),
        20,
        what="the synchronous set to be given up",
    )
