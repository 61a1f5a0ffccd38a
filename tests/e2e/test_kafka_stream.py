"""The audit stream against a real Apache Kafka broker (KRaft, tests/support/fixtures_kafka.py): order,
completeness, outages (broker killed, broker hung), the full spool, malformed records,
duplicates, and a restart of the sink."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from events.kafka import KafkaPeerConsumer, KafkaSink, encode, ensure_topic, read_topic
from fsm.records import Record, Transition
from pgsidecar.lab.kafka_broker import KafkaBroker

# the broker fixtures; also fine if conftest lists the plugin too (it is loaded once)
pytest_plugins = ["tests.support.fixtures_kafka"]

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]

CLUSTER = "c1"


def make_record(node: str, seq: int, kind: str = "input", **body: Any) -> Record:
    if kind == "transition":
        return Transition(
            CLUSTER, node, seq, time.time(), "replica", "candidate", "leader_gone",
            f"leader key expired ({seq})", 7, 2, 0x3000060 + seq,
        ).to_record()  # fmt: skip
    return Record(kind, CLUSTER, node, seq, time.time(), 7, body or {"type": "pg", "n": seq})  # type: ignore[arg-type]


def kind_for(i: int) -> str:
    return "transition" if i % 10 == 0 else ("action" if i % 10 == 5 else "input")


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float:
    v = reg.get_sample_value(name, labels or None)
    return 0.0 if v is None else v


async def raw_topic(bootstrap: str, topic: str) -> list[Any]:
    """Every message on ``topic``, partition by partition, in offset order (no decoding).

    The precondition, waited for explicitly: the broker lists itself in its metadata. Right after
    a SIGSTOP of the broker, KRaft may have fenced it for a moment (its heartbeats stopped): its
    MetadataResponse then names no broker ("No broker metadata found") and a new client's
    bootstrap fails at once (found by CI: the read after the hung-broker test failed so)."""
    deadline = time.monotonic() + 30
    while True:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        try:
            # start and a full metadata read, retried together: a broker that was just resumed
            # (SIGCONT) can serve the first and fail the second while its old connections die
            await consumer.start()
            cluster = await consumer._client.fetch_all_metadata()
            break
        except KafkaError:
            await consumer.stop()
            assert time.monotonic() < deadline, "the broker served no metadata for 30 s"
            await asyncio.sleep(0.5)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[Any] = []
        deadline = time.monotonic() + 30
        for tp in tps:
            while await consumer.position(tp) < end[tp]:
                assert time.monotonic() < deadline, "reading the topic took too long"
                batch = await consumer.getmany(tp, timeout_ms=500)
                out += [m for m in batch.get(tp, []) if m.offset < end[tp]]
        return out
    finally:
        await consumer.stop()


def assert_per_partition_order(msgs: list[Any]) -> None:
    """In the topic itself (not after sorting) each node's records come in seq order."""
    last: dict[tuple[int, str], int] = {}
    for m in msgs:
        rec = json.loads(m.value)
        key = (m.partition, rec["node"])
        assert rec["seq"] > last.get(key, 0), (
            f"{rec['node']} seq {rec['seq']} after {last.get(key)}"
        )
        last[key] = rec["seq"]


async def wait_until(cond: Any, limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_records_arrive_complete_and_in_order_per_node(
    kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path
) -> None:
    bs = kafka_broker.bootstrap
    reg = CollectorRegistry()
    sinks = {
        n: KafkaSink(bs, kafka_topic, n, tmp_path / n, registry=reg)
        for n in ("pg-1", "pg-2", "pg-3")
    }
    for s in sinks.values():
        await s.start()
    sent: dict[str, list[Record]] = {n: [] for n in sinks}
    # the first record of each node makes the agents create the topic (they race for it)
    for n, s in sinks.items():
        sent[n].append(make_record(n, 1, "transition"))
        s.emit(sent[n][-1])
    for s in sinks.values():
        assert await s.flush(30)
    seen_by_pg1: list[Record] = []
    peer = KafkaPeerConsumer(
        bs, kafka_topic, "pg-1", seen_by_pg1.append, cluster=CLUSTER, registry=reg
    )
    await peer.start()
    try:
        assert await peer.wait_ready(30)
        for i in range(2, 302):
            for n, s in sinks.items():
                rec = make_record(n, i, kind_for(i))
                sent[n].append(rec)
                s.emit(rec)
            if i % 50 == 0:
                await asyncio.sleep(0)
        for s in sinks.values():
            assert await s.flush(60)
        await wait_until(lambda: len(seen_by_pg1) >= 600, 30, "pg-1 to see its peers' records")
    finally:
        await peer.close()
        for s in sinks.values():
            await s.close()

    records, skipped = await read_topic(bs, kafka_topic, timeout=30)
    assert skipped == []
    for n in sinks:
        mine = [r for r in records if r.node == n]
        assert [r.to_dict() for r in mine] == [r.to_dict() for r in sent[n]]  # complete, in order
    assert_per_partition_order(await raw_topic(bs, kafka_topic))
    # the peer consumer started at the topic's end: it saw records 2.. of the others, not its own
    assert {r.node for r in seen_by_pg1} == {"pg-2", "pg-3"}
    for n in ("pg-2", "pg-3"):
        assert [r.seq for r in seen_by_pg1 if r.node == n] == list(range(2, 302))
    assert sample(reg, "pgsidecar_records_sent_total") == 903
    assert sample(reg, "pgsidecar_kafka_up") == 1
    assert sample(reg, "pgsidecar_records_spooled") == 0


async def test_broker_killed_records_wait_in_spool_and_go_in_order(
    kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path
) -> None:
    bs = kafka_broker.bootstrap
    reg = CollectorRegistry()
    sink = KafkaSink(
        bs, kafka_topic, "pg-1", tmp_path / "spool", registry=reg, request_timeout_ms=2000
    )
    await sink.start()
    try:
        for i in range(1, 21):
            sink.emit(make_record("pg-1", i, kind_for(i)))
        assert await sink.flush(30)

        kafka_broker.kill()
        worst = 0.0
        for i in range(21, 221):
            rec = make_record("pg-1", i, kind_for(i))
            t0 = time.perf_counter()
            sink.emit(rec)
            worst = max(worst, time.perf_counter() - t0)
            if i % 20 == 0:
                await asyncio.sleep(0.05)
        # publishing never holds up the machine, broker or not
        assert worst < 0.5, f"emit took {worst * 1000:.1f} ms: it must never wait for the broker"
        await wait_until(lambda: not sink.up, 15, "the sink to notice the outage")
        assert sample(reg, "pgsidecar_kafka_up") == 0
        assert sink.pending == 200
        assert sample(reg, "pgsidecar_records_spooled") == 200

        await asyncio.to_thread(kafka_broker.start)  # the same data dir: the old records stay
        assert await sink.flush(60), f"{sink.pending} records still spooled"
        assert sample(reg, "pgsidecar_kafka_up") == 1
    finally:
        await sink.close()
    records, _ = await read_topic(bs, kafka_topic, timeout=30)
    assert [r.seq for r in records] == list(range(1, 221))  # nothing lost, order kept
    raw = await raw_topic(bs, kafka_topic)
    assert_per_partition_order(raw)  # the idempotent producer's retries made no duplicate
    assert len(raw) == 220


async def test_broker_hung_then_back_peers_get_everything_in_order(
    kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path
) -> None:
    """SIGSTOP: connections stay open but nothing answers (a hung broker or a partition)."""
    bs = kafka_broker.bootstrap
    reg = CollectorRegistry()
    sink = KafkaSink(
        bs, kafka_topic, "pg-1", tmp_path / "spool", registry=reg, request_timeout_ms=2000
    )
    await sink.start()
    got: list[Record] = []
    peer = KafkaPeerConsumer(bs, kafka_topic, "pg-2", got.append, cluster=CLUSTER, registry=reg)
    try:
        sink.emit(make_record("pg-1", 1, "transition"))
        assert await sink.flush(30)
        await peer.start()
        assert await peer.wait_ready(30)
        kafka_broker.pause()
        hung = time.monotonic()
        for i in range(2, 102):
            sink.emit(make_record("pg-1", i, kind_for(i)))
            await asyncio.sleep(0.02)
        await wait_until(lambda: not sink.up, 15, "the sink to notice the hung broker")
        assert sink.pending > 0
        await asyncio.sleep(max(0.0, hung + 6 - time.monotonic()))  # hung for 6 s at least
        kafka_broker.resume()
        assert await sink.flush(60)
        await wait_until(lambda: len(got) >= 100, 30, "the peer to catch up")
    finally:
        await peer.close()
        await sink.close()
    assert [r.seq for r in got] == list(range(2, 102))
    assert_per_partition_order(await raw_topic(bs, kafka_topic))


async def test_full_spool_drops_inputs_first_never_transitions_and_records_the_drop(
    kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path
) -> None:
    bs = kafka_broker.bootstrap
    reg = CollectorRegistry()
    seq = 0
    notices: list[dict[str, Any]] = []

    def next_seq() -> int:
        nonlocal seq
        seq += 1
        return seq

    def on_drop(body: dict[str, Any]) -> None:
        # what the agent does: an action record with its own seq, through the same sinks
        notices.append(body)
        sink.emit(Record("action", CLUSTER, "pg-1", next_seq(), time.time(), 7, body))

    sink = KafkaSink(
        bs,
        kafka_topic,
        "pg-1",
        tmp_path / "spool",
        spool_max_bytes=32 * 1024,
        on_drop=on_drop,
        registry=reg,
    )
    # The sender is not running yet: for the spool that is a broker that is away.
    emitted: list[Record] = []
    for _ in range(1000):
        s = next_seq()
        rec = make_record("pg-1", s, "transition" if s % 25 == 0 else "input", pad="x" * 150)
        emitted.append(rec)
        sink.emit(rec)
    assert sink.spool.stats.disk_bytes <= 32 * 1024
    dropped_inputs = sample(reg, "pgsidecar_records_dropped_total", kind="input")
    assert dropped_inputs > 0
    assert sample(reg, "pgsidecar_records_dropped_total", kind="transition") == 0
    await sink.start()  # the deferred drop notice runs now, then everything is sent
    try:
        await wait_until(lambda: bool(notices), 10, "the drop notice")
        assert await sink.flush(60)
    finally:
        await sink.close()
    records, _ = await read_topic(bs, kafka_topic, timeout=30)
    got = {r.seq: r for r in records}
    transitions = [r.seq for r in emitted if r.kind == "transition"]
    assert [r.seq for r in records if r.kind == "transition"] == transitions  # all of them
    kept_inputs = [r.seq for r in records if r.kind == "input"]
    all_inputs = [r.seq for r in emitted if r.kind == "input"]
    assert kept_inputs == all_inputs[-len(kept_inputs) :]  # the oldest went first
    drops = [r for r in records if r.kind == "action" and r.body.get("name") == "spool_drop"]
    assert drops, "the drop itself is on the record"
    total_dropped = sample(reg, "pgsidecar_records_dropped_total", kind="input")
    assert sum(r.body["dropped"] for r in drops) == total_dropped
    assert len(all_inputs) - len(kept_inputs) == total_dropped
    assert all(got[s].to_dict() == r.to_dict() for r in emitted if (s := r.seq) in got)


async def test_malformed_and_duplicate_records_are_skipped_and_counted(
    kafka_broker: KafkaBroker, kafka_topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    bs = kafka_broker.bootstrap
    assert await ensure_topic(bs, kafka_topic, partitions=1)
    reg = CollectorRegistry()
    got: list[Record] = []
    peer = KafkaPeerConsumer(bs, kafka_topic, "pg-9", got.append, cluster=CLUSTER, registry=reg)
    good1 = make_record("pg-1", 1, "transition")
    good2 = make_record("pg-1", 2)
    other_schema = dict(good1.to_dict(), schema="pgsidecar.record/99")
    no_seq = {k: v for k, v in good1.to_dict().items() if k != "seq"}
    messages: list[tuple[bytes | None, bytes | None]] = [
        (b"pg-1", b"not json at all"),  # offset 0
        (b"pg-1", b"\xff\xfe\x00"),  # 1: not UTF-8
        (b"pg-1", json.dumps(other_schema).encode()),  # 2: unknown schema
        (b"pg-1", json.dumps(no_seq).encode()),  # 3: missing field
        (b"pg-1", encode(good1)),  # 4
        (b"pg-1", encode(good1)),  # 5: duplicate (a resend after a crash)
        (b"pg-7", encode(good2)),  # 6: key and node disagree
        (b"pg-1", encode(good2)),  # 7
        (b"pg-1", None),  # 8: tombstone
    ]
    caplog.set_level(logging.WARNING, logger="events.kafka")
    await peer.start()
    try:
        assert await peer.wait_ready(30)
        producer = AIOKafkaProducer(bootstrap_servers=bs)
        await producer.start()
        try:
            for key, value in messages:
                await producer.send_and_wait(kafka_topic, value, key=key, partition=0)
        finally:
            await producer.stop()
        await wait_until(
            lambda: peer.skipped_count + peer.delivered + peer.duplicates >= 9, 30, "the peer"
        )
    finally:
        await peer.close()
    assert [r.to_dict() for r in got] == [good1.to_dict(), good2.to_dict()]
    assert peer.skipped_count == 6
    assert peer.duplicates == 1
    assert sample(reg, "pgsidecar_records_skipped_total") == 6
    assert sample(reg, "pgsidecar_records_duplicate_total") == 1
    where = [s.where for s in peer.skipped]
    assert where == [f"partition 0 offset {o}" for o in (0, 1, 2, 3, 6, 8)]
    reasons = " | ".join(s.reason for s in peer.skipped)
    for needle in ("not valid JSON", "unknown schema", "'seq'", "does not match node", "tombstone"):
        assert needle in reasons
    assert "offset 2" in caplog.text and "unknown schema" in caplog.text

    records, skipped = await read_topic(bs, kafka_topic, timeout=30)
    assert [r.to_dict() for r in records] == [good1.to_dict(), good2.to_dict()]
    assert [s.where for s in skipped] == where


async def test_spool_survives_a_restart_of_the_sink(
    kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path
) -> None:
    bs = kafka_broker.bootstrap
    spool = tmp_path / "spool"
    sink = KafkaSink(
        bs, kafka_topic, "pg-1", spool, registry=CollectorRegistry(), request_timeout_ms=2000
    )
    await sink.start()
    for i in range(1, 11):
        sink.emit(make_record("pg-1", i, kind_for(i)))
    assert await sink.flush(30)
    kafka_broker.pause()
    try:
        for i in range(11, 61):
            sink.emit(make_record("pg-1", i, kind_for(i)))
        t0 = time.monotonic()
        await sink.close(timeout=1.0)  # the agent stops while the broker hangs
        assert time.monotonic() - t0 < 15
        assert sink.pending == 50 or sink.spool.closed
    finally:
        kafka_broker.resume()
    # a new agent process: a new sink on the same spool directory sends what was left
    sink2 = KafkaSink(bs, kafka_topic, "pg-1", spool, registry=CollectorRegistry())
    assert sink2.pending == 50
    await sink2.start()
    try:
        sink2.emit(make_record("pg-1", 61, "transition"))
        assert await sink2.flush(60)
    finally:
        await sink2.close()
    records, _ = await read_topic(bs, kafka_topic, timeout=30)
    # in order and complete; a batch the old sink had in flight may appear twice in the topic
    # (the documented crash duplicate), and read_topic drops it by (node, seq)
    assert [r.seq for r in records] == list(range(1, 62))


async def test_topic_created_with_partitions_and_retention(
    kafka_broker: KafkaBroker, kafka_topic: str
) -> None:
    bs = kafka_broker.bootstrap
    assert await ensure_topic(bs, kafka_topic, partitions=4, retention_ms=3_600_000)
    assert not await ensure_topic(bs, kafka_topic, partitions=4)  # already there: left alone
    admin = AIOKafkaAdminClient(bootstrap_servers=bs)
    await admin.start()
    try:
        (desc,) = await admin.describe_topics([kafka_topic])
        assert len(desc["partitions"]) == 4
        (resp,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, kafka_topic)]
        )
        configs = {c[0]: c[1] for c in resp.resources[0][4]}
        assert configs["retention.ms"] == "3600000"
    finally:
        await admin.close()


async def test_read_topic_filters_by_node_and_time(
    kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path
) -> None:
    bs = kafka_broker.bootstrap
    sinks = {
        n: KafkaSink(bs, kafka_topic, n, tmp_path / n, registry=CollectorRegistry())
        for n in ("a", "b")
    }
    for s in sinks.values():
        await s.start()
    try:
        for i in range(1, 6):
            for n, s in sinks.items():
                s.emit(make_record(n, i, "transition"))
        for s in sinks.values():
            assert await s.flush(30)
        cut = time.time()
        await asyncio.sleep(0.05)
        for n, s in sinks.items():
            s.emit(make_record(n, 6, "transition"))
            assert await s.flush(30)
    finally:
        for s in sinks.values():
            await s.close()
    only_a, _ = await read_topic(bs, kafka_topic, node="a", timeout=30)
    assert [(r.node, r.seq) for r in only_a] == [("a", i) for i in range(1, 7)]
    recent, _ = await read_topic(bs, kafka_topic, since=cut, timeout=30)
    assert sorted((r.node, r.seq) for r in recent) == [("a", 6), ("b", 6)]
    with pytest.raises(LookupError):
        await read_topic(bs, "pgsidecar.no-such-cluster.events", timeout=10)
