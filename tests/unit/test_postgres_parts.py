"""The pure parts of pgsidecar.postgres, without a server: the size parser, the config files'
content, pg_controldata's and the probe's interpretation, and how failures become PostgresError."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from fsm.snapshot import DataState
from pgsidecar.api import QueryError, parse_lag
from pgsidecar.config import Credentials, PostgresSettings
from pgsidecar.ops import CLUSTER_KEYS, ConfigChangeError
from pgsidecar.postgres.conf import MEMORY_UNITS, Conninfo, local_host, parse_size
from pgsidecar.postgres.config import (
    AGENT_MANAGED_PARAMS,
    ROLE_KEYS,
    hba_networks,
    primary_conninfo,
    render_hba,
    server_parameters,
)
from pgsidecar.postgres.dataops import DataOps, control_data
from pgsidecar.postgres.errors import PostgresError
from pgsidecar.postgres.osuser import OsUser
from pgsidecar.postgres.sql import (
    connect_error,
    probe_facts,
    statement_error,
    statement_timeout_option,
)
from tests.support.pgtestutil import RecordingLog


def settings(**overrides: object) -> PostgresSettings:
    values: dict[str, object] = {
        "data_dir": Path("/nonexistent/data"),
        "port": 5999,
        "superuser": Credentials(username="postgres", password="x"),
        "replication": Credentials(username="replicator", password="y"),
    }
    values.update(overrides)
    return PostgresSettings(**values)


# ------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("1048576", 1048576),
        ("512kB", 512 * 1024),
        ("512KB", 512 * 1024),
        (" 10 mb ", 10 * 1024**2),
        ("1.5GB", 3 * 1024**3 // 2),
        (".5kB", 512),
        ("3B", 3),
        ("2TB", 2 * 1024**4),
        ("9007199254740993", 9007199254740993),  # above 2**53: exact, not through a float
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MB", "10 XB", "-1", "1e3", "1 2", "10MBs", "0x10"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_size_whole_refuses_a_fraction() -> None:
    assert parse_size("3MB", whole=True) == 3 * 1024**2
    with pytest.raises(ValueError):
        parse_size("1.5MB", whole=True)


def test_memory_units_are_postgresqls_spelling() -> None:
    # postgresql.conf is case-sensitive: these are the spellings it accepts
    assert list(MEMORY_UNITS) == ["B", "kB", "MB", "GB", "TB"]


def test_both_size_users_share_the_parser() -> None:
    """The health check's lag= and the cluster config's maximum_lag_on_failover accept the same
    sizes (the latter whole numbers only) and refuse the same nonsense."""
    assert parse_lag("10MB") == 10 * 1024**2 and parse_lag("1.5kB") == 1536
    with pytest.raises(QueryError):
        parse_lag("10 parsecs")
    max_lag = CLUSTER_KEYS["maximum_lag_on_failover"][1]
    assert max_lag("10mb") == 10 * 1024**2 and max_lag(" 512 kB ") == 512 * 1024
    for bad in ("1.5MB", "10 parsecs"):
        with pytest.raises(ConfigChangeError):
            max_lag(bad)


# ------------------------------------------------------------------------------- config files


def test_primary_and_standby_differ_only_in_reloadable_recovery_settings() -> None:
    """Everything a role switch changes must be reloadable: a setting that only a restart can
    change, present in one role's file and not in the other's, shows as pending_restart after a
    promotion (recovery_target_timeline did)."""
    s = settings(parameters={"work_mem": "8MB"})
    dsn = primary_conninfo(Conninfo("10.0.0.2", 5432, "replicator"), Path("/s/pgpass"), "m-1")
    standby, _ = server_parameters(s, "m-1", "standby", dsn, "m_1")
    primary, _ = server_parameters(s, "m-1", "primary", None, None)
    differing = {k for k in standby.keys() | primary.keys() if standby.get(k) != primary.get(k)}
    assert differing == ROLE_KEYS
    assert primary["recovery_target_timeline"] == standby["recovery_target_timeline"] == "latest"
    assert standby["primary_slot_name"] == "m_1" and primary["work_mem"] == "8MB"


def test_server_parameters_keep_what_the_agent_manages() -> None:
    s = settings(
        parameters={"port": 1, "cluster_name": "m-1", "recovery_target_timeline": "current"}
    )
    params, ignored = server_parameters(
        s, "m-1", "standby", None, "slot", {"primary_conninfo": "host=evil", "work_mem": "4MB"}
    )
    assert ignored == ["port"]  # a user value equal to the managed one is not worth a warning
    assert params["port"] == 5999 and params["unix_socket_directories"] == ""
    assert params["recovery_target_timeline"] == "latest"
    # a standby without an upstream has neither a conninfo nor a slot
    assert "primary_conninfo" not in params and "primary_slot_name" not in params
    assert params["work_mem"] == "4MB"
    assert set(params) >= AGENT_MANAGED_PARAMS - ROLE_KEYS


def test_primary_conninfo_names_the_passfile_and_short_timeouts() -> None:
    dsn = conninfo_to_dict(
        primary_conninfo(Conninfo("db host", 5433, "rep"), Path("/s p/pgpass"), "m-1")
    )
    assert dsn["host"] == "db host" and dsn["application_name"] == "m-1"
    assert dsn["passfile"] == "/s p/pgpass" and "password" not in dsn
    assert dsn["connect_timeout"] == "3" and dsn["keepalives_idle"] == "5"


def test_hba_covers_the_agents_own_address() -> None:
    assert hba_networks(["127.0.0.1/32"], "127.0.0.1") == ["127.0.0.1/32"]
    assert hba_networks(["10.9.0.0/16"], "10.1.2.3") == ["10.9.0.0/16", "10.1.2.3/32"]
    assert hba_networks(["bogus", "::/0"], "::1") == ["bogus", "::/0"]
    assert hba_networks([], "db.example") == []  # a name: the operator's networks must cover it
    assert local_host("*") == "127.0.0.1" and local_host("::") == "::1"
    assert local_host("10.1.2.3, 127.0.0.1") == "10.1.2.3"
    hba = render_hba(["10.9.0.0/16"])
    assert "host    all          all   10.9.0.0/16  scram-sha-256" in hba
    assert "host    replication  all   10.9.0.0/16  scram-sha-256" in hba
    with pytest.raises(PostgresError, match="invalid hba network"):
        render_hba(["10.0.0.0/8 trust"])


# ------------------------------------------------------------------------------- controldata, probe

CONTROLDATA = """\
pg_control version number:            1300
Database system identifier:           7301234567890123456
Database cluster state:               {state}
Latest checkpoint location:           0/3000028
Latest checkpoint's REDO location:    0/3000028
Latest checkpoint's TimeLineID:       2
Minimum recovery ending location:     0/0
Min recovery ending loc's timeline:   0
"""


@pytest.mark.parametrize(
    ("state", "backup_label", "data", "clean"),
    [
        ("shut down", False, DataState.PRIMARY_CLEAN, True),
        ("shut down in recovery", False, DataState.STANDBY, True),
        ("in archive recovery", False, DataState.STANDBY, False),
        ("in production", False, DataState.PRIMARY_CRASHED, False),
        ("in production", True, DataState.STANDBY, False),  # a fresh pg_basebackup copy
    ],
)
def test_control_data(state: str, backup_label: bool, data: DataState, clean: bool) -> None:
    cd = control_data(CONTROLDATA.format(state=state), backup_label)
    assert cd.data_state is data and cd.clean is clean
    assert cd.system_id == "7301234567890123456" and cd.timeline == 2
    assert cd.checkpoint_lsn == 0x3000028 and cd.min_recovery_end_lsn == 0
    assert control_data("garbage\n", False).data_state is DataState.INVALID


def probe_row(**kw: object) -> tuple[object, ...]:
    row: dict[str, object] = {
        "in_recovery": True,
        "data_directory": "/data",
        "system_id": "73",
        "flush_lsn": None,
        "wal_tli": None,
        "received": 200,
        "replayed": 150,
        "ckpt_tli": 1,
        "minrec_tli": 0,
        "status": "streaming",
        "received_tli": 3,
        "sender_host": "10.0.0.1",
        "sender_port": 5432,
        "msg_age": 0.3,
        "receiver_timeout": 4.0,
    }
    row.update(kw)
    return tuple(row.values())


def test_probe_facts_of_a_standby_remember_the_timeline_received() -> None:
    facts, seen = probe_facts(probe_row(), 0)
    assert facts.in_recovery and facts.data is DataState.STANDBY and facts.receiver_streaming
    assert facts.timeline == 3 and seen == 3 and facts.lsn == 200
    assert facts.receiver_upstream == "10.0.0.1:5432"
    # the receiver stopped (its row is gone): the timeline received before still counts
    facts, seen = probe_facts(probe_row(status=None, received_tli=None, sender_host=None), seen)
    assert facts.timeline == 3 and seen == 3 and not facts.receiver_streaming
    assert facts.receiver_upstream is None


@pytest.mark.parametrize(
    ("status", "msg_age", "receiver_timeout", "streaming"),
    [
        # WAL or a keepalive arrived a moment ago
        ("streaming", 0.3, 4.0, True),
        # an idle link: the walreceiver pinged after 2 s of silence, the answer is on its way
        ("streaming", 2.6, 4.0, True),
        # nothing for longer than the ping and its answer take: the sender is cut off, though
        # the walreceiver has not timed out yet and still says 'streaming'
        ("streaming", 3.1, 4.0, False),
        ("streaming", 3.9, 4.0, False),
        # the derived timeout of a short TTL: silence limit 2.25 s
        ("streaming", 2.3, 2.5, False),
        # wal_receiver_timeout = 0: no pings, so silence says nothing; the status decides
        ("streaming", 60.0, 0.0, True),
        # no receipt time reported: the status decides
        ("streaming", None, 4.0, True),
        # a receiver that is not streaming, however fresh its last message
        ("waiting", 0.1, 4.0, False),
        ("catchup", 0.1, 4.0, False),
    ],
)
def test_probe_facts_judge_the_stream_by_its_last_message(
    status: str, msg_age: float | None, receiver_timeout: float, streaming: bool
) -> None:
    row = probe_row(status=status, msg_age=msg_age, receiver_timeout=receiver_timeout)
    facts, _ = probe_facts(row, 0)
    assert facts.receiver_streaming is streaming
    # a silent stream still names its sender (the walreceiver is connected to it)
    assert facts.receiver_upstream == "10.0.0.1:5432"


def test_probe_facts_of_a_primary() -> None:
    row = probe_row(in_recovery=False, flush_lsn=900, wal_tli=4, received=None, replayed=None)
    facts, seen = probe_facts(row, 7)
    assert facts.in_recovery is False and facts.data is DataState.PRIMARY_CRASHED
    assert facts.timeline == 4 and facts.lsn == 900 and seen == 7


# ------------------------------------------------------------------------------- errors


def test_errors_become_postgres_error() -> None:
    ci = Conninfo("10.0.0.9", 5433, "postgres")
    err = connect_error(ci, psycopg.OperationalError("connection refused\n"), 5)
    assert isinstance(err, PostgresError)
    assert str(err) == "cannot connect to 10.0.0.9:5433 as postgres: connection refused"
    assert str(connect_error(ci, TimeoutError(), 2.5)) == (
        "connecting to 10.0.0.9:5433 as postgres timed out after 2.5s"
    )
    err = statement_error("CHECKPOINT", psycopg.errors.QueryCanceled("canceling statement"), 9)
    assert str(err) == "CHECKPOINT failed: canceling statement"
    assert str(statement_error("ensure_slots", TimeoutError(), 30)) == (
        "ensure_slots timed out after 30s"
    )


def test_every_connection_carries_a_statement_timeout() -> None:
    assert statement_timeout_option(2) == "-c statement_timeout=2000"
    assert statement_timeout_option(0.0001) == "-c statement_timeout=1"  # never 0 = unlimited
    for unbounded in (0, -1):
        with pytest.raises(ValueError):
            statement_timeout_option(unbounded)


# ------------------------------------------------------------------------------- timeline history files


def timeline_ops(tmp_path: Path) -> DataOps:
    data = tmp_path / "data"
    (data / "pg_wal" / "archive_status").mkdir(parents=True)
    return DataOps(
        settings(data_dir=data),
        "pg1",
        data,
        tmp_path / "state",
        tmp_path / "pgpass",
        tmp_path / "log",
        OsUser(None, tmp_path / "pgpass", RecordingLog()),
        RecordingLog(),
    )


def test_next_timeline_follows_history_files_without_a_gap(tmp_path: Path) -> None:
    """findNewestTimeLine: from the current timeline up, as long as history files exist."""
    ops = timeline_ops(tmp_path)
    assert ops.next_timeline(1) == 2
    for tli in (2, 3, 5):
        ops.history_file(tli).write_text("1\t0/3000000\tno recovery target specified\n")
    assert ops.history_file(3).name == "00000003.history"
    assert ops.next_timeline(1) == 4, "5 lies beyond the gap at 4"
    assert ops.next_timeline(3) == 4
    assert ops.history_file(0x1A).name == "0000001A.history", "hex, as PostgreSQL names them"


def test_reserve_timelines_writes_parsable_placeholders_marked_for_the_archiver(
    tmp_path: Path,
) -> None:
    ops = timeline_ops(tmp_path)
    ops.history_file(3).write_text("real\n")
    assert ops.reserve_timelines(1, 6) == [2, 4, 5]
    assert ops.history_file(3).read_text() == "real\n", "an existing file is never replaced"
    assert ops.next_timeline(1) == 6, "the promotion names the claimed timeline"
    status = ops.data_dir / "pg_wal" / "archive_status"
    assert sorted(p.name for p in status.iterdir()) == [
        "00000002.history.ready",
        "00000004.history.ready",
        "00000005.history.ready",
    ]
    # PostgreSQL's parser (timeline.c) skips blank lines and lines starting with '#': a file of
    # comments reads as a timeline with no parent
    for line in ops.history_file(2).read_text().splitlines():
        assert line.lstrip().startswith("#")
    assert ops.reserve_timelines(1, 6) == []
