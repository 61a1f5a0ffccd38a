"""The real agent as the factory builds it from a config (a fence process starts; nothing else
runs): the ports are the real ones, and the Kafka sink counts into the registry /metrics serves
(it once registered on prometheus-client's global registry, which nothing served)."""

from __future__ import annotations

from pathlib import Path

from events.kafka import KafkaSink
from pgsidecar.agent import build_agent
from pgsidecar.agent.ports import SystemClock
from pgsidecar.config import AgentConfig
from pgsidecar.postgres.control import PostgresControl
from pgsidecar.watchdog import Watchdog


async def test_the_factory_wires_the_real_ports_and_one_metrics_registry(tmp_path: Path) -> None:
    cfg = AgentConfig.model_validate(
        {
            "name": "pg1",
            "cluster": "c1",
            "state_dir": str(tmp_path / "state"),
            "postgresql": {"data_dir": str(tmp_path / "data")},
            "kafka": {"bootstrap_servers": ["127.0.0.1:1"]},
        }
    )
    agent = build_agent(cfg)
    try:
        assert isinstance(agent.pg, PostgresControl)
        assert isinstance(agent.fence, Watchdog)
        assert isinstance(agent.clock, SystemClock)
        (kafka,) = [s for s in agent.recorder.sinks if isinstance(s, KafkaSink)]
        registry = agent.services.metrics_registry
        kafka.metrics.dropped.labels(kind="input").inc(2)
        assert registry.get_sample_value("pgsidecar_records_dropped_total", {"kind": "input"}) == 2
        # the server log's drops are counted there too
        assert registry.get_sample_value("pgsidecar_postgresql_log_dropped_total") == 0
        agent.pg.server_log.dropped = 3
        assert registry.get_sample_value("pgsidecar_postgresql_log_dropped_total") == 3
        assert agent.services.peer_feed is not None and agent.services.serve_api
        assert agent.services.kubernetes is None
    finally:
        agent.fence.stop()
        await agent.dcs.close()
