"""The IPv6 loopback (::1) for the tests that listen on it: whether this machine has one (a
container may have IPv6 off), the mark that skips a test without it, and a free port on it."""

from __future__ import annotations

import socket

import pytest


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6_loopback = pytest.mark.skipif(
    not ipv6_loopback(), reason="no IPv6 on the loopback interface"
)


def free_ipv6_loopback_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])
