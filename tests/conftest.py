"""Shared fixtures. Backend-specific fixtures live in their own plugin modules."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fixtures_etcd",
    "tests.fixtures_consul",
    "tests.fixtures_kafka",
]


@pytest.fixture(params=["etcd", "consul"])
def dcs_backend(request: pytest.FixtureRequest):
    """A factory ``make_dcs(cluster: str) -> DCS`` for each backend, over a real etcd (started by
    tests.fixtures_etcd) and the Consul emulator (tests.fixtures_consul). Every DCS made is closed
    at teardown by the backend fixture."""
    if request.param == "etcd":
        return request.getfixturevalue("etcd_dcs_factory")
    return request.getfixturevalue("consul_dcs_factory")
