"""The REST API over TLS, served by a real ApiServer (in this process, on a free loopback port)
with certificates from the lab's generator: https works with the CA, plain HTTP to the port gets
no answer, a client without a certificate is refused when one is required, and a request that
changes something from outside ``api.command_networks`` gets 403 and changes nothing. The CLI's
member requests (``pgsidecar.cli.members._api``) go over the same https."""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from pgsidecar.api import ApiServer
from pgsidecar.cli.members import _api
from pgsidecar.config import AgentConfig, ApiSettings, ApiTls, ConfigError, PostgresSettings
from pgsidecar.lab import tlsgen
from pgsidecar.procutil import free_port
from tests.unit.test_api_health import SCENARIOS, TOKEN, FakeAgent

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> tlsgen.TlsMaterial:
    return tlsgen.generate(tmp_path_factory.mktemp("tls"), ["pg2"])


def tls_settings(m: tlsgen.TlsMaterial, client_auth: str = "off", **over: Any) -> dict[str, Any]:
    pg2 = m.member("pg2")
    tls: dict[str, Any] = {
        "enabled": True,
        "cert_file": pg2.cert,
        "key_file": pg2.key,
        "ca_file": m.ca_cert,
        "client_auth": client_auth,
    }
    return {"tls": tls, **over}


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``serve(scenario, **api_settings)`` -> (url, agent): an ApiServer of a FakeAgent listening
    on a free loopback port with those settings."""
    servers: list[ApiServer] = []

    async def start(scenario: str = "master", **api: Any) -> tuple[str, FakeAgent]:
        role, snap, running, valid, tags = SCENARIOS[scenario]
        settings = ApiSettings(port=free_port(), token=TOKEN, **api)
        cfg = AgentConfig(
            name="pg2",
            cluster="c1",
            state_dir=tmp_path,
            postgresql=PostgresSettings(data_dir=tmp_path / "pgdata"),
            api=settings,
        )
        agent = FakeAgent(
            cfg=cfg, role_=role, snapshot_=snap(), pg_running_=running, watchdog_valid=valid
        )
        server = ApiServer(agent, settings, registry=agent.metrics_registry)
        await server.start()
        servers.append(server)
        return settings.url, agent

    yield start
    for s in servers:
        await s.stop()


def get(url: str, context: ssl.SSLContext | None = None, **kw: Any) -> tuple[int, Any]:
    req = urllib.request.Request(url, **kw)
    try:
        with urllib.request.urlopen(req, timeout=5, context=context) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def in_thread(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    return asyncio.to_thread(fn, *args, **kw)


async def test_https_with_the_ca_and_no_plain_http(
    serve: Any, material: tlsgen.TlsMaterial
) -> None:
    url, _ = await serve("master", **tls_settings(material))
    assert url.startswith("https://127.0.0.1:")
    ctx = ssl.create_default_context(cafile=str(material.ca_cert))
    code, body = await in_thread(get, f"{url}/primary", ctx)
    assert code == 200 and body["role"] == "master"

    # plain HTTP to the same port: no HTTP answer at all (the TLS handshake fails)
    port = int(url.rsplit(":", 1)[1])

    def plain() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/primary")
            conn.getresponse()
        finally:
            conn.close()

    with pytest.raises((http.client.HTTPException, OSError)):
        await in_thread(plain)

    # a client that does not trust the CA refuses the server
    with pytest.raises(urllib.error.URLError) as info:
        await in_thread(get, f"{url}/primary", ssl.create_default_context())
    assert isinstance(info.value.reason, ssl.SSLCertVerificationError)


async def test_client_certificate_required(serve: Any, material: tlsgen.TlsMaterial) -> None:
    url, agent = await serve("master", **tls_settings(material, "required"))
    bare = ssl.create_default_context(cafile=str(material.ca_cert))
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        await in_thread(get, f"{url}/status", bare)

    # a certificate from another CA is refused too
    other = tlsgen.generate(material.directory / "other", ["x"])
    stranger = ssl.create_default_context(cafile=str(material.ca_cert))
    stranger.load_cert_chain(other.member("client").cert, other.member("client").key)
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        await in_thread(get, f"{url}/status", stranger)

    client = material.member("client")
    good = ssl.create_default_context(cafile=str(material.ca_cert))
    good.load_cert_chain(client.cert, client.key)
    code, body = await in_thread(get, f"{url}/status", good)
    assert code == 200 and body["name"] == "pg2"

    # the CLI's request, with the context its config gives (the member's cert as client cert)
    cli = ApiSettings(**tls_settings(material, "required"))
    code, body = await in_thread(_api, url, "/switchover", TOKEN, "POST", 5, cli.client_context())
    assert code == 202, body
    assert agent.dcs.written and agent.dcs.written[0]["from"] == "pg1"


async def test_client_certificate_optional(serve: Any, material: tlsgen.TlsMaterial) -> None:
    url, _ = await serve("replica", **tls_settings(material, "optional"))
    bare = ssl.create_default_context(cafile=str(material.ca_cert))
    code, _ = await in_thread(get, f"{url}/liveness", bare)
    assert code == 200


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_mutating_request_outside_the_allowlist_is_403_and_changes_nothing(
    serve: Any, material: tlsgen.TlsMaterial, tls: bool
) -> None:
    over = tls_settings(material) if tls else {}
    url, agent = await serve("replica", command_networks=["10.0.0.0/8", "::1/128"], **over)
    ctx = ssl.create_default_context(cafile=str(material.ca_cert)) if tls else None
    for path, body in (("/switchover", b'{"to": "pg2"}'), ("/restart", b"{}"), ("/reinit", b"{}")):
        code, answer = await in_thread(get, url + path, ctx, method="POST", data=body, headers=AUTH)
        assert code == 403, (path, answer)
        assert "command_networks" in answer["error"]
    assert agent.commands == [] and agent.dcs.written == []
    # reading still works from anywhere
    assert (await in_thread(get, f"{url}/status", ctx))[0] == 200

    url, agent = await serve("replica", command_networks=["127.0.0.0/8"], **over)
    code, _ = await in_thread(get, f"{url}/restart", ctx, method="POST", data=b"{}", headers=AUTH)
    assert code == 202 and agent.commands == ["restart"]
    # inside the allowlist, the token is still required
    code, _ = await in_thread(get, f"{url}/restart", ctx, method="POST", data=b"{}")
    assert code == 401


def test_command_allowed_addresses() -> None:
    s = ApiSettings(command_networks=["10.1.0.0/16", "fd00::/8"])
    assert s.command_allowed("10.1.2.3")
    assert s.command_allowed("::ffff:10.1.2.3"), "IPv4 client of a dual-stack socket"
    assert s.command_allowed("fd00::5")
    assert not s.command_allowed("10.2.0.1")
    assert not s.command_allowed("127.0.0.1")
    assert not s.command_allowed(None) and not s.command_allowed("not-an-ip")
    assert ApiSettings().command_allowed("192.0.2.1"), "default: the token alone decides"


def test_settings_validation(material: tlsgen.TlsMaterial) -> None:
    with pytest.raises(ValueError, match="enabled"):
        ApiTls(cert_file=material.ca_cert)
    with pytest.raises(ValueError, match="cert_file and key_file"):
        ApiTls(enabled=True)
    with pytest.raises(ValueError, match="ca_file"):
        ApiTls(enabled=True, cert_file=Path("a"), key_file=Path("b"), client_auth="required")
    with pytest.raises(ValueError, match="CIDR"):
        ApiSettings(command_networks=["10.0.0.0/8", "somewhere"])
    assert ApiSettings(**tls_settings(material), port=8443).url == "https://127.0.0.1:8443"
    assert ApiSettings().url == "http://127.0.0.1:8008"
    assert ApiSettings().client_context() is None


def test_unreadable_key_names_the_files_not_the_contents(
    material: tlsgen.TlsMaterial, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text(
        "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END PRIVATE KEY-----\n"
    )
    tls = ApiTls(enabled=True, cert_file=material.member("pg2").cert, key_file=bad)
    with pytest.raises(ConfigError) as info:
        tls.server_context()
    assert "api.tls.cert_file" in str(info.value) and str(bad) in str(info.value)
    assert "c2VjcmV0" not in str(info.value)
