"""The Consul backend beyond the DCS contract (tests/contract/test_dcs_contract.py runs that one): the
session it asks for, the TTL arithmetic, Consul's index rules in watch, agent restarts, ACL
tokens (never leaked), TLS, service registration, and errors or garbage from the server.

Against the emulator (tests/support/consul_emulator.py), whose hooks play the faults; the last test also
runs against a real ``consul agent -dev`` when a binary is on PATH.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import ssl
import subprocess
import time
import warnings
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from events.dcs.base import (
    AuthError,
    ClusterView,
    DCSError,
    DuplicateMember,
    SessionLost,
)
from events.dcs.consul import ConsulDCS
from pgsidecar.config import ConfigError, ConsulSettings, DcsSettings
from tests.support.consul_emulator import ConsulEmulator
from tests.support.dcswatch import Watcher
from tests.support.fixtures_consul import HealthEndpoint, make_consul_dcs

TOKEN = "b7e1c0de-5ec2-4e7a-9d3b-70ce4c0ffee0"
MakeDcs = Callable[..., ConsulDCS]


async def ready(
    make_dcs: MakeDcs, cluster: str = "c1", session: bool = True, **kw: Any
) -> ConsulDCS:
    d = make_dcs(cluster, **kw)
    await d.connect()
    if session:
        await d.open_session(make_dcs.min_ttl)  # type: ignore[attr-defined]
    return d


def emulator_of(make_dcs: MakeDcs) -> ConsulEmulator:
    emulator = make_dcs.server.emulator  # type: ignore[attr-defined]
    assert isinstance(emulator, ConsulEmulator)
    return emulator


# -- TTL arithmetic and the session we ask for --------------------------------------------------


def test_ttl_arithmetic() -> None:
    d = ConsulDCS(ConsulSettings(), "c")  # Consul's default session_ttl_min: 10 s
    assert d.min_session_ttl == 10
    # half the configured ttl (Consul may take twice the session TTL to invalidate), whole
    # seconds rounded up, never below the server's minimum nor above its maximum
    assert d.session_ttl_for(2) == 10
    assert d.session_ttl_for(10) == 10
    assert d.session_ttl_for(20) == 10
    assert d.session_ttl_for(20.2) == 11
    assert d.session_ttl_for(30) == 15
    assert d.session_ttl_for(10**6) == 86400
    assert d.session_ttl == 0 and d.worst_case_expiry == 0  # no session yet


async def test_session_is_delete_no_lock_delay_no_checks(emulator_dcs_factory: MakeDcs) -> None:
    d = await ready(emulator_dcs_factory)
    emu = emulator_of(emulator_dcs_factory)
    (session,) = emu.sessions.values()
    assert session.behavior == "delete"
    assert session.lock_delay == 0
    assert session.node_checks == [] and session.service_checks is None
    assert session.ttl == "2s"
    assert d.session_ttl == 2 and d.worst_case_expiry == 4


async def test_worst_case_expiry_bounds_a_slow_invalidation(
    consul_emulator: ConsulEmulator,
) -> None:
    """Consul may keep a lapsed session up to 2 x TTL: the emulator does exactly that here."""
    consul_emulator.ttl_multiplier = 2.0
    consul_emulator.min_ttl = 1.0
    d = make_consul_dcs(consul_emulator.url, "c", "p", min_ttl=1)
    observer = make_consul_dcs(consul_emulator.url, "c", "p", min_ttl=1)
    try:
        await d.connect()
        await d.open_session(1)
        assert await d.acquire_leader("a") is not None
        t0 = time.monotonic()
        await asyncio.sleep(d.session_ttl + 0.3)
        assert (await observer.read_cluster()).leader is not None  # past the TTL: still there
        while (await observer.read_cluster()).leader is not None:
            assert time.monotonic() - t0 < d.worst_case_expiry + 1.0
            await asyncio.sleep(0.05)
        assert time.monotonic() - t0 >= d.session_ttl
        with pytest.raises(SessionLost):
            await d.renew_session()
    finally:
        await d.close()
        await observer.close()


async def test_a_server_minimum_above_ours_is_explained(consul_emulator: ConsulEmulator) -> None:
    consul_emulator.min_ttl = 30  # the servers run with session_ttl_min = "30s"
    d = make_consul_dcs(consul_emulator.url, "c", "p", min_ttl=10)
    try:
        with pytest.raises(DCSError, match=r"dcs\.consul\.session_ttl_min"):
            await d.open_session(10)
        assert d.session_ttl == 0
    finally:
        await d.close()


async def test_garbage_entries_never_reach_a_view(
    emulator_dcs_factory: MakeDcs, watchers: Callable[[ConsulDCS], Watcher]
) -> None:
    d = await ready(emulator_dcs_factory)
    emu = emulator_of(emulator_dcs_factory)
    for body in ('[{"Key": 1}]', '[{"Key": "x", "ModifyIndex": "abc"}]', "[1, 2]", '"text"'):
        emu.inject_failure(200, body, content_type="application/json", method="GET")
        with pytest.raises(DCSError):
            await d.read_cluster()
    w = watchers(d)
    emu.inject_failure(200, '[{"Key": 1}]', content_type="application/json", method="GET")
    await w.wait_for(lambda v: True, within=2.0)  # skipped the garbage, then read the real view
    assert emu.pending_failures == 0


async def test_renewal_with_a_larger_ttl_raises_session_ttl(emulator_dcs_factory: MakeDcs) -> None:
    d = await ready(emulator_dcs_factory)
    emu = emulator_of(emulator_dcs_factory)
    (session,) = emu.sessions.values()
    session.ttl = "1m0s"  # a loaded Consul asks clients to renew less often
    await d.renew_session()
    assert d.session_ttl == 60 and d.worst_case_expiry == 120


async def test_gossip_blip_does_not_drop_our_lock(emulator_dcs_factory: MakeDcs) -> None:
    """A session tied to serfHealth (Consul's default) loses its lock on one missed gossip
    probe; ours has no checks, so only its TTL can end it."""
    d = await ready(emulator_dcs_factory)
    leader = await d.acquire_leader("a")
    assert leader is not None
    emu = emulator_of(emulator_dcs_factory)
    default_session = await d._client.session.create(ttl=10)  # what py-consul does by default
    victims = emu.gossip_blip()
    assert victims == [default_session]
    assert (await d.read_cluster()).leader == leader
    await d.renew_session()


async def test_no_lock_delay_means_immediate_reacquire_after_invalidation(
    emulator_dcs_factory: MakeDcs, watchers: Callable[[ConsulDCS], Watcher]
) -> None:
    a = await ready(emulator_dcs_factory)
    b = await ready(emulator_dcs_factory)
    la = await a.acquire_leader("a")
    assert la is not None
    emu = emulator_of(emulator_dcs_factory)
    assert a._session_id is not None
    emu.invalidate_session(a._session_id, "TTL expired")  # as if a's TTL had lapsed
    lb = await b.acquire_leader("b")
    assert lb is not None and lb.term > la.term
    # with Consul's default lock-delay (15 s) the same sequence is refused
    slow = await a._client.session.create(behavior="delete")
    assert await a._client.kv.put(a.key("other"), b"x", acquire=slow)
    emu.invalidate_session(slow, "TTL expired")
    assert await b._client.kv.put(b.key("other"), b"y", acquire=b._session_id) is False


# -- agent restart, unreachable agent, errors and garbage ----------------------------------------


async def test_agent_restart_raises_session_lost_and_deletes_keys(
    emulator_dcs_factory: MakeDcs, watchers: Callable[[ConsulDCS], Watcher]
) -> None:
    master = await ready(emulator_dcs_factory)
    replica = await ready(emulator_dcs_factory, session=False)
    await master.put_member("m", {"instance_id": "im"})
    leader = await master.acquire_leader("m")
    assert leader is not None
    w = watchers(replica)
    await w.wait_for(lambda v: v.leader == leader)
    emu = emulator_of(emulator_dcs_factory)

    restart = asyncio.create_task(emu.restart_agent(downtime=0.5))
    await asyncio.sleep(0.1)
    # while the agent is down: a transient error, not (yet) a lost session
    with pytest.raises(DCSError) as down:
        await master.renew_session()
    assert not isinstance(down.value, SessionLost)
    await restart
    with pytest.raises(SessionLost):
        await master.renew_session()
    # the keys went with the session, and the watch saw it once the agent was back
    _, view = await w.wait_for(lambda v: v.leader is None and "m" not in v.members, within=3.0)
    with pytest.raises(SessionLost):
        await master.acquire_leader("m")
    with pytest.raises(SessionLost):
        await master.put_member("m", {"instance_id": "im"})
    # a new session works again
    await master.open_session(2)
    assert await master.acquire_leader("m") is not None


async def test_unreachable_and_slow_agent_fail_fast(emulator_dcs_factory: MakeDcs) -> None:
    d = await ready(emulator_dcs_factory)
    emu = emulator_of(emulator_dcs_factory)
    assert d.timeout == pytest.approx(2 / 3)  # a third of the TTL: several tries per lease
    emu.latency = 5.0  # a hung agent: every request must still end within the timeout
    t0 = time.monotonic()
    with pytest.raises(DCSError) as slow:
        await d.renew_session()
    assert time.monotonic() - t0 < 1.0
    assert not isinstance(slow.value, SessionLost)
    emu.latency = 0.0
    await emu.stop_listener()
    with pytest.raises(DCSError, match="Consul session renew failed"):
        await d.renew_session()
    await emu.start_listener()
    await d.renew_session()  # the session outlived the outage


async def test_errors_and_garbage_take_no_action(emulator_dcs_factory: MakeDcs) -> None:
    d = await ready(emulator_dcs_factory)
    emu = emulator_of(emulator_dcs_factory)
    emu.inject_failure(500, "rpc error making call: No cluster leader", count=3)
    with pytest.raises(DCSError, match="No cluster leader") as err:
        await d.acquire_leader("a")
    assert not isinstance(err.value, SessionLost)
    emu.inject_failure(200, "<html>a proxy error page</html>", content_type="text/html")
    with pytest.raises(DCSError):
        await d.read_cluster()
    emu.inject_failure(200, '{"unexpected": "shape"}', content_type="application/json")
    with pytest.raises(DCSError):
        await d.read_cluster()
    emu._failures.clear()
    assert await d.acquire_leader("a") is not None


async def test_watch_survives_failures_and_resumes(
    emulator_dcs_factory: MakeDcs, watchers: Callable[[ConsulDCS], Watcher]
) -> None:
    d = await ready(emulator_dcs_factory)
    writer = await ready(emulator_dcs_factory)
    emu = emulator_of(emulator_dcs_factory)
    w = watchers(d)
    await w.wait_for(lambda v: True)
    await emu.stop_listener()
    await asyncio.sleep(0.3)  # the watch retries with backoff meanwhile
    emu.inject_failure(500, "rpc error: injected", count=2, method="GET")
    await emu.start_listener()
    await _until(lambda: emu.pending_failures == 0)  # the watch ran into both
    await writer.put_config({"after": "outage"})
    await w.wait_for(lambda v: v.config == {"after": "outage"}, within=3.0)
    # garbage on the next blocking read: the watch skips it, retries, and goes on
    emu.inject_failure(200, "garbage", method="GET")
    await writer.put_config({"after": "garbage"})
    await w.wait_for(lambda v: v.config == {"after": "garbage"}, within=3.0)
    assert emu.pending_failures == 0


async def test_put_member_refuses_a_key_held_by_another_session(
    emulator_dcs_factory: MakeDcs,
) -> None:
    a = await ready(emulator_dcs_factory)
    b = await ready(emulator_dcs_factory)
    await a.register_member("pg-1", {"instance_id": "i-1"})
    with pytest.raises(DuplicateMember):
        await b.put_member("pg-1", {"instance_id": "i-2"})


# -- watch: latency and Consul's index rules ------------------------------------------------------


def _has_lsn(view: ClusterView, lsn: int) -> bool:
    return bool(view.members.get("x", {}).get("lsn") == lsn)


async def test_watch_delivers_changes_in_tens_of_milliseconds(
    emulator_dcs_factory: MakeDcs, watchers: Callable[[ConsulDCS], Watcher]
) -> None:
    d = await ready(emulator_dcs_factory)
    writer = await ready(emulator_dcs_factory)
    w = watchers(d)
    await w.wait_for(lambda v: True)
    latencies = []
    for i in range(20):
        t0 = time.monotonic()
        await writer.put_member("x", {"instance_id": "ix", "lsn": i})
        at, _ = await w.wait_for(partial(_has_lsn, lsn=i))
        latencies.append(at - t0)
    latencies.sort()
    # Not a speed test (figures come from the benchmark): a poller would see a change only after
    # its period (seconds); a blocking query sees it at once, so even on a loaded CI machine the
    # median stays far below that.
    assert latencies[len(latencies) // 2] < 0.5, latencies


async def test_watch_resets_when_a_snapshot_restore_sends_the_index_back(
    emulator_dcs_factory: MakeDcs,
    watchers: Callable[[ConsulDCS], Watcher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="events.dcs.consul")
    a = await ready(emulator_dcs_factory)
    b = await ready(emulator_dcs_factory)
    observer = await ready(emulator_dcs_factory, session=False)
    emu = emulator_of(emulator_dcs_factory)
    la = await a.acquire_leader("a")
    assert la is not None
    snap = emu.snapshot()
    assert await a.release_leader("a", la.term)
    lb = await b.acquire_leader("b")
    assert lb is not None
    w = watchers(observer)
    _, before = await w.wait_for(lambda v: v.leader == lb)
    await asyncio.sleep(0.1)  # the watch is blocked in its next query now
    emu.restore(snap)  # an operator restored an older raft snapshot
    _, restored = await w.wait_for(lambda v: v.leader is not None and v.leader.name == "a")
    assert restored.index < before.index
    assert "index went back" in caplog.text
    # and the watch goes on from the reset index
    await b.put_config({"after": "restore"})
    await w.wait_for(lambda v: v.config == {"after": "restore"})


async def test_watch_resets_when_reaped_tombstones_send_the_index_back(
    emulator_dcs_factory: MakeDcs,
    watchers: Callable[[ConsulDCS], Watcher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="events.dcs.consul")
    d = await ready(emulator_dcs_factory, watch_wait=0.3)
    writer = await ready(emulator_dcs_factory)
    emu = emulator_of(emulator_dcs_factory)
    await writer.put_config({"k": 1})
    await writer.put_switchover({"to": "x"})
    await writer.delete_switchover()  # the prefix's index is now this delete's tombstone
    w = watchers(d)
    _, first = await w.wait_for(lambda v: v.config == {"k": 1} and v.switchover is None)
    emu.reap_tombstones()
    # the next blocking answer (after wait) carries a lower index: reset and re-read
    deadline = time.monotonic() + 2.0
    while "index went back" not in caplog.text:
        assert time.monotonic() < deadline, "no index reset"
        await asyncio.sleep(0.05)
    after = len(w.views)
    await writer.put_config({"k": 2})
    _, view = await w.wait_for(lambda v: v.config == {"k": 2}, after=after)
    assert view.index > first.index


async def test_watch_does_not_spin_on_a_zero_index(
    emulator_dcs_factory: MakeDcs, watchers: Callable[[ConsulDCS], Watcher]
) -> None:
    emu = emulator_of(emulator_dcs_factory)
    emu.force_index_zero = True  # the Consul bug the docs warn about
    d = await ready(emulator_dcs_factory, watch_wait=0.3)
    w = watchers(d)
    await w.wait_for(lambda v: True)
    emu.clear_requests()
    await asyncio.sleep(1.0)
    reads = emu.requests[f"/v1/kv/{d.base}"]
    assert reads <= 5, reads  # one blocking read per wait (index 1), not a busy loop
    assert len(w.views) == 1


async def test_watch_rate_limits_a_server_that_does_not_block(
    emulator_dcs_factory: MakeDcs, watchers: Callable[[ConsulDCS], Watcher]
) -> None:
    emu = emulator_of(emulator_dcs_factory)
    d = await ready(emulator_dcs_factory)
    w = watchers(d)
    await w.wait_for(lambda v: True)
    emu.ignore_blocking = True  # every blocking query answers at once, nothing changed
    emu.clear_requests()
    await asyncio.sleep(1.5)
    reads = emu.requests[f"/v1/kv/{d.base}"]
    # the token bucket: a burst of 10, then 20 per second - not thousands
    assert 15 <= reads <= 10 + 20 * 1.5 + 5, reads
    assert len(w.views) == 1  # no change, no view


async def test_close_ends_a_running_watch(emulator_dcs_factory: MakeDcs) -> None:
    d = await ready(emulator_dcs_factory)
    views: list[ClusterView] = []

    async def run() -> None:
        async for view in d.watch():
            views.append(view)

    task = asyncio.create_task(run())
    await _until(lambda: bool(views))
    await d.close()
    await asyncio.wait_for(task, 1.0)  # ended without raising


# -- ACL token: enforced, never leaked -----------------------------------------------------------


@pytest.fixture
async def acl_emulator() -> AsyncIterator[ConsulEmulator]:
    async with ConsulEmulator(acl_token=TOKEN, min_ttl=2) as emulator:
        yield emulator


def _all_text(exc: BaseException) -> str:
    parts = []
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts += [str(e), repr(e), repr(e.args)]
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


async def test_token_is_sent_as_header_and_never_leaks(
    acl_emulator: ConsulEmulator,
    caplog: pytest.LogCaptureFixture,
    health_endpoint: HealthEndpoint,
) -> None:
    caplog.set_level(logging.DEBUG)
    d = make_consul_dcs(acl_emulator.url, "c", "p", min_ttl=2, settings={"token": SecretStr(TOKEN)})
    observer = make_consul_dcs(
        acl_emulator.url, "c", "p", min_ttl=2, settings={"token": SecretStr(TOKEN)}
    )
    errors: list[BaseException] = []
    try:
        await d.connect()
        await d.open_session(2)
        await d.register_member("pg-1", {"instance_id": "i"})
        assert await d.acquire_leader("pg-1") is not None
        await d.register_service("c", ["master"], 5432, health_endpoint.url + "/primary")
        views = []
        async for view in observer.watch():
            views.append(view)
            break
        # failures whose text might carry it: an error body echoing it, a dead agent
        acl_emulator.inject_failure(500, f"rpc error: token {TOKEN} rejected", count=1)
        with pytest.raises(DCSError) as echoed:
            await d.read_cluster()
        errors.append(echoed.value)
        await acl_emulator.stop_listener()
        with pytest.raises(DCSError) as down:
            await d.renew_session()
        errors.append(down.value)
        await acl_emulator.start_listener()
    finally:
        await d.close()
        await observer.close()
    for exc in errors:
        assert TOKEN not in _all_text(exc)
    assert "***" in str(errors[0])
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(d)
    assert all(TOKEN not in path for _m, path in acl_emulator.request_log)


@pytest.mark.parametrize("token", [None, "wrong-token-value"])
async def test_refused_token_raises_auth_error_naming_the_setting(
    acl_emulator: ConsulEmulator, token: str | None
) -> None:
    settings = {"token": SecretStr(token)} if token else {}
    d = make_consul_dcs(acl_emulator.url, "c", "p", min_ttl=2, settings=settings)
    try:
        with pytest.raises(AuthError, match=r"dcs\.consul\.token") as refused:
            await d.connect()
    finally:
        await d.close()
    if token:
        assert token not in _all_text(refused.value)
        assert "ACL not found" in str(refused.value)


async def test_token_file_and_consul_env_vars(
    acl_emulator: ConsulEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # py-consul would let these override the config: the config is the only source for us
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "an-env-token-that-is-wrong")
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.1:1")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    d = make_consul_dcs(acl_emulator.url, "c", "p", min_ttl=2, settings={"token_file": token_file})
    try:
        await d.connect()
        await d.open_session(2)
    finally:
        await d.close()
    with pytest.raises(ConfigError, match=r"dcs\.consul\.token_file"):
        make_consul_dcs(acl_emulator.url, "c", "p", settings={"token_file": tmp_path / "missing"})


# -- configuration and TLS ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"url": "ftp://consul:8500"}, "dcs.consul.url"),
        ({"url": "http://consul:8500/v1"}, "dcs.consul.url"),
        ({"url": "http://consul:8500", "ca_cert": Path("/ca.pem")}, "dcs.consul.ca_cert"),
        (
            {"url": "https://consul:8501", "client_key": Path("/key.pem")},
            "dcs.consul.client_key",
        ),
        ({"url": "https://consul:8501", "ca_cert": Path("/no/such/ca.pem")}, "dcs.consul.ca_cert"),
    ],
)
def test_bad_settings_name_the_field(settings: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ConsulDCS(ConsulSettings(**settings), "c")


def test_settings_from_the_factory_and_no_deprecated_aiohttp_use() -> None:
    from events.dcs.factory import create_dcs

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = create_dcs(DcsSettings(type="consul"), "c1")
    assert isinstance(d, ConsulDCS) and d.base == "pgsidecar/c1/"
    assert ConsulSettings().session_ttl_min == 10
    v6 = ConsulDCS(ConsulSettings(url="http://[::1]:8500"), "c")
    assert v6._client.http.base_uri == "http://[::1]:8500"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make test certificates")
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=pgsidecar-test-ca", cwd=d)  # fmt: skip
    for name in ("server", "client"):
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    return {p.name: p for p in d.iterdir()}


async def test_tls_ca_and_client_certificate(tls_files: dict[str, Path]) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tls_files["server.crt"], tls_files["server.key"])
    server_ctx.load_verify_locations(tls_files["ca.crt"])
    server_ctx.verify_mode = ssl.CERT_REQUIRED  # Consul's verify_incoming
    client = {"client_cert": tls_files["client.crt"], "client_key": tls_files["client.key"]}
    async with ConsulEmulator(ssl_context=server_ctx, min_ttl=2) as emulator:
        assert emulator.url.startswith("https://")

        async def attempt(**settings: Any) -> None:
            d = make_consul_dcs(emulator.url, "c", "p", min_ttl=2, settings=settings)
            try:
                await d.connect()
                await d.open_session(2)
                assert await d.acquire_leader("a") is not None
                await d.close_session()
            finally:
                await d.close()

        await attempt(ca_cert=tls_files["ca.crt"], **client)
        await attempt(verify=False, **client)  # no server verification (tests only)
        with pytest.raises(AuthError, match=r"dcs\.consul\.ca_cert"):
            await attempt(**client)  # the server's CA is unknown to the system store
        with pytest.raises(DCSError, match=r"dcs\.consul\.client_cert"):
            await attempt(ca_cert=tls_files["ca.crt"])  # Consul hangs up on us


# -- service registration ------------------------------------------------------------------------


async def test_service_registration_follows_the_role(
    emulator_dcs_factory: MakeDcs, health_endpoint: HealthEndpoint
) -> None:
    d = await ready(emulator_dcs_factory, "pg")
    emu = emulator_of(emulator_dcs_factory)
    await d.register_member("pg-1", {"instance_id": "i-1"})
    url = health_endpoint.url

    await d.register_service("pg", ["master"], 5432, url + "/primary", check_interval="100ms")
    (service,) = emu.services.values()
    assert (service.id, service.name, service.tags, service.port) == (
        "pg-pg-1",
        "pg",
        ["master"],
        5432,
    )
    assert service.meta == {"member": "pg-1", "cluster": "pg"}
    (check,) = (emu.checks[c] for c in service.check_ids)
    assert check.http == url + "/primary"
    await _until(lambda: check.status == "passing")

    # demoted: the tag and the check follow, and the old check is gone
    await d.register_service("pg", ["replica"], 5432, url + "/replica", check_interval="100ms")
    (service,) = emu.services.values()
    assert service.tags == ["replica"]
    assert [emu.checks[c].http for c in service.check_ids] == [url + "/replica"]
    assert len(emu.checks) == 1
    new_check = emu.checks[service.check_ids[0]]
    await _until(lambda: new_check.status == "critical")  # /replica answers 503 for now
    health_endpoint.codes["/replica"] = 200
    await _until(lambda: new_check.status == "passing")

    await d.deregister_service()
    assert emu.services == {} and emu.checks == {}
    await d.deregister_service()  # nothing registered: a no-op


async def test_service_registration_can_be_turned_off(emulator_dcs_factory: MakeDcs) -> None:
    d = await ready(emulator_dcs_factory, settings={"register_service": False})
    await d.register_service("pg", ["master"], 5432, "http://127.0.0.1:1/primary")
    assert emulator_of(emulator_dcs_factory).services == {}


async def _until(pred: Callable[[], bool], within: float = 3.0) -> None:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < within, "condition not reached"
        await asyncio.sleep(0.02)


# -- the same scenario against a real agent, when there is one -----------------------------------


async def test_real_agent_scenario(
    consul_agent_dcs_factory: MakeDcs, watchers: Callable[[ConsulDCS], Watcher]
) -> None:
    """Skipped without a ``consul`` binary. Session shape, lease, watch, expiry within 2 x TTL."""
    a = await ready(consul_agent_dcs_factory)
    observer = await ready(consul_agent_dcs_factory, session=False)
    w = watchers(observer)
    leader = await a.acquire_leader("a")
    assert leader is not None
    await w.wait_for(lambda v: v.leader == leader)
    info = await a._client.session.info(a._session_id)
    assert info[1]["Behavior"] == "delete" and info[1]["LockDelay"] == 0
    assert not info[1].get("NodeChecks")
    t0 = time.monotonic()
    at, _ = await w.wait_for(lambda v: v.leader is None, within=a.worst_case_expiry + 2)
    assert at - t0 >= a.session_ttl * 0.5
