"""``pgsidecar history`` from the Kafka topic (a real broker) matches the same history from the
journal. The formatting itself is tested in tests/unit/test_kafka_history.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from events.kafka import KafkaSink, read_topic
from events.sinks import JournalSink, read_journal
from pgsidecar.history import (
    format_history,
)
from pgsidecar.lab.kafka_broker import KafkaBroker
from tests.unit.test_kafka_history import failover


@pytest.mark.kafka
@pytest.mark.timeout(120)
async def test_history_from_the_topic_matches_the_journal(
    kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path
) -> None:
    """The same records through the journal and through Kafka give the same history."""
    recs = failover()
    sinks = {
        n: KafkaSink(
            kafka_broker.bootstrap, kafka_topic, n, tmp_path / n, registry=CollectorRegistry()
        )
        for n in ("pg-1", "pg-2")
    }
    journal = JournalSink(tmp_path / "all.jsonl")
    for s in sinks.values():
        await s.start()
    try:
        for r in recs:
            sinks[r.node].emit(r)
            journal.emit(r)
        for s in sinks.values():
            assert await s.flush(30)
    finally:
        for s in sinks.values():
            await s.close()
        await journal.close()
    from_topic, skipped = await read_topic(kafka_broker.bootstrap, kafka_topic, timeout=30)
    assert skipped == []
    from_journal, _ = read_journal(tmp_path / "all.jsonl")
    assert format_history(from_topic) == format_history(from_journal)
    assert format_history(from_topic, as_json=True) == format_history(from_journal, as_json=True)
