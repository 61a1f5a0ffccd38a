"""Operator commands (pgsidecar/cli/cluster.py, pgsidecar/ops.py), the pure parts: config keys,
PostgreSQL value rules, the list table. Against real etcd and a real cluster:
tests/e2e/test_cli_ops_e2e.py."""

from __future__ import annotations

from typing import Any

import pytest

from events.dcs import ClusterView, Leader
from fsm.inputs import DYNAMIC_SETTINGS
from pgsidecar.cli.cluster import list_document, render_table
from pgsidecar.ops import (
    CLUSTER_KEYS,
    ConfigChangeError,
    PgSetting,
    check_pg_parameter,
    members_table,
    parse_assignments,
    parse_pg_bool,
    validate_document,
)

MB = 1024 * 1024

# ------------------------------------------------------------------------------------------ pure


def test_every_dynamic_setting_the_machine_reads_can_be_set() -> None:
    assert set(DYNAMIC_SETTINGS) <= set(CLUSTER_KEYS)
    assert "pause" in CLUSTER_KEYS


@pytest.mark.parametrize(
    "arg,message",
    [
        ("ttl=1", "ttl"),
        ("ttl=soon", "ttl"),
        ("maximum_lag_on_failover=-1", "maximum_lag_on_failover"),
        ("maximum_lag_on_failover=1.5", "maximum_lag_on_failover"),
        ("election_timeout=0", "election_timeout"),
        ("master_start_timeout=never", "master_start_timeout"),
        ("synchronous_mode=sometimes", "synchronous_mode"),
        ("pause=maybe", "pause"),
        ("loop_wait=10", "unknown config key 'loop_wait'"),
        ("postgresql.port=5432", "unknown config key 'postgresql.port'"),
        ("ttl", "not KEY=VALUE"),
        ("=5", "not KEY=VALUE"),
    ],
)
def test_bad_assignments_name_the_key(arg: str, message: str) -> None:
    with pytest.raises(ConfigChangeError, match=message.replace(".", r"\.")) as exc:
        parse_assignments([arg])
    if "unknown" in message:
        assert "valid keys: ttl" in str(exc.value)


def test_assignments_are_typed() -> None:
    got = dict(
        parse_assignments(
            [
                "ttl=7",
                "maximum_lag_on_failover=2MB",
                "synchronous_mode=ON",
                "pause=false",
                "postgresql.parameters.Work_Mem=64MB",
                "postgresql.parameters.max_connections=200",
                "postgresql.parameters.auto_explain.log_min_duration=5s",
            ]
        )
    )
    assert got[("ttl",)] == 7.0
    assert got[("maximum_lag_on_failover",)] == 2 * MB
    assert got[("synchronous_mode",)] == "on"
    assert got[("pause",)] is False
    assert got[("postgresql", "parameters", "work_mem")] == "64MB"
    assert got[("postgresql", "parameters", "max_connections")] == 200
    assert got[("postgresql", "parameters", "auto_explain.log_min_duration")] == "5s"


def test_validate_document_for_edit() -> None:
    old = {"ttl": 5.0, "written_by_another_version": 1}
    new, pg = validate_document(
        {
            "ttl": 6,
            "written_by_another_version": 1,  # unchanged: kept, not refused
            "synchronous_mode": True,  # YAML's reading of a bare `on`
            "postgresql": {"parameters": {"work_mem": "8MB"}},
        },
        old,
    )
    assert new["ttl"] == 6.0 and new["synchronous_mode"] == "on"
    assert new["written_by_another_version"] == 1
    assert pg == {"work_mem": "8MB"}
    with pytest.raises(ConfigChangeError, match="unknown config key 'tll'"):
        validate_document({"tll": 5}, old)
    with pytest.raises(ConfigChangeError, match="only 'parameters'"):
        validate_document({"postgresql": {"port": 1}}, old)
    with pytest.raises(ConfigChangeError, match="mapping"):
        validate_document(["ttl"], old)


SHARED_BUFFERS = PgSetting("shared_buffers", "integer", "postmaster", "8kB", "16", "1073741823")
WORK_MEM = PgSetting("work_mem", "integer", "user", "kB", "64", "2147483647")
TIMEOUT = PgSetting("statement_timeout", "integer", "user", "ms", "0", "2147483647")
COST = PgSetting("random_page_cost", "real", "user", None, "0", "1.79769e+308")
WAL_LEVEL = PgSetting("wal_level", "enum", "postmaster", enumvals=("minimal", "replica", "logical"))
FSYNC = PgSetting("fsync", "bool", "sighup")
BLOCK = PgSetting("block_size", "integer", "internal", None, "8192", "8192")


@pytest.mark.parametrize(
    "setting,value",
    [
        (SHARED_BUFFERS, "128MB"),
        (SHARED_BUFFERS, "16"),
        (SHARED_BUFFERS, "1.5GB"),
        (WORK_MEM, 65536),
        (WORK_MEM, "4MB"),
        (TIMEOUT, "30s"),
        (TIMEOUT, "1min"),
        (TIMEOUT, 0),
        (COST, "1.1"),
        (WAL_LEVEL, "LOGICAL"),
        (FSYNC, "on"),
        (FSYNC, True),
        (FSYNC, "of"),
    ],
)
def test_pg_values_postgresql_accepts(setting: PgSetting, value: Any) -> None:
    check_pg_parameter(setting, setting.name, value, "pg1")


@pytest.mark.parametrize(
    "setting,value,message",
    [
        (SHARED_BUFFERS, "64kB", "below the minimum 16 8kB"),
        (SHARED_BUFFERS, "lots", "not a number"),
        (SHARED_BUFFERS, "128mb", "unit 'mb' is not valid"),
        (SHARED_BUFFERS, "5s", "unit 's' is not valid"),
        (WORK_MEM, "32kB", "below the minimum 64"),
        (TIMEOUT, -1, "below the minimum 0"),
        (COST, "1ms", "takes no unit"),
        (WAL_LEVEL, "archive", "not one of minimal, replica, logical"),
        (WAL_LEVEL, "minimal", "no WAL for replicas"),
        (FSYNC, "o", "not a boolean"),
        (BLOCK, "8192", "read-only"),
        (None, "1", "knows no parameter"),
        (PgSetting("port", "integer", "postmaster", None, "1", "65535"), 5433, "set by the agent"),
        (PgSetting("hot_standby", "bool", "postmaster"), "off", "unqueryable"),
    ],
)
def test_pg_values_postgresql_refuses(setting: PgSetting | None, value: Any, message: str) -> None:
    name = setting.name if setting else "no_such_thing"
    with pytest.raises(ConfigChangeError, match=message) as exc:
        check_pg_parameter(setting, name, value, "pg1")
    assert f"postgresql.parameters.{name}" in str(exc.value)


def test_parse_pg_bool_follows_postgresql() -> None:
    for t in ("on", "ON", "true", "t", "yes", "y", "1"):
        assert parse_pg_bool(t) is True, t
    for f in ("off", "of", "false", "f", "no", "n", "0"):
        assert parse_pg_bool(f) is False, f
    for bad in ("o", "", "2", "maybe"):
        assert parse_pg_bool(bad) is None, bad


def _view(paused: bool) -> ClusterView:
    return ClusterView(
        leader=Leader("pg1", 12),
        members={
            "pg1": {
                "role": "master",
                "running": True,
                "timeline": 3,
                "lsn": 300 * MB,
                "host": "10.0.0.1",
                "port": 5432,
                "tags": {"nofailover": False, "failover_priority": 1},
            },
            "pg2": {
                "role": "replica",
                "running": True,
                "streaming": True,
                "timeline": 3,
                "lsn": 290 * MB,
                "host": "10.0.0.2",
                "port": 5432,
                "pending_restart": True,
                "tags": {"nofailover": True, "failover_priority": 1},
            },
            "pg3": {"role": "replica", "running": False, "state": "stopped", "timeline": 3},
        },
        config={"pause": True} if paused else {},
        sync={"leader": "pg1", "term": 12, "members": ["pg2"]},
    )


def test_list_table_like_patronictl() -> None:
    view = _view(paused=False)
    text = render_table("c1", view, members_table(view))
    lines = text.splitlines()
    assert lines[0].startswith("+ Cluster: c1 (term 12) ")
    header = [c.strip() for c in lines[1].strip("|").split("|")]
    assert header == [
        "Member",
        "Host",
        "Role",
        "State",
        "TL",
        "Lag in MB",
        "Pending restart",
        "Tags",
    ]
    rows = {
        cells[0]: cells
        for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[3:-1])
    }
    assert rows["pg1"][1:7] == ["10.0.0.1:5432", "master", "running", "3", "", ""]
    assert rows["pg2"][1:8] == [
        "10.0.0.2:5432",
        "sync replica",
        "streaming",
        "3",
        "10",
        "*",
        "nofailover: true",
    ]
    assert rows["pg3"][3:6] == ["stopped", "3", "unknown"]
    assert "paused" not in text


def test_list_says_paused_on_every_line() -> None:
    view = _view(paused=True)
    text = render_table("c1", view, members_table(view))
    member_lines = [ln for ln in text.splitlines() if ln.startswith("| pg")]
    assert len(member_lines) == 3
    assert all(ln.rstrip(" |").endswith("paused") for ln in member_lines)
    assert "Maintenance mode: on" in text
    doc = list_document("c1", view)
    assert doc["paused"] is True and doc["term"] == 12 and doc["leader"] == "pg1"
    pg2 = next(m for m in doc["members"] if m["name"] == "pg2")
    # the fields `list --json` always had, and the new ones
    for key in ("name", "role", "host", "port", "api_url", "timeline", "lsn", "lag_bytes"):
        assert key in pg2
    for key in ("pg_running", "streaming", "leader", "state", "pending_restart", "tags", "lag_mb"):
        assert key in pg2
    assert pg2["lag_bytes"] == 10 * MB and pg2["lag_mb"] == 10.0
    assert pg2["sync_standby"] is True
    # a set recorded by an earlier master is not in force
    stale = ClusterView(
        leader=Leader("pg3", 13), members=view.members, sync=view.sync, config=view.config
    )
    assert not any(r["sync_standby"] for r in members_table(stale))
    # nor any set while synchronous_mode is off (the DCS config, else the agents' own setting)
    off = ClusterView(
        leader=view.leader, members=view.members, sync=view.sync, config={"synchronous_mode": "off"}
    )
    assert not any(r["sync_standby"] for r in members_table(off, "on"))
    assert not any(r["sync_standby"] for r in members_table(view, "off"))
    assert any(r["sync_standby"] for r in members_table(view, "on"))


# ------------------------------------------------------------------------------ against etcd only


# -- backup health under the table (the master's /status) -------------------------------------


class _StatusServer:
    """A member's API that answers /status with ``body`` (a real HTTP server on loopback)."""

    def __init__(self, body: dict[str, Any]) -> None:
        import http.server
        import json
        import threading

        outer = self
        self.body = body
        self.requests: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.requests.append(self.path)
                data = json.dumps(outer.body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


HEALTH = {
    "last_archived_age": 12.4,
    "archive_failing": False,
    "archived_count": 40,
    "failed_count": 0,
    "stanza_ok": True,
    "last_backup": "20261204-080000F",
    "last_backup_type": "full",
    "last_backup_age": 7260.0,
    "backups_read_age": 20.0,
    "backups_error": None,
}


def _with_api(view: ClusterView, name: str, url: str) -> ClusterView:
    members = {**view.members, name: {**view.members[name], "api_url": url}}
    return ClusterView(leader=view.leader, members=members, config=view.config, sync=view.sync)


def test_list_asks_the_master_for_its_archiving_and_last_backup() -> None:
    from pgsidecar.cli.cluster import backup_line, fetch_backup_health

    server = _StatusServer({"name": "pg1", "backup": HEALTH})
    try:
        view = _with_api(_view(paused=False), "pg1", server.url)
        health = fetch_backup_health(view, None)
        assert health == {"member": "pg1", **HEALTH}
        assert server.requests == ["/status"]
        doc = list_document("c1", view, backup=health)
        assert doc["backup"]["last_backup_age"] == 7260.0
        assert backup_line(health) == (
            " Backups (master pg1): WAL archiving ok; last WAL archived 12 s ago; "
            "last backup 2 h 1 min ago (20261204-080000F, full)"
        )
        # a master without a backup section says nothing
        server.body = {"name": "pg1", "backup": None}
        assert fetch_backup_health(view, None) is None
        assert backup_line(None) is None
    finally:
        server.close()
    # no master, nobody to ask; a master whose API does not answer: said so
    no_master = ClusterView(leader=None, members=_view(paused=False).members, config={})
    assert fetch_backup_health(no_master, None) is None
    gone = fetch_backup_health(view, None, timeout=1)
    assert gone is not None and gone["member"] == "pg1" and "error" in gone
    assert "unknown, its API did not answer" in (backup_line(gone) or "")
    unpublished = fetch_backup_health(_view(paused=False), None)
    assert unpublished == {"member": "pg1", "error": "it publishes no API address"}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"archive_failing": True}, ["WAL archiving FAILING", "last WAL archived 12 s ago"]),
        ({"last_archived_age": None}, ["WAL archiving ok", "no WAL archived"]),
        ({"archive_failing": None, "last_archived_age": None}, ["WAL archiving not read yet"]),
        ({"last_backup": None, "last_backup_age": None}, ["no backup in the repository"]),
        (
            {"last_backup": None, "last_backup_age": None, "backups_read_age": None},
            ["repository not read yet"],
        ),
        (
            {"backups_error": "[039] repository unreachable"},
            ["last backup 2 h 1 min ago", "repository unreadable: [039] repository unreachable"],
        ),
        ({"last_backup_age": 3 * 86400 + 7200}, ["last backup 3 d 2 h ago"]),
        ({"last_backup_age": 600}, ["last backup 10 min ago"]),
    ],
)
def test_the_backup_line_says_what_is_wrong(change: dict[str, Any], words: list[str]) -> None:
    from pgsidecar.cli.cluster import backup_line

    line = backup_line({"member": "pg1", **HEALTH, **change})
    assert line is not None
    for w in words:
        assert w in line, line
