"""The REST API's health checks (Patroni's paths, parameters and 200/503 meaning), around a small
fake agent: real snapshots (fsm.snapshot), a real AgentConfig, aiohttp's test server. Every path
is asked with GET, HEAD and OPTIONS, which must agree on the status."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from events.dcs import ClusterView, Leader
from fsm.machine import Role
from fsm.snapshot import (
    DcsFacts,
    LeaderView,
    LeaseFacts,
    PgFacts,
    Settings,
    Snapshot,
    SyncSet,
)
from pgsidecar.api import CHECKS, ApiServer, HealthFacts, evaluate, parse_lag
from pgsidecar.config import AgentConfig, ApiSettings, PostgresSettings, Tags
from tests.support.ipv6 import free_ipv6_loopback_port, needs_ipv6_loopback

TOKEN = "s3cret-token"
MB = 1024 * 1024
LEADER_LSN = 100 * MB


class FakeDcs:
    """Enough of a DCS for POST /switchover: a view with a master and one streaming replica."""

    def __init__(self) -> None:
        self.written: list[dict[str, Any]] = []
        self.view = ClusterView(
            leader=Leader("pg1", 7),
            members={
                "pg1": {"role": "master", "running": True, "lsn": LEADER_LSN, "timeline": 2},
                "pg2": {"role": "replica", "running": True, "streaming": True, "lsn": 1},
            },
        )

    async def read_cluster(self) -> ClusterView:
        return self.view

    async def put_switchover(self, cmd: dict[str, Any]) -> None:
        self.written.append(cmd)


@dataclass
class FakeAgent:
    """The agent as the API sees it (pgsidecar.api.AgentStatus)."""

    cfg: AgentConfig
    role_: Role
    snapshot_: Snapshot
    pg_running_: bool
    watchdog_valid: bool = True
    name: str = "pg2"
    last_error_: str | None = None
    counters_: dict[str, int] = field(
        default_factory=lambda: {"inputs": 3, "transitions": 2, "malformed_dcs_values": 0}
    )
    member_key: dict[str, Any] = field(default_factory=dict)
    dcs: FakeDcs = field(default_factory=FakeDcs)
    metrics_registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    alive_: tuple[bool, str] = (True, "")
    commands: list[str] = field(default_factory=list)
    fencing_margin_: float | None = None
    backup_health_: dict[str, Any] | None = None

    @property
    def cluster(self) -> str:
        return self.cfg.cluster

    def role(self) -> Role:
        return self.role_

    def snapshot(self) -> Snapshot:
        return self.snapshot_

    def lease_valid(self) -> bool:
        return self.watchdog_valid

    def pg_running(self) -> bool:
        return self.pg_running_

    def fencing_margin(self) -> float | None:
        return self.fencing_margin_

    def term(self) -> int | None:
        return 7

    def last_error(self) -> str | None:
        return self.last_error_

    def uptime(self) -> float:
        return 12.0

    def counters(self) -> dict[str, int]:
        return self.counters_

    def tags(self) -> dict[str, Any]:
        return self.cfg.tags.model_dump()

    def own_member_key(self) -> dict[str, Any]:
        return self.member_key

    def alive(self) -> tuple[bool, str]:
        return self.alive_

    def backup_health(self) -> dict[str, Any] | None:
        return self.backup_health_

    def command(self, name: str) -> None:
        self.commands.append(name)

    async def request_switchover(self, target: str | None) -> dict[str, Any]:
        from pgsidecar.ops import request_switchover

        return await request_switchover(self.dcs, target)  # type: ignore[arg-type]


def make_cfg(tmp: Path, token: str | None = TOKEN, **tags: Any) -> AgentConfig:
    return AgentConfig(
        name="pg2",
        cluster="c1",
        state_dir=tmp,
        postgresql=PostgresSettings(data_dir=tmp / "pgdata"),
        api=ApiSettings(token=token),
        tags=Tags(**tags),
    )


def master_snapshot(in_recovery: bool = False) -> Snapshot:
    return Snapshot(
        name="pg2",
        pg=PgFacts(running=True, in_recovery=in_recovery, timeline=2, lsn=LEADER_LSN),
        dcs=DcsFacts(reachable=True, leader=LeaderView("pg2", 7), last_leader_lsn=LEADER_LSN),
        lease=LeaseFacts(held=True, term=7, deadline=1e12),
    )


def replica_snapshot(
    lag: int = 0,
    streaming: bool = True,
    sync: SyncSet | None = None,
    leader: str = "pg1",
    sync_mode: str = "on",
) -> Snapshot:
    lsn = LEADER_LSN - lag
    return Snapshot(
        settings=Settings(synchronous_mode=sync_mode),
        name="pg2",
        pg=PgFacts(
            running=True,
            in_recovery=True,
            timeline=2,
            lsn=lsn,
            received_lsn=lsn,
            replayed_lsn=lsn,
            receiver_streaming=streaming,
        ),
        dcs=DcsFacts(
            reachable=True, leader=LeaderView(leader, 7), last_leader_lsn=LEADER_LSN, sync=sync
        ),
    )


# scenario name -> (role, snapshot, pg running, watchdog valid, tags)
SCENARIOS: dict[str, tuple[Role, Callable[[], Snapshot], bool, bool, dict[str, Any]]] = {
    "master": (Role.MASTER, master_snapshot, True, True, {}),
    "master_fenced": (Role.MASTER, master_snapshot, True, False, {}),
    "master_in_recovery": (Role.MASTER, lambda: master_snapshot(True), True, True, {}),
    "master_pg_down": (Role.MASTER, master_snapshot, False, True, {}),
    "replica": (Role.REPLICA, replica_snapshot, True, True, {}),
    "replica_lag_20MB": (Role.REPLICA, lambda: replica_snapshot(20 * MB), True, True, {}),
    "replica_not_streaming": (
        Role.REPLICA,
        lambda: replica_snapshot(streaming=False),
        True,
        True,
        {},
    ),
    "replica_pg_down": (Role.REPLICA, replica_snapshot, False, True, {}),
    "replica_noloadbalance": (Role.REPLICA, replica_snapshot, True, True, {"noloadbalance": True}),
    "replica_sync": (
        Role.REPLICA,
        lambda: replica_snapshot(sync=SyncSet("pg1", 7, frozenset({"pg2"}))),
        True,
        True,
        {},
    ),
    "replica_stale_sync": (  # the set was recorded by an earlier master: not in force
        Role.REPLICA,
        lambda: replica_snapshot(sync=SyncSet("pg3", 6, frozenset({"pg2"}))),
        True,
        True,
        {},
    ),
    "replica_sync_mode_off": (  # the record stays in the DCS, but no standby is required
        Role.REPLICA,
        lambda: replica_snapshot(sync=SyncSet("pg1", 7, frozenset({"pg2"})), sync_mode="off"),
        True,
        True,
        {},
    ),
    "candidate": (Role.CANDIDATE, lambda: replica_snapshot(streaming=False), True, True, {}),
    "rewinding": (Role.REWINDING, lambda: Snapshot("pg2"), False, True, {}),
    "standby_leader": (Role.STANDBY_LEADER, lambda: master_snapshot(True), True, True, {}),
    "standby_leader_fenced": (Role.STANDBY_LEADER, lambda: master_snapshot(True), True, False, {}),
    "standby_leader_pg_down": (Role.STANDBY_LEADER, lambda: master_snapshot(True), False, True, {}),
}

# (scenario, path with query) -> expected status; every scenario x path below is asserted
EXPECTED: list[tuple[str, str, int]] = []


def expect(scenario: str, codes: dict[str, int]) -> None:
    for path, code in codes.items():
        EXPECTED.append((scenario, path, code))


PRIMARY_PATHS = ("/", "/primary", "/master", "/read-write")
for s, code in [
    ("master", 200),
    ("master_fenced", 503),
    ("master_in_recovery", 503),
    ("master_pg_down", 503),
    ("replica", 503),
    ("candidate", 503),
]:
    expect(s, {p: code for p in PRIMARY_PATHS})
expect(
    "master",
    {
        "/leader": 200,
        "/standby-leader": 503,
        "/standby_leader": 503,
        "/replica": 503,
        "/read-only": 200,
        "/read-only?lag=1": 200,  # the master is never lagging
        "/read-only?tag_nofailover=true": 503,  # tags apply to read-only, also on the master
        "/primary?tag_nofailover=true": 200,  # ... but never to the leader checks
        "/synchronous": 503,
        "/sync": 503,
        "/asynchronous": 503,
        "/async": 503,
        "/read-only-sync": 200,
        "/health": 200,
        "/liveness": 200,
        "/readiness": 200,
    },
)
expect(
    "standby_leader",
    {
        "/standby-leader": 200,
        "/standby_leader": 200,
        "/leader": 200,
        "/primary": 503,  # never writable
        "/replica": 503,
        "/read-only": 200,
        "/readiness": 200,
        "/health": 200,
    },
)
expect("standby_leader_fenced", {"/standby-leader": 503, "/leader": 503, "/read-only": 503})
expect("standby_leader_pg_down", {"/standby-leader": 503, "/read-only": 503, "/readiness": 503})
expect("master_fenced", {"/leader": 503, "/readiness": 503, "/read-only": 503, "/health": 200})
expect("master_pg_down", {"/leader": 200, "/health": 503, "/readiness": 503, "/liveness": 200})
expect(
    "replica",
    {
        "/leader": 503,
        "/standby-leader": 503,
        "/replica": 200,
        "/replica?lag=0": 200,
        "/replica?lag=10MB": 200,
        "/replica?replication_state=streaming": 200,
        "/replica?replication_state=in%20archive%20recovery": 503,
        "/replica?tag_nofailover=false": 200,
        "/replica?tag_nofailover=true": 503,
        "/replica?tag_failover_priority=1": 200,
        "/replica?tag_failover_priority=1&tag_nosync=false": 200,
        "/replica?tag_failover_priority=1&tag_nosync=true": 503,
        "/replica?tag_zone=eu": 503,  # a tag this member does not have
        "/read-only": 200,
        "/synchronous": 503,  # no synchronous set recorded
        "/sync": 503,
        "/read-only-sync": 503,
        "/asynchronous": 200,
        "/async": 200,
        "/asynchronous?lag=1MB": 200,
        "/health": 200,
        "/liveness": 200,
        "/readiness": 200,
        "/readiness?mode=write": 200,
    },
)
expect(
    "replica_lag_20MB",
    {
        "/replica": 200,
        "/replica?lag=10MB": 503,
        "/replica?lag=20MB": 200,
        "/replica?lag=20971520": 200,
        "/replica?lag=20971519": 503,
        "/replica?lag=1GB": 200,
        "/read-only?lag=10MB": 503,
        "/asynchronous?lag=10MB": 503,
        "/asynchronous?lag=30MB": 200,
        "/readiness": 503,  # default limit: maximum_lag_on_failover (1 MB)
        "/readiness?lag=30MB": 200,
        "/readiness?lag=30MB&mode=write": 200,
    },
)
expect(
    "replica_not_streaming",
    {
        "/replica": 503,
        "/read-only": 503,
        "/asynchronous": 503,
        "/readiness": 503,
        "/health": 200,
    },
)
expect(
    "replica_pg_down",
    {"/replica": 503, "/read-only": 503, "/health": 503, "/readiness": 503, "/liveness": 200},
)
expect(
    "replica_noloadbalance",
    {"/replica": 503, "/read-only": 503, "/asynchronous": 503, "/readiness": 200},
)
expect(
    "replica_sync",
    {
        "/synchronous": 200,
        "/sync": 200,
        "/read-only-sync": 200,
        "/read-only-synchronous": 200,
        "/asynchronous": 503,
        "/async": 503,
        "/replica": 200,
        "/synchronous?tag_nosync=true": 503,
    },
)
expect("replica_stale_sync", {"/synchronous": 503, "/asynchronous": 200})
expect("replica_sync_mode_off", {"/synchronous": 503, "/asynchronous": 200})
expect(
    "candidate",
    {"/replica": 503, "/read-only": 503, "/readiness": 503, "/leader": 503, "/health": 200},
)
expect("rewinding", {"/health": 503, "/readiness": 503, "/liveness": 200, "/replica": 503})


@pytest.fixture
async def client_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``make(scenario, token=..., **agent_overrides)`` -> a started aiohttp TestClient around an
    ApiServer of a FakeAgent in that scenario (``client.agent`` is the agent)."""
    made: list[TestClient[Any, Any]] = []

    async def make(scenario: str = "replica", token: str | None = TOKEN, **over: Any) -> Any:
        role, snap, running, valid, tags = SCENARIOS[scenario]
        cfg = make_cfg(tmp_path, token, **tags)
        agent = FakeAgent(
            cfg=cfg,
            role_=role,
            snapshot_=snap(),
            pg_running_=running,
            watchdog_valid=valid,
            **over,
        )
        server = ApiServer(agent, cfg.api, registry=agent.metrics_registry)
        client: TestClient[Any, Any] = TestClient(TestServer(server.app))
        await client.start_server()
        made.append(client)
        client.agent = agent  # type: ignore[attr-defined]
        return client

    yield make
    for c in made:
        await c.close()


def test_every_check_path_is_covered() -> None:
    asked = {p.split("?")[0] for _, p, _ in EXPECTED}
    assert asked == set(CHECKS), f"paths without a test: {set(CHECKS) - asked}"


@pytest.mark.parametrize(
    "scenario,path,code", EXPECTED, ids=[f"{s}{p}={c}" for s, p, c in EXPECTED]
)
async def test_health_check_status(
    client_factory: Any, scenario: str, path: str, code: int
) -> None:
    client = await client_factory(scenario)
    got = await client.get(path)
    body = await got.json()
    assert got.status == code, body
    if code == 503 and path != "/liveness":
        assert body.get("reason"), "a 503 says why"
    if path.split("?")[0] != "/liveness":
        assert body["name"] == "pg2" and "role" in body
    # HEAD and OPTIONS: same status, no body (HAProxy's httpchk sends OPTIONS)
    for method in ("HEAD", "OPTIONS"):
        resp = await client.request(method, path)
        assert resp.status == code, method
        assert await resp.read() == b"", method


@pytest.mark.parametrize(
    "path",
    ["/replica?lag=lots", "/read-only?lag=10XB", "/asynchronous?lag=-1", "/readiness?mode=fast"],
)
async def test_malformed_query_is_400_naming_the_parameter(client_factory: Any, path: str) -> None:
    client = await client_factory("replica")
    resp = await client.get(path)
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert ("lag=" in err) or ("mode=" in err)
    assert (await client.options(path)).status == 400


async def test_liveness_answers_what_the_agent_says_of_its_loop(client_factory: Any) -> None:
    client = await client_factory("replica", alive_=(False, "an input source ended (watch)"))
    resp = await client.get("/liveness")
    assert resp.status == 503
    assert "input source" in (await resp.json())["reason"]
    client.agent.alive_ = (True, "")
    assert (await client.get("/liveness")).status == 200


async def test_status_and_metrics(client_factory: Any) -> None:
    client = await client_factory("replica_lag_20MB", member_key={"pending_restart": True})
    st = await (await client.get("/status")).json()
    assert st["role"] == "replica" and st["lag_bytes"] == 20 * MB
    assert st["pending_restart"] is True and st["sync_standby"] is False
    assert st["tags"]["failover_priority"] == 1
    assert st["backup"] is None  # no backup section
    client.agent.backup_health_ = {"last_backup_age": 3600.0, "archive_failing": False}
    st = await (await client.get("/status")).json()
    assert st["backup"] == {"last_backup_age": 3600.0, "archive_failing": False}
    text = await (await client.get("/metrics")).text()
    for gauge in (
        "pgsidecar_role",
        "pgsidecar_lag_bytes",
        "pgsidecar_term",
        "pgsidecar_timeline",
        "pgsidecar_postgres_running",
        "pgsidecar_lease_held",
        "pgsidecar_inputs_total",
        "pgsidecar_transitions_total",
        "pgsidecar_malformed_dcs_values_total",
        "pgsidecar_paused",
    ):
        assert gauge in text
    assert 'pgsidecar_role{role="replica"} 1.0' in text
    assert "pgsidecar_lag_bytes 2.097152e+07" in text


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic x"}],
    ids=["none", "wrong", "no-bearer", "basic"],
)
async def test_switchover_needs_the_token(client_factory: Any, headers: dict[str, str]) -> None:
    client = await client_factory("master")
    resp = await client.post("/switchover", json={"to": "pg2"}, headers=headers)
    assert resp.status == 401
    assert "token" in (await resp.json())["error"]
    assert client.agent.dcs.written == [], "a refused request writes nothing"


async def test_switchover_disabled_without_a_configured_token(client_factory: Any) -> None:
    client = await client_factory("master", token=None)
    resp = await client.post("/switchover", json={}, headers={"Authorization": "Bearer "})
    assert resp.status == 401
    assert client.agent.dcs.written == []


async def test_switchover_with_the_token(client_factory: Any) -> None:
    client = await client_factory("master")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    resp = await client.post("/switchover", json={"to": "nobody"}, headers=auth)
    assert resp.status == 409 and "not a member" in (await resp.json())["error"]
    resp = await client.post("/switchover", data=b"[1]", headers=auth)
    assert resp.status == 400
    assert client.agent.dcs.written == []
    resp = await client.post("/switchover", json={"to": "pg2"}, headers=auth)
    assert resp.status == 202
    assert client.agent.dcs.written[0]["to"] == "pg2"


def test_parse_lag_units() -> None:
    assert parse_lag("1048576") == MB
    assert parse_lag("1024kB") == MB
    assert parse_lag("10MB") == 10 * MB
    assert parse_lag("1GB") == 1024 * MB
    assert parse_lag("1.5kB") == 1536


def test_evaluate_is_pure_and_unknown_leader_lsn_is_not_lag() -> None:
    f = HealthFacts(
        role=Role.REPLICA,
        primary=False,
        lease_valid=False,
        pg_running=True,
        streaming=True,
        replayed_lsn=5,
        received_lsn=5,
        leader_lsn=None,
        tags={},
        synchronous=False,
        maximum_lag_on_failover=0,
        alive=True,
    )
    assert evaluate("replica", f, {"lag": "0"}).code == 200
    assert evaluate("readiness", f, {}).code == 200


async def test_metrics_of_the_lease_fencing_and_transitions_by_trigger(
    client_factory: Any,
) -> None:
    counters = {
        "inputs": 9,
        "transitions": 3,
        "malformed_dcs_values": 0,
        "lease_renewals": 41,
        "lease_renewal_failures": 2,
        "sessions_lost": 1,
        "transition:won_lease": 2,
        "transition:lease_lost": 1,
    }
    client = await client_factory("master", counters_=counters, fencing_margin_=3.25)
    text = await (await client.get("/metrics")).text()
    assert "pgsidecar_lease_renewals_total 41.0" in text
    assert "pgsidecar_lease_renewal_failures_total 2.0" in text
    assert "pgsidecar_sessions_lost_total 1.0" in text
    assert 'pgsidecar_transitions_by_trigger_total{trigger="won_lease"} 2.0' in text
    assert 'pgsidecar_transitions_by_trigger_total{trigger="lease_lost"} 1.0' in text
    assert "pgsidecar_fencing_margin_seconds 3.25" in text
    # no lease held: no margin (NaN), never a stale number
    client = await client_factory("replica")
    text = await (await client.get("/metrics")).text()
    assert "pgsidecar_fencing_margin_seconds NaN" in text


async def test_metrics_serve_the_kafka_sinks_metrics(
    client_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """The Kafka sink's metrics live in the agent's registry, the one /metrics serves (before,
    the sink registered them on prometheus-client's global registry, which nothing served, so
    records_dropped and kafka_up never appeared)."""
    from events.kafka import KafkaSink

    client = await client_factory("replica")
    sink = KafkaSink(
        "127.0.0.1:1",
        "t",
        "pg2",
        tmp_path / "spool",
        registry=client.agent.metrics_registry,
    )
    sink.metrics.dropped.labels(kind="input").inc(3)
    text = await (await client.get("/metrics")).text()
    assert 'pgsidecar_records_dropped_total{kind="input"} 3.0' in text
    assert "pgsidecar_kafka_up" in text


async def test_restart_command_reaches_the_agent(client_factory: Any) -> None:
    client = await client_factory("replica")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    resp = await client.post("/restart", headers=auth)
    assert resp.status == 202 and client.agent.commands == ["restart"]
    resp = await client.post("/reinit", headers={"Authorization": "Bearer wrong"})
    assert resp.status == 401 and client.agent.commands == ["restart"]


@needs_ipv6_loopback
@pytest.mark.parametrize(
    "listen,reach",
    # "::" is every IPv6 address (asyncio binds it IPv6-only, as PostgreSQL binds "::")
    [("::", ["[::1]"]), ("::1", ["[::1]"])],
    ids=["ipv6-wildcard", "loopback"],
)
async def test_the_api_listens_on_an_ipv6_address(
    tmp_path: Path, listen: str, reach: list[str]
) -> None:
    import aiohttp

    port = free_ipv6_loopback_port()
    role, snap, running, valid, tags = SCENARIOS["replica"]
    cfg = make_cfg(tmp_path)
    cfg.api.listen, cfg.api.port = listen, port
    agent = FakeAgent(
        cfg=cfg, role_=role, snapshot_=snap(), pg_running_=running, watchdog_valid=valid
    )
    server = ApiServer(agent, cfg.api, registry=agent.metrics_registry)
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            for host in reach:
                async with http.get(f"http://{host}:{port}/status") as resp:
                    assert resp.status == 200
                    assert (await resp.json())["name"] == "pg2"
    finally:
        await server.stop()
