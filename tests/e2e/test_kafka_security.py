"""The record stream over SASL_SSL (TLS and a SCRAM-SHA-512 login) against a real broker with a
TLS listener and a SCRAM user, and records authenticated with the cluster's key: the sink signs,
the peer consumer drops what does not verify, ``read_topic`` marks it."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from events.kafka import (
    KafkaPeerConsumer,
    KafkaSink,
    client_security,
    encode,
    ensure_topic,
    read_topic,
    record_keys,
)
from events.recordauth import HEADER
from fsm.records import Record
from pgsidecar.config import KafkaSettings
from pgsidecar.lab.kafka_broker import KafkaBroker
from tests.support.fixtures_kafka import SCRAM_PASSWORD, SCRAM_USER

pytest_plugins = ["tests.support.fixtures_kafka"]
pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]

CLUSTER = "c1"
RECORD_KEY = b"k" * 8 + b"0123456789abcdefghijklmnopqrstuvwxyz"


def make_record(node: str, seq: int) -> Record:
    return Record("input", CLUSTER, node, seq, time.time(), 7, {"type": "pg", "n": seq})


def secure_settings(
    broker: KafkaBroker,
    tmp_path: Path,
    topic: str,
    *,
    password: str = SCRAM_PASSWORD,
    key: bytes | None = RECORD_KEY,
) -> KafkaSettings:
    assert broker.tls is not None
    tmp_path.mkdir(parents=True, exist_ok=True)
    password_file = tmp_path / f"kafka-password-{len(password)}"
    password_file.write_text(password + "\n")
    values: dict[str, Any] = {
        "bootstrap_servers": [broker.bootstrap],
        "topic": topic,
        "partitions": 1,
        "security_protocol": "SASL_SSL",
        "ssl_ca_file": broker.tls.ca_cert,
        "sasl_username": SCRAM_USER,
        "sasl_password_file": password_file,
    }
    if key is not None:
        key_file = tmp_path / "record.key"
        key_file.write_bytes(key)
        values["record_key_file"] = key_file
    return KafkaSettings.model_validate(values)


async def wait_until(cond: Any, limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_sink_and_peer_consumer_work_over_sasl_ssl_and_records_are_signed(
    kafka_secure_broker: KafkaBroker, kafka_topic: str, tmp_path: Path
) -> None:
    settings = secure_settings(kafka_secure_broker, tmp_path, kafka_topic)
    security = client_security(settings)
    keys = record_keys(settings)
    assert keys is not None
    sink = KafkaSink.from_settings(
        settings, CLUSTER, "pg-1", tmp_path / "pg-1", registry=CollectorRegistry()
    )
    got: list[Record] = []
    reg = CollectorRegistry()
    peer = KafkaPeerConsumer.from_settings(settings, CLUSTER, "pg-2", got.append, registry=reg)
    await sink.start()
    try:
        sink.emit(make_record("pg-1", 1))
        assert await sink.flush(60), sink.last_error
        await peer.start()
        assert await peer.wait_ready(60)
        sink.emit(make_record("pg-1", 2))
        assert await sink.flush(30), sink.last_error
        await wait_until(lambda: len(got) == 1, 30, "the peer's record")
        assert got[0].seq == 2

        # what else lands on the topic: a record without a signature, one with a signature by
        # another key, and one whose value was changed after signing
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, **security)
        await producer.start()
        try:
            unsigned = encode(make_record("pg-1", 3))
            await producer.send_and_wait(kafka_topic, unsigned, key=b"pg-1", partition=0)
            other_key = make_record("pg-1", 4)
            foreign = record_keys(
                secure_settings(kafka_secure_broker, tmp_path / "x", kafka_topic, key=b"z" * 40)
            )
            assert foreign is not None
            value = encode(other_key)
            await producer.send_and_wait(
                kafka_topic, value, key=b"pg-1", partition=0, headers=foreign.headers(value)
            )
            original = encode(make_record("pg-1", 5))
            tampered = original.replace(b'"n":5', b'"n":6')
            await producer.send_and_wait(
                kafka_topic, tampered, key=b"pg-1", partition=0, headers=keys.headers(original)
            )
            sink.emit(make_record("pg-1", 6))
            assert await sink.flush(30)
        finally:
            await producer.stop()
        await wait_until(lambda: len(got) == 2 and peer.unauthenticated == 3, 30, "the peer")
    finally:
        await peer.close()
        await sink.close()
    assert [r.seq for r in got] == [2, 6]
    assert (
        reg.get_sample_value("pgsidecar_records_unauthenticated_total", {"reason": "unsigned"}) == 1
    )
    assert (
        reg.get_sample_value("pgsidecar_records_unauthenticated_total", {"reason": "forged"}) == 2
    )

    records, skipped = await read_topic(
        settings.bootstrap_servers, kafka_topic, timeout=60, security=security, keys=keys
    )
    assert [r.seq for r in records] == [1, 2, 6]
    assert [s.where for s in skipped] == [f"partition 0 offset {o}" for o in (2, 3, 4)]
    assert all(s.unauthenticated for s in skipped)
    assert "unsigned" in skipped[0].reason and "forged" in skipped[1].reason
    # every record the sink wrote carries the signature header
    assert HEADER == "pgsidecar-hmac"


async def test_a_wrong_password_fails_clearly_and_the_spool_keeps_the_records(
    kafka_secure_broker: KafkaBroker,
    kafka_topic: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-" + SCRAM_PASSWORD
    settings = secure_settings(kafka_secure_broker, tmp_path, kafka_topic, password=wrong)
    sink = KafkaSink.from_settings(
        settings, CLUSTER, "pg-1", tmp_path / "spool", registry=CollectorRegistry()
    )
    await sink.start()
    try:
        for seq in (1, 2, 3):
            sink.emit(make_record("pg-1", seq))
        await wait_until(lambda: sink.last_error is not None, 60, "the sink's first attempt")
        assert not await sink.flush(3)
        assert sink.pending == 3 and sink.sent == 0 and not sink.up
        assert "authentication" in (sink.last_error or "").lower(), sink.last_error
    finally:
        await sink.close(timeout=2)
    for text in (sink.last_error or "", caplog.text):
        assert wrong not in text and SCRAM_PASSWORD not in text
    # the records wait in the spool: with the right password they go out
    good = secure_settings(kafka_secure_broker, tmp_path / "good", kafka_topic)
    sink2 = KafkaSink.from_settings(
        good, CLUSTER, "pg-1", tmp_path / "spool", registry=CollectorRegistry()
    )
    await sink2.start()
    try:
        assert await sink2.flush(60), sink2.last_error
    finally:
        await sink2.close()
    records, skipped = await read_topic(
        good.bootstrap_servers,
        kafka_topic,
        timeout=60,
        security=client_security(good),
        keys=record_keys(good),
    )
    assert [r.seq for r in records] == [1, 2, 3] and not skipped


async def test_a_plaintext_client_gets_nothing_from_the_tls_listener(
    kafka_secure_broker: KafkaBroker, kafka_topic: str
) -> None:
    with pytest.raises(Exception):  # noqa: B017 - any failure: the broker speaks TLS only
        await ensure_topic(kafka_secure_broker.bootstrap, kafka_topic, timeout=5)
