"""Consul fixtures: the Consul HTTP emulator (tests/support/consul_emulator.py), which is what runs in
this suite, and a real ``consul agent -dev`` only when a ``consul`` binary is on PATH; plus
factories of ConsulDCS.

What actually runs: the contract suite (``dcs_backend``, tests/conftest.py) has two parameters,
"etcd" (a real etcd) and "consul" (the emulator, in process). A real Consul agent is used by one
test only, ``tests/contract/test_consul_backend.py::test_real_agent_scenario``, and it is skipped, naming
the missing binary, when ``consul`` is not on PATH (as on the CI machine). The contract suite is
not run against a real Consul agent.

* ``consul_emulator``: a fresh emulator per test (it starts in milliseconds, so tests never share
  state). Its minimum session TTL is ``TEST_MIN_TTL`` (2 s) instead of Consul's default 10 s: a
  deliberate deviation - Consul's own server option ``session_ttl_min`` - so that the expiry tests
  of the contract suite take seconds, not 20 s.
* ``consul_agent``: one ``consul agent -dev`` per test session, configured with
  ``session_ttl_min = "2s"``; skipped, with the reason, when there is no binary.
* ``consul_dcs_factory`` (the emulator; ``dcs_backend`` maps "consul" to it) and
  ``consul_agent_dcs_factory`` (the real agent): ``make_dcs(cluster=None, **kwargs) -> ConsulDCS``
  (not yet connected), with ``make_dcs.min_ttl`` and ``make_dcs.server`` (a ConsulTarget). All
  DCS of one test share a random key prefix. At teardown: sessions destroyed, the prefix
  deleted, clients closed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from events.dcs.consul import ConsulDCS
from pgsidecar.config import ConsulSettings
from pgsidecar.procutil import free_port_range
from tests.support.childproc import ChildServer, started_in_tempdir
from tests.support.consul_emulator import ConsulEmulator

CONSUL_BIN = shutil.which("consul")
TEST_MIN_TTL = 2.0
AGENT_START_TIMEOUT = 30.0
AGENT_STOP_TIMEOUT = 10.0


@dataclass
class ConsulTarget:
    """Where a test's ConsulDCS instances point."""

    kind: str  # "emulator" or "agent"
    url: str
    min_ttl: float
    emulator: ConsulEmulator | None = None


def make_consul_dcs(
    url: str,
    cluster: str,
    prefix: str,
    *,
    min_ttl: float = TEST_MIN_TTL,
    settings: dict[str, Any] | None = None,
    **kwargs: Any,
) -> ConsulDCS:
    cfg = ConsulSettings(url=url, session_ttl_min=min_ttl, **(settings or {}))
    return ConsulDCS(cfg, cluster=cluster, prefix=prefix, **kwargs)


@pytest.fixture
async def consul_emulator() -> AsyncIterator[ConsulEmulator]:
    emulator = ConsulEmulator(min_ttl=TEST_MIN_TTL)
    await emulator.start()
    try:
        yield emulator
    finally:
        await emulator.stop()


# -- a real agent, when there is a binary ------------------------------------------------------


class ConsulAgent(ChildServer):
    """``consul agent -dev`` on loopback ports, as our child process (state in memory)."""

    what = "consul agent"
    stop_timeout = AGENT_STOP_TIMEOUT

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.log_path = base_dir / "consul.log"
        port = free_port_range(4)
        self.http_port = port
        self.url = f"http://127.0.0.1:{port}"
        self.min_ttl = TEST_MIN_TTL
        config = base_dir / "test.hcl"
        config.write_text(
            f"ports {{\n  http = {port}\n  serf_lan = {port + 1}\n  serf_wan = {port + 2}\n"
            f"  server = {port + 3}\n  dns = -1\n  grpc = -1\n}}\n"
            f'session_ttl_min = "{TEST_MIN_TTL:g}s"\n'
        )
        self.config = config

    def start(self) -> None:
        assert CONSUL_BIN is not None
        self.spawn_logged(
            [
                CONSUL_BIN,
                "agent",
                "-dev",
                "-bind=127.0.0.1",
                "-client=127.0.0.1",
                "-node=pgsidecar-test",
                f"-config-file={self.config}",
                "-log-level=warn",
            ]
        )
        self.wait_ready(self.has_leader, AGENT_START_TIMEOUT, 0.1, "has no leader")

    def has_leader(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/v1/status/leader", timeout=0.5) as resp:
                return bool(json.loads(resp.read()))
        except (OSError, ValueError, urllib.error.URLError):
            return False


@pytest.fixture(scope="session")
def consul_agent() -> Iterator[ConsulAgent]:
    if CONSUL_BIN is None:
        pytest.skip(
            "no `consul` binary on PATH: the Consul backend runs against the emulator only "
            "(install Consul to also run it against `consul agent -dev`)"
        )
    with started_in_tempdir(ConsulAgent, "pgsidecar-consul-") as agent:
        yield agent


MakeDcs = Callable[..., ConsulDCS]


async def _factory(target: ConsulTarget) -> AsyncIterator[MakeDcs]:
    prefix = f"pgsidecar-test-{uuid.uuid4().hex[:10]}"
    made: list[ConsulDCS] = []

    def make_dcs(
        cluster: str | None = None, *, settings: dict[str, Any] | None = None, **kwargs: Any
    ) -> ConsulDCS:
        dcs = make_consul_dcs(
            target.url,
            cluster or f"c-{uuid.uuid4().hex[:8]}",
            prefix,
            min_ttl=target.min_ttl,
            settings=settings,
            **kwargs,
        )
        made.append(dcs)
        return dcs

    make_dcs.min_ttl = target.min_ttl  # type: ignore[attr-defined]
    make_dcs.server = target  # type: ignore[attr-defined]
    make_dcs.prefix = prefix  # type: ignore[attr-defined]
    yield make_dcs

    if target.emulator is not None and not target.emulator.listening:
        await target.emulator.start_listener()  # a fault test stopped it half-way
    for dcs in made:
        with contextlib.suppress(Exception):
            await dcs.close_session()
        await dcs.close()
    if target.emulator is None:
        # a shared real agent: remove this test's keys
        cleaner = make_consul_dcs(target.url, "cleanup", prefix, min_ttl=target.min_ttl)
        with contextlib.suppress(Exception):
            await cleaner._delete(f"delete of {prefix}/", f"{prefix}/", recurse=True)
        await cleaner.close()


@pytest.fixture
def consul_server(consul_emulator: ConsulEmulator) -> ConsulTarget:
    """The target of ``consul_dcs_factory``: the emulator."""
    return ConsulTarget("emulator", consul_emulator.url, consul_emulator.min_ttl, consul_emulator)


@pytest.fixture
async def consul_dcs_factory(consul_server: ConsulTarget) -> AsyncIterator[MakeDcs]:
    """``make_dcs(cluster=None, **kwargs) -> ConsulDCS`` against the emulator (``dcs_backend``
    maps "consul" here). Also ``make_dcs.server.emulator`` for the fault hooks."""
    async for make_dcs in _factory(consul_server):
        yield make_dcs


@pytest.fixture
async def emulator_dcs_factory(consul_emulator: ConsulEmulator) -> AsyncIterator[MakeDcs]:
    """The factory against the emulator, for tests that use its fault hooks
    (``make_dcs.server.emulator``) whatever ``consul_dcs_factory`` points at."""
    target = ConsulTarget("emulator", consul_emulator.url, consul_emulator.min_ttl, consul_emulator)
    async for make_dcs in _factory(target):
        yield make_dcs


@pytest.fixture
async def consul_agent_dcs_factory(consul_agent: ConsulAgent) -> AsyncIterator[MakeDcs]:
    """The same factory against a real ``consul agent -dev``; skipped without a binary."""
    async for make_dcs in _factory(ConsulTarget("agent", consul_agent.url, consul_agent.min_ttl)):
        yield make_dcs


@dataclass
class HealthEndpoint:
    """A small HTTP server standing in for the agent's REST API: /primary and /replica answer
    the status codes in ``codes`` (what Consul's HTTP check of a registered service probes)."""

    url: str
    codes: dict[str, int]


@pytest.fixture
async def health_endpoint() -> AsyncIterator[HealthEndpoint]:
    codes = {"/primary": 200, "/replica": 503}

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=codes.get(request.path, 404), text=request.path)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server  # the bound socket tells which free port the OS chose
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    try:
        yield HealthEndpoint(f"http://127.0.0.1:{port}", codes)
    finally:
        await runner.cleanup()
