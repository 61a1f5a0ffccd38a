"""Shared fixtures. Backend-specific fixtures live in their own plugin modules."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fixtures_etcd",
    "tests.fixtures_consul",
    "tests.fixtures_kafka",
    "tests.fixtures_sim",
]


@pytest.fixture(params=["etcd", "consul", "sim"])
def dcs_backend(request: pytest.FixtureRequest):
    """A factory ``make_dcs(cluster: str) -> DCS`` for each backend, over a real etcd (started by
    tests.fixtures_etcd), the Consul emulator (tests.fixtures_consul) and the simulator's store
    (tests.fixtures_sim, on the test's ordinary loop). Every DCS made is closed at teardown by the
    backend fixture."""
    if request.param == "etcd":
        return request.getfixturevalue("etcd_dcs_factory")
    if request.param == "sim":
        return request.getfixturevalue("sim_dcs_factory")
    return request.getfixturevalue("consul_dcs_factory")
