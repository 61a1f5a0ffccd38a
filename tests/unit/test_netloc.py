"""host:port and URLs: an IPv6 literal is bracketed (``[::1]:8008``) wherever the agent builds
an address from a host and a port, so a client can tell the port from the address."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

from events import netloc
from events.k8s import Access, resolve_access
from events.settings import KubernetesSettings
from pgsidecar.config import ApiSettings


@pytest.mark.parametrize(
    "host,port,want",
    [
        ("127.0.0.1", 5432, "127.0.0.1:5432"),
        ("db.example.svc", 5432, "db.example.svc:5432"),
        ("::1", 8008, "[::1]:8008"),
        ("::", 8008, "[::]:8008"),
        ("2001:db8::5", "2379", "[2001:db8::5]:2379"),
        ("[2001:db8::5]", 2379, "[2001:db8::5]:2379"),  # already bracketed: kept
        ("fe80::1%eth0", 80, "[fe80::1%25eth0]:80"),  # RFC 6874 zone
        ("::ffff:10.0.0.1", 80, "[::ffff:10.0.0.1]:80"),
    ],
)
def test_host_port(host: str, port: int | str, want: str) -> None:
    assert netloc.host_port(host, port) == want


@pytest.mark.parametrize("host", ["::1", "2001:db8::5", "10.1.2.3", "pg-0.pg.svc"])
def test_a_url_parses_back_to_its_host_and_port(host: str) -> None:
    parts = urlsplit(netloc.url("http", host, 8008, "/status"))
    assert (parts.hostname, parts.port, parts.path) == (host, 8008, "/status")


@pytest.mark.parametrize(
    "listen,want",
    [
        ("::1", "http://[::1]:8008"),
        ("::", "http://[::]:8008"),
        ("10.0.0.5", "http://10.0.0.5:8008"),
    ],
)
def test_api_url_published_for_a_listen_address(listen: str, want: str) -> None:
    assert ApiSettings(listen=listen, port=8008).url == want


def test_an_explicit_connect_url_is_kept() -> None:
    assert ApiSettings(listen="::", connect_url="http://pg-0.pg:8008").url == "http://pg-0.pg:8008"


def test_in_cluster_api_server_on_an_ipv6_service_address(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t")
    access = resolve_access(
        KubernetesSettings(enabled=True, namespace="pgs"),
        {"KUBERNETES_SERVICE_HOST": "fd00:10:96::1", "KUBERNETES_SERVICE_PORT": "443"},
        tmp_path,
    )
    assert isinstance(access, Access)
    assert access.url == "https://[fd00:10:96::1]:443"
