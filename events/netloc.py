"""host:port and URLs with IPv6 literals in brackets (RFC 3986 §3.2.2: ``[::1]:8008``), in one
place. Every URL the agent or its CLI builds from a host and a port goes through here, so a
member listening on an IPv6 address publishes a URL that a client can parse."""

from __future__ import annotations

import ipaddress

__all__ = ["host_port", "url"]


def _bracketed(host: str) -> str:
    if host.startswith("[") and host.endswith("]"):
        return host
    bare = host.split("%", 1)[0]  # a zone index (fe80::1%eth0) is not part of the address
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return host  # a host name, or an IPv4 address
    if ip.version == 6:
        # RFC 6874: the zone's "%" is percent-encoded inside a URL's brackets
        return f"[{host.replace('%', '%25')}]" if "%" in host else f"[{host}]"
    return host


def host_port(host: str, port: int | str) -> str:
    """``host:port``, an IPv6 address in brackets: ``[::1]:5432``, ``db.example:5432``."""
    return f"{_bracketed(host)}:{port}"


def url(scheme: str, host: str, port: int | str, path: str = "") -> str:
    """``scheme://host:port/path`` with an IPv6 host in brackets."""
    return f"{scheme}://{host_port(host, port)}{path}"
