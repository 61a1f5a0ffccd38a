"""wal_receiver_timeout follows the TTL, so that the stream guard's silence limit (the probe's
wal_receiver_timeout / 2 + slack) is over before a partitioned master's key can lapse."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgsidecar.lab.sim.postgres import duration_setting
from pgsidecar.postgres.sql import STREAM_SILENCE_SLACK
from tests.support.agent_fakes import Rig


@pytest.mark.parametrize(
    ("ttl", "timeout"),
    [(2, "2000ms"), (3, "2000ms"), (5, "2500ms"), (10, "5000ms"), (60, "10000ms")],
)
def test_the_receiver_timeout_follows_the_ttl(tmp_path: Path, ttl: float, timeout: str) -> None:
    rig = Rig(tmp_path, ttl=ttl)
    derived = rig.agent.config.derived_parameters({})
    assert derived == {"wal_receiver_timeout": timeout}
    limit = duration_setting(timeout) / 2 + STREAM_SILENCE_SLACK
    # the key outlives the master's last renewal (every ttl/4) by at least 0.75 ttl: from 3 s
    # up the stream counts as dead by then; below, the guard waits as it did (at most a TTL)
    assert (limit < 0.75 * ttl) is (ttl >= 3)


def test_a_receiver_timeout_set_by_the_cluster_or_locally_wins(tmp_path: Path) -> None:
    rig = Rig(tmp_path, ttl=5)
    assert rig.agent.config.derived_parameters({"wal_receiver_timeout": "30s"}) == {}
    rig.agent.config.local_parameters = frozenset({"wal_receiver_timeout"})
    assert rig.agent.config.derived_parameters({}) == {}
