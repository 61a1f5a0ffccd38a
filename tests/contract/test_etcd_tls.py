"""EtcdDCS over TLS against a real etcd that requires client certificates (--client-cert-auth)
and has authentication on, with a user whose role covers only the cluster's prefix."""

from __future__ import annotations

import json
import logging
import shutil
import ssl
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from events.dcs.base import AuthError, DCSError
from events.dcs.etcd import EtcdDCS, _b64, _prefix_end
from pgsidecar.config import EtcdSettings
from pgsidecar.lab import tlsgen
from tests.support.fixtures_etcd import EtcdServer, _require_integration_marker, _tmp_root

PASSWORD = "tls-Pa55-w0rd#x"
PREFIX = "pgtls"


class TlsEtcdServer(EtcdServer):
    """An EtcdServer whose client URL is https:// (the peer URL stays on loopback http)."""

    tls: tlsgen.TlsMaterial

    def _set_ports(self, ports: tuple[int, int]) -> None:
        super()._set_ports(ports)
        self.endpoint = f"https://127.0.0.1:{self.client_port}"

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.tls.ca_cert))
        client = self.tls.member("client")
        ctx.load_cert_chain(str(client.cert), str(client.key))
        return ctx

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(
                self.endpoint + "/health", timeout=0.5, context=self.client_context()
            ) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def etcdctl(self, *args: str, env: dict[str, str] | None = None) -> str:
        client = self.tls.member("client")
        tls_args = (f"--cacert={self.tls.ca_cert}", f"--cert={client.cert}", f"--key={client.key}")
        return super().etcdctl(*tls_args, *args, env=env)


@pytest.fixture(scope="module")
def etcd_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsEtcdServer]:
    material = tlsgen.generate(tmp_path_factory.mktemp("etcd-tls"), ["etcd"])
    server_cert = material.member("etcd")
    args = (
        f"--cert-file={server_cert.cert}",
        f"--key-file={server_cert.key}",
        f"--trusted-ca-file={material.ca_cert}",
        "--client-cert-auth",
    )
    TlsEtcdServer.tls = material
    _require_integration_marker()
    base = Path(tempfile.mkdtemp(prefix="pgsidecar-etcd-tls-", dir=_tmp_root()))
    server = TlsEtcdServer(base, args)
    try:
        server.start()
        server.etcdctl("user", "add", "root:rootpw", "--interactive=false")
        server.etcdctl("user", "add", f"agent:{PASSWORD}", "--interactive=false")
        server.etcdctl("role", "add", "pgs")
        server.etcdctl(
            "role", "grant-permission", "pgs", "readwrite", "--prefix=true", PREFIX + "/"
        )
        server.etcdctl("user", "grant-role", "agent", "pgs")
        server.etcdctl("auth", "enable")
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def settings(server: TlsEtcdServer, **overrides: object) -> EtcdSettings:
    client = server.tls.member("client")
    values: dict[str, object] = {
        "endpoints": [server.endpoint],
        "username": "agent",
        "password": SecretStr(PASSWORD),
        "ca_cert": server.tls.ca_cert,
        "client_cert": client.cert,
        "client_key": client.key,
    }
    values.update(overrides)
    return EtcdSettings.model_validate(values)


async def test_the_adapter_works_with_the_right_ca_cert_key_and_user(
    etcd_tls: TlsEtcdServer,
) -> None:
    d = EtcdDCS(settings(etcd_tls), cluster="c1", prefix=PREFIX)
    try:
        await d.connect()
        await d.open_session(2)
        await d.register_member("a", {"instance_id": "ia"})
        leader = await d.acquire_leader("a")
        assert leader is not None
        view = await d.read_cluster()
        assert view.leader == leader and "a" in view.members
        watch = d.watch()
        first = await anext(watch)
        assert first.leader == leader
        await watch.aclose()
    finally:
        await d.close_session()
        await d._delete_prefix()
        await d.close()


@pytest.mark.parametrize(
    ("overrides", "error", "names"),
    [
        ({"client_cert": None, "client_key": None}, AuthError, "dcs.etcd.client_cert"),
        ({"ca_cert": None}, DCSError, "dcs.etcd.ca_cert"),
        ({"password": SecretStr("wrong-" + PASSWORD)}, AuthError, "dcs.etcd.password"),
        ({"username": None, "password": None}, AuthError, "dcs.etcd.username"),
    ],
    ids=["no-client-cert", "no-ca", "wrong-password", "no-user"],
)
async def test_a_missing_or_wrong_setting_fails_naming_it(
    etcd_tls: TlsEtcdServer,
    overrides: dict[str, object],
    error: type[Exception],
    names: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    d = EtcdDCS(settings(etcd_tls, **overrides), cluster="c1", prefix=PREFIX)
    try:
        with pytest.raises(error) as info:
            await d.connect()
        message = str(info.value)
        assert names in message, message
        assert PASSWORD not in message and PASSWORD not in caplog.text
        assert PASSWORD not in repr(d)
    finally:
        await d.close()


async def test_the_user_cannot_touch_keys_outside_its_prefix(etcd_tls: TlsEtcdServer) -> None:
    # through the adapter: a cluster under another prefix is refused
    d = EtcdDCS(settings(etcd_tls), cluster="c1", prefix="elsewhere")
    try:
        with pytest.raises(AuthError, match="permission denied"):
            await d.read_cluster()
    finally:
        await d.close()
    # and with the user's own token on the raw gateway: reading or writing another key fails,
    # the same request inside the prefix succeeds
    ctx = etcd_tls.client_context()

    def post(path: str, body: dict[str, object], token: str | None = None) -> dict[str, object]:
        req = urllib.request.Request(etcd_tls.endpoint + path, data=json.dumps(body).encode())
        if token:
            req.add_header("Authorization", token)
        try:
            with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
                return dict(json.loads(resp.read()))
        except urllib.error.HTTPError as exc:
            return dict(json.loads(exc.read()))

    token = str(post("/v3/auth/authenticate", {"name": "agent", "password": PASSWORD})["token"])
    outside = {"key": _b64("secret/x"), "range_end": _b64(_prefix_end("secret/"))}
    assert "permission denied" in str(post("/v3/kv/range", outside, token).get("error"))
    put = post("/v3/kv/put", {"key": _b64("secret/x"), "value": _b64("v")}, token)
    assert "permission denied" in str(put.get("error"))
    inside = post("/v3/kv/range", {"key": _b64(PREFIX + "/x")}, token)
    assert "error" not in inside and "header" in inside


def test_an_http_endpoint_refuses_credentials_without_the_opt_in() -> None:
    with pytest.raises(ValueError, match="allow_plaintext_credentials") as info:
        EtcdSettings(
            endpoints=["http://127.0.0.1:2379"], username="agent", password=SecretStr(PASSWORD)
        )
    assert PASSWORD not in str(info.value)
    opted_in = EtcdSettings(
        endpoints=["http://127.0.0.1:2379"],
        username="agent",
        password=SecretStr(PASSWORD),
        allow_plaintext_credentials=True,
    )
    assert opted_in.resolve_password() == PASSWORD
    # over https:// no opt-in is needed
    EtcdSettings(endpoints=["https://127.0.0.1:2379"], username="agent", password=SecretStr("x"))
