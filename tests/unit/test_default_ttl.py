"""The lease TTL defaults to 5 s everywhere a default lives, and the timings derived from it
(computed by the agent's own code, not copied here) keep the fencing arithmetic of
ARCHITECTURE.md ("Fencing", "The stream guard") at that default."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import yaml

from events.dcs.consul import ConsulDCS
from fsm.machine import Role
from fsm.snapshot import DEFAULT_TTL, Settings
from pgsidecar.cli import build_parser
from pgsidecar.config import AgentConfig, ClusterSettings, ConsulSettings
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


def test_deploy_keeps_ttl_10_because_its_consul_fails_over_no_sooner_at_5() -> None:
    """deploy/ sets ttl 10, not the default, for its Consul servers (Consul's default minimum
    session TTL): the session the agent gets, so the time a dead master's key may survive, is
    the same at the default TTL, and the higher TTL only relaxes what follows the TTL."""
    repo = Path(__file__).resolve().parents[2]
    agent = yaml.safe_load((repo / "deploy/kubernetes/agent.yaml").read_text())
    values = yaml.safe_load((repo / "deploy/helm/pgsidecar/values.yaml").read_text())
    assert agent["dcs"]["type"] == values["dcs"]["type"] == "consul"
    # neither the servers nor the agents change Consul's minimum session TTL (10 s)
    assert "session_ttl_min" not in agent["dcs"]["consul"]
    assert "session_ttl_min" not in json.loads((repo / "deploy/consul/server.json").read_text())
    consul = ConsulDCS(ConsulSettings(), "c")
    for ttl in (agent["settings"]["ttl"], values["settings"]["ttl"]):
        assert ttl > DEFAULT_TTL
        assert consul.session_ttl_for(ttl) == consul.session_ttl_for(DEFAULT_TTL) == 10
