"""HAProxy (the real one, with deploy/haproxy/haproxy.cfg as shipped) health-checks agents
whose REST API speaks only TLS and requires client certificates: with the TLS options the lab
renders (``check-ssl verify required ca-file ... crt ...``) the master is up on the read-write
port and the replica on the read-only one; with a CA that did not sign the agents' certificates
every check fails. The agents' APIs are real ApiServers of fake agents (tests/unit)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pgsidecar.api import ApiServer
from pgsidecar.config import AgentConfig, ApiSettings, PostgresSettings
from pgsidecar.lab import tlsgen
from pgsidecar.lab.haproxy import HAProxy, haproxy_binary
from pgsidecar.procutil import free_port
from tests.support.clusterutil import wait_for
from tests.unit.test_api_health import SCENARIOS, FakeAgent

pytestmark = pytest.mark.skipif(haproxy_binary() is None, reason="haproxy is not installed")


@dataclass
class Member:
    name: str
    pg_port: int
    api_port: int


@dataclass
class Cluster:
    """What HAProxy reads of a local cluster: its members' ports."""

    members: list[Member]
    dir: Path


@pytest.fixture
async def tls_members(tmp_path: Path) -> AsyncIterator[tuple[tlsgen.TlsMaterial, Cluster]]:
    material = tlsgen.generate(tmp_path / "tls", ["pg1", "pg2"])
    servers: list[ApiServer] = []
    members = []
    for name, scenario in (("pg1", "master"), ("pg2", "replica")):
        role, snap, running, valid, tags = SCENARIOS[scenario]
        issued = material.member(name)
        api = ApiSettings(
            port=free_port(),
            tls={
                "enabled": True,
                "cert_file": issued.cert,
                "key_file": issued.key,
                "ca_file": material.ca_cert,
                "client_auth": "required",
            },
        )
        cfg = AgentConfig(
            name=name,
            cluster="c1",
            state_dir=tmp_path / name,
            postgresql=PostgresSettings(data_dir=tmp_path / name / "pgdata"),
            api=api,
        )
        agent = FakeAgent(
            cfg=cfg, role_=role, snapshot_=snap(), pg_running_=running, watchdog_valid=valid
        )
        server = ApiServer(agent, api, registry=agent.metrics_registry)
        await server.start()
        servers.append(server)
        members.append(Member(name, free_port(), api.port))
    yield material, Cluster(members, tmp_path)
    for s in servers:
        await s.stop()


def client_pem(material: tlsgen.TlsMaterial, out: Path) -> Path:
    client = material.member("client")
    out.write_bytes(client.cert.read_bytes() + client.key.read_bytes())
    out.chmod(0o600)
    return out


def server_states(h: HAProxy) -> dict[tuple[str, str], str]:
    return {
        (r["pxname"], r["svname"]): r["status"]
        for r in h.stats()
        if r["svname"] not in ("FRONTEND", "BACKEND") and r["pxname"] != "stats"
    }


async def test_haproxy_checks_the_api_over_tls(
    tls_members: tuple[tlsgen.TlsMaterial, Cluster], tmp_path: Path
) -> None:
    import asyncio

    material, cluster = tls_members
    h = HAProxy(
        cluster,  # type: ignore[arg-type]
        api_ca_file=material.ca_cert,
        api_client_pem=client_pem(material, tmp_path / "client.pem"),
    )
    assert h.env()["PGSC_API_CHECK_TLS"].startswith("check-ssl verify required ca-file ")
    await asyncio.to_thread(h.start)
    try:

        def routed() -> dict[tuple[str, str], str] | None:
            s = server_states(h)
            want = {
                ("primary", "pg-0"): "UP",
                ("primary", "pg-1"): "DOWN",
                ("replicas", "pg-0"): "DOWN",
                ("replicas", "pg-1"): "UP",
            }
            return s if all(s.get(k) == v for k, v in want.items()) else None

        await asyncio.to_thread(
            wait_for, routed, 10, what="the TLS checks to route master and replica"
        )
    finally:
        h.close()

    # a CA that did not sign the agents' certificates: no server passes a check
    other = tlsgen.generate(tmp_path / "other", [])
    h = HAProxy(
        cluster,  # type: ignore[arg-type]
        api_ca_file=other.ca_cert,
        api_client_pem=client_pem(material, tmp_path / "client2.pem"),
    )
    await asyncio.to_thread(h.start)
    try:
        await asyncio.sleep(1.0)
        states: Any = server_states(h)
        assert states[("primary", "pg-0")] == "DOWN", states
        assert states[("replicas", "pg-1")] == "DOWN", states
    finally:
        h.close()
