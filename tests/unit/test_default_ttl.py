"""The lease TTL defaults to 5 s everywhere a default lives, and the timings derived from it
(computed by the agent's own code, not copied here) keep the fencing arithmetic of
ARCHITECTURE.md ("Fencing", "The stream guard") at that default."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest

from fsm.machine import Role
from fsm.snapshot import DEFAULT_TTL, Settings
from pgsidecar.cli import build_parser
from pgsidecar.config import AgentConfig, ClusterSettings
from pgsidecar.lab.local import LocalCluster
from pgsidecar.lab.sim.postgres import duration_setting
from pgsidecar.postgres.sql import STREAM_SILENCE_SLACK
from tests.support.agent_fakes import Rig, put


def test_the_default_ttl_is_5_s() -> None:
    assert DEFAULT_TTL == 5.0
    assert Settings().ttl == DEFAULT_TTL
    assert ClusterSettings().ttl == DEFAULT_TTL
    cfg = AgentConfig.model_validate(
        {"name": "pg1", "cluster": "c1", "state_dir": "/s", "postgresql": {"data_dir": "/d"}}
    )
    assert cfg.cluster_settings.ttl == DEFAULT_TTL


@pytest.mark.parametrize(
    "argv",
    [
        ["local", "up"],
        ["chaos"],
        ["bench", "failover"],
        ["lab", "soak", "--hours", "1"],
    ],
)
def test_the_commands_default_to_it(argv: list[str]) -> None:
    assert build_parser(argv).parse_args(argv).ttl == DEFAULT_TTL


def test_a_local_cluster_defaults_to_it() -> None:
    assert inspect.signature(LocalCluster.create).parameters["ttl"].default == DEFAULT_TTL


async def test_the_derived_timings_fence_in_time_at_the_default(tmp_path: Path) -> None:
    """At the default TTL, from the agent's own functions: a master's fencing deadline comes at
    least the smallest margin (0.5 s) before the DCS can expire its key even with its clock
    running slow by the default drift; at least two more renewals are sent between a successful
    one and that deadline; and a partitioned master's stream counts as dead (the silence limit)
    before its key can lapse, so the candidates need not wait for it."""
    cs = ClusterSettings()
    rig = Rig(tmp_path, ttl=cs.ttl)
    await rig.agent.renewal.open_session()
    put(rig, Role.MASTER)
    renewal = rig.agent.renewal
    assert renewal.session_ttl() == DEFAULT_TTL

    every = renewal.interval(False)
    deadline = renewal.fence_deadline(0.0)
    # the DCS's clock at our deadline, ours running up to clock_drift slower
    dcs_time = deadline / (1 - cs.clock_drift)
    assert cs.ttl - dcs_time >= 0.5
    assert math.floor(deadline / every) >= 2

    timeout = rig.agent.config.derived_parameters({})["wal_receiver_timeout"]
    silence_limit = duration_setting(timeout) / 2 + STREAM_SILENCE_SLACK
    # the key lapses no sooner than a TTL after the last renewal, which is at most one renewal
    # interval after the last message the master's walsender could have sent us
    assert silence_limit < cs.ttl - every
    # the figures ARCHITECTURE.md gives for the default
    assert (every, round(deadline, 2), timeout, silence_limit) == (1.25, 4.2, "2500ms", 2.25)
