"""The audit stream in Kafka: the sink that publishes a node's records, the consumer that feeds
peers' records to the machine, and the reader behind ``pgsidecar history``.

Kafka is the record and the fast path, never the authority (ARCHITECTURE.md, "The record stream"):

- ``KafkaSink.emit`` never blocks and never raises for a broker problem: it appends the record to
  the on-disk spool (events/spool.py) and wakes the sender task. The sender publishes spooled
  records in order, one produce batch at a time, with an idempotent producer (acks=all), and
  acknowledges them in the spool only once the broker has acknowledged them. With the broker
  away the records wait in the spool, across agent restarts, and go out in order when it returns.
- One batch in flight at a time, always for the node's one partition (key = node name): the
  idempotent producer retries that batch with the same sequence numbers until the broker takes
  it, so there is neither reordering nor a duplicate from a retry. A duplicate is still possible
  after the agent dies between the broker's acknowledgement and the spool's; consumers drop it
  by (node, seq).
- ``KafkaPeerConsumer`` reads the cluster's topic from its end, decodes and de-duplicates, and
  hands other nodes' records to a callback. What it delivers is advisory only.
- ``read_topic`` reads a topic from the start (or from a time) up to its current end, for
  history and replay.
"""

# Timeouts are parameters of the API (the brief's read_topic(..., timeout)); each is enforced
# inside with asyncio.wait_for or a deadline, so ASYNC109 does not apply here.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import inspect
import json
import logging
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from events.recordauth import RecordAuthError, RecordKeys
from events.recordauth import from_settings as record_keys_from_settings
from events.settings import KafkaSettings
from events.sinks import Sink, merge_by_time
from events.spool import KINDS, Spool, SpoolError, fsync_and_close
from events.tasks import bounded
from events.tlsclient import client_context, tls_reason
from fsm import bounded_json
from fsm.records import Record

log = logging.getLogger(__name__)

# A record larger than this can never be produced (the broker's default message.max.bytes is
# 1 MiB): it is dropped and counted at emit rather than left to block the spool forever.
MAX_RECORD_BYTES = 900 * 1024


def default_topic(cluster: str) -> str:
    return f"pgsidecar.{cluster}.events"


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(Record))


def encode(record: Record) -> bytes:
    """The value written to Kafka (and to the spool): compact JSON of ``record.to_dict()``.
    Built from the fields directly: ``asdict`` deep-copies the body, which was two thirds of the
    cost of ``emit``."""
    data = {name: getattr(record, name) for name in _RECORD_FIELDS}
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


def decode(value: bytes | None) -> Record:
    """Strict decode of a Kafka value; raises ValueError naming what is wrong."""
    if value is None:
        raise ValueError("empty value (tombstone)")
    return Record.from_dict(bounded_json.loads(value))


def client_security(settings: KafkaSettings) -> dict[str, Any]:
    """aiokafka's keyword arguments for ``settings``' security protocol: TLS with the brokers'
    CA (and a client certificate when given), and a SCRAM login for SASL_SSL. Empty for
    PLAINTEXT. A file that cannot be read is a ConfigError naming the setting."""
    if settings.security_protocol == "PLAINTEXT":
        return {}
    context = client_context(
        settings.ssl_ca_file,
        settings.ssl_cert_file,
        settings.ssl_key_file,
        ca_setting="kafka.ssl_ca_file",
        cert_setting="kafka.ssl_cert_file",
        key_setting="kafka.ssl_key_file",
    )
    out: dict[str, Any] = {"security_protocol": settings.security_protocol, "ssl_context": context}
    if settings.security_protocol == "SASL_SSL":
        out["sasl_mechanism"] = settings.sasl_mechanism
        out["sasl_plain_username"] = settings.sasl_username
        out["sasl_plain_password"] = settings.resolve_sasl_password()
    return out


def record_keys(settings: KafkaSettings) -> RecordKeys | None:
    """The cluster's record keys from ``settings`` (None: records are neither signed nor
    verified)."""
    return record_keys_from_settings(settings.record_key_file, settings.record_verify_key_files)


async def explain_connect_failure(
    bootstrap: str | Iterable[str], security: dict[str, Any], timeout: float = 5.0
) -> str | None:
    """Why a TLS/SASL client could not bootstrap, naming the setting to fix; None when a
    connection to the first broker works or fails for another reason. aiokafka only logs the
    cause and raises "Unable to bootstrap", which hides a wrong password or an untrusted
    certificate behind what looks like an outage."""
    if not security:
        return None
    from aiokafka.conn import create_conn
    from aiokafka.errors import SaslAuthenticationFailed

    host, _, port = _servers(bootstrap)[0].rpartition(":")
    try:
        conn = await asyncio.wait_for(
            create_conn(host, int(port), request_timeout_ms=int(timeout * 1000), **security),
            timeout,
        )
    except SaslAuthenticationFailed:
        return (
            f"Kafka refused the SASL login of kafka.sasl_username "
            f"{security.get('sasl_plain_username')!r} ({security.get('sasl_mechanism')}): "
            f"authentication failed; check kafka.sasl_password(_file) and the user's SCRAM "
            f"credentials on the brokers"
        )
    except ssl.SSLCertVerificationError as exc:
        return (
            f"TLS: the broker's certificate is not trusted ({exc.verify_message}); set "
            f"kafka.ssl_ca_file to the CA that signed it, and check that it names the host"
        )
    except ssl.SSLError as exc:
        return (
            f"TLS handshake with the broker failed ({tls_reason(exc)}); check kafka.ssl_ca_file, "
            f"kafka.ssl_cert_file and kafka.ssl_key_file"
        )
    except (OSError, KafkaError, TimeoutError):
        return None
    conn.close()
    return None


# the beginnings of explain_connect_failure's answers
_CONFIG_PROBLEMS = ("Kafka refused", "TLS")


def _servers(bootstrap: str | Iterable[str]) -> list[str]:
    if isinstance(bootstrap, str):
        return [s.strip() for s in bootstrap.split(",") if s.strip()]
    return list(bootstrap)


# ------------------------------------------------------------------------------------ metrics


@dataclass(frozen=True)
class KafkaMetrics:
    sent: Counter
    spooled: Gauge
    spool_bytes: Gauge
    dropped: Counter
    up: Gauge
    skipped: Counter
    duplicates: Counter
    unauthenticated: Counter


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, KafkaMetrics] = weakref.WeakKeyDictionary()


def kafka_metrics(registry: CollectorRegistry | None = None) -> KafkaMetrics:
    """The stream's metrics in ``registry`` (default: prometheus_client's global one), created
    once per registry so that several sinks or consumers in one process share them."""
    registry = REGISTRY if registry is None else registry
    m = _METRICS.get(registry)
    if m is None:
        m = KafkaMetrics(
            sent=Counter(
                "pgsidecar_records_sent",
                "Records the broker acknowledged",
                registry=registry,
            ),
            spooled=Gauge(
                "pgsidecar_records_spooled",
                "Records waiting in the on-disk spool for the broker",
                registry=registry,
            ),
            spool_bytes=Gauge(
                "pgsidecar_spool_bytes",
                "Bytes of the spool's files on disk",
                registry=registry,
            ),
            dropped=Counter(
                "pgsidecar_records_dropped",
                "Records dropped before reaching the broker (spool full, too large, disk error)",
                ["kind"],
                registry=registry,
            ),
            up=Gauge(
                "pgsidecar_kafka_up",
                "1 while the last attempt to publish succeeded, 0 while the broker is unreachable",
                registry=registry,
            ),
            skipped=Counter(
                "pgsidecar_records_skipped",
                "Records read from the topic and skipped as malformed or of an unknown schema",
                registry=registry,
            ),
            duplicates=Counter(
                "pgsidecar_records_duplicate",
                "Records read from the topic and dropped as a duplicate (node, seq)",
                registry=registry,
            ),
            unauthenticated=Counter(
                "pgsidecar_records_unauthenticated",
                "Records read from the topic and dropped: unsigned, or a signature that does not "
                "verify with the cluster's record key",
                ["reason"],
                registry=registry,
            ),
        )
        for kind in KINDS:
            m.dropped.labels(kind=kind)  # export zeros, so alerts need no absent()
        for reason in ("unsigned", "forged"):
            m.unauthenticated.labels(reason=reason)
        _METRICS[registry] = m
    return m


# ------------------------------------------------------------------------------------ topic


async def ensure_topic(
    bootstrap: str | Iterable[str],
    topic: str,
    *,
    partitions: int = 3,
    replication_factor: int = 1,
    retention_ms: int | None = None,
    timeout: float = 10.0,
    security: dict[str, Any] | None = None,
) -> bool:
    """Create ``topic`` unless it exists; True if this call created it. Raises KafkaError or
    TimeoutError if the broker cannot be reached within ``timeout``."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=_servers(bootstrap),
        request_timeout_ms=int(timeout * 1000),
        **(security or {}),
    )
    try:
        await asyncio.wait_for(admin.start(), timeout)
        if topic in await asyncio.wait_for(admin.list_topics(), timeout):
            return False
        configs = {} if retention_ms is None else {"retention.ms": str(retention_ms)}
        try:
            resp = await asyncio.wait_for(
                admin.create_topics(
                    [NewTopic(topic, partitions, replication_factor, topic_configs=configs)]
                ),
                timeout,
            )
        except TopicAlreadyExistsError:
            return False  # another agent of the cluster was first
        for entry in getattr(resp, "topic_errors", []):
            code = entry[1]
            if code == TopicAlreadyExistsError.errno:
                return False
            if code != 0:
                raise KafkaError(f"cannot create topic {topic}: error code {code} {entry[2:]}")
        log.info("created topic %s (%d partitions)", topic, partitions)
        return True
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(admin.close(), timeout)


# ------------------------------------------------------------------------------------ the sink


class KafkaSink(Sink):
    """Publishes one node's records to the cluster's topic through a durable spool.

    ``on_drop`` receives ``{"name": "spool_drop", "dropped": n, "by_kind": {...}}`` whenever the
    full spool dropped records; the agent turns it into an ``action`` record (with its own seq),
    which comes back through ``emit``. It is called from the event loop, never from inside
    ``emit``, so it may emit. Without it the drop is counted in metrics and logged only.
    """

    def __init__(
        self,
        bootstrap_servers: str | Iterable[str],
        topic: str,
        node: str,
        spool_dir: Path | str,
        *,
        spool_max_bytes: int = 64 * 1024 * 1024,
        partitions: int = 3,
        replication_factor: int = 1,
        retention_ms: int | None = 7 * 24 * 3600 * 1000,
        create_topic: bool = True,
        linger_ms: int = 5,
        request_timeout_ms: int = 5000,
        backoff: tuple[float, float] = (0.1, 1.0),
        max_batch_records: int = 2000,
        max_batch_bytes: int = 512 * 1024,
        on_drop: Callable[[dict[str, Any]], None] | None = None,
        registry: CollectorRegistry | None = None,
        spool_fsync: Literal["background", "inline"] = "background",
        security: dict[str, Any] | None = None,
        keys: RecordKeys | None = None,
    ) -> None:
        self.bootstrap = _servers(bootstrap_servers)
        # aiokafka's TLS/SASL arguments (client_security) and the record signing keys
        self.security = dict(security or {})
        self.keys = keys
        self.topic = topic
        self.node = node
        self._key = node.encode()
        # "background": emit never waits for the disk; a worker thread fsyncs the spool a moment
        # later (the journal has already fsync'd the transition). "inline": fsync in emit.
        self.spool = Spool(
            spool_dir,
            spool_max_bytes,
            fsync="deferred" if spool_fsync == "background" else "inline",
        )
        self._sync_wanted = asyncio.Event()
        self._syncer: asyncio.Task[None] | None = None
        self._last_sync_request = 0.0
        self.partitions = partitions
        self.replication_factor = replication_factor
        self.retention_ms = retention_ms
        self.create_topic = create_topic
        self.linger = linger_ms / 1000
        self.request_timeout_ms = request_timeout_ms
        self.backoff_min, self.backoff_max = backoff
        self.max_batch_records = max_batch_records
        self.max_batch_bytes = max_batch_bytes
        self.on_drop = on_drop
        self.metrics = kafka_metrics(registry)
        self.sent = 0
        self.up = False
        self.last_error: str | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._producer: AIOKafkaProducer | None = None
        self._partition: int | None = None
        self._topic_ready = not create_topic
        self._dropped_seen = dict(self.spool.stats.dropped)
        self._drop_notice_scheduled = False
        self._drained = asyncio.Event()
        self._update_gauges()

    @classmethod
    def from_settings(
        cls,
        settings: KafkaSettings,
        cluster: str,
        node: str,
        state_dir: Path,
        **kwargs: Any,
    ) -> KafkaSink:
        """Build from the agent's ``kafka`` settings; the spool lives in
        ``state_dir/kafka-spool``."""
        return cls(
            settings.bootstrap_servers,
            settings.topic or default_topic(cluster),
            node,
            Path(state_dir) / "kafka-spool",
            spool_max_bytes=settings.spool_max_bytes,
            partitions=settings.partitions,
            retention_ms=settings.retention_ms,
            linger_ms=settings.linger_ms,
            replication_factor=settings.replication_factor,
            security=client_security(settings),
            keys=record_keys(settings),
            **kwargs,
        )

    # -------------------------------------------------------------- Sink interface

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"kafka-sink-{self.node}")
        if self._syncer is None and self.spool.fsync_mode == "deferred":
            self._syncer = asyncio.create_task(
                self._sync_loop(), name=f"kafka-spool-sync-{self.node}"
            )
        self._schedule_drop_notice()

    def emit(self, record: Record) -> None:
        try:
            data = encode(record)
        except (TypeError, ValueError) as exc:  # a body that is not JSON: a bug, not an outage
            log.error("record %s/%d cannot be encoded: %s", record.node, record.seq, exc)
            self.metrics.dropped.labels(kind=record.kind).inc()
            return
        if len(data) > MAX_RECORD_BYTES:
            log.error(
                "record %s/%d (%s) is %d bytes, over the %d byte limit: not published",
                record.node,
                record.seq,
                record.kind,
                len(data),
                MAX_RECORD_BYTES,
            )
            self.metrics.dropped.labels(kind=record.kind).inc()
            return
        try:
            self.spool.append(data, record.kind)
        except (OSError, SpoolError) as exc:
            # a full or broken disk (or a closed sink) must not stop the machine; the journal
            # sink still has the record
            log.error(
                "spool append failed, record %s/%d lost to Kafka: %s", record.node, record.seq, exc
            )
            self.metrics.dropped.labels(kind=record.kind).inc()
            return
        self._after_append()
        self._wake.set()
        if self.spool.fsync_mode == "deferred":
            now = time.monotonic()
            # transitions and actions at once, inputs at most every input_fsync_interval
            if (
                record.kind != "input"
                or now - self._last_sync_request >= self.spool.input_fsync_interval
            ):
                self._last_sync_request = now
                self._sync_wanted.set()

    async def close(self, timeout: float = 5.0) -> None:
        """Give the sender up to ``timeout`` seconds to publish what is spooled, then stop.
        What is left stays in the spool for the next start."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except (TimeoutError, asyncio.CancelledError):
                pass
            if not self._task.done():
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(self._task, 5.0)
            self._task = None
        if self._syncer is not None:
            self._syncer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._syncer, 10.0)
            self._syncer = None
        await self._drop_producer()
        self.spool.close()  # fsyncs what is left

    # -------------------------------------------------------------- helpers for callers

    async def flush(self, timeout: float = 30.0) -> bool:
        """Wait until the spool is empty (everything acknowledged); False on timeout."""
        deadline = time.monotonic() + timeout
        while len(self.spool):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                await bounded(self._drained.wait(), min(remaining, 0.5))
        return True

    @property
    def pending(self) -> int:
        return len(self.spool)

    # -------------------------------------------------------------- internals

    def _update_gauges(self) -> None:
        self.metrics.spooled.set(len(self.spool))
        self.metrics.spool_bytes.set(self.spool.stats.disk_bytes)

    def _after_append(self) -> None:
        self._update_gauges()
        dropped = self.spool.stats.dropped
        if dropped != self._dropped_seen:
            for kind, n in dropped.items():
                delta = n - self._dropped_seen.get(kind, 0)
                if delta > 0:
                    self.metrics.dropped.labels(kind=kind).inc(delta)
            self._dropped_seen = dict(dropped)
            self._schedule_drop_notice()

    def _schedule_drop_notice(self) -> None:
        # Deferred to the loop: the callback emits a record, and that must not happen inside
        # the emit that caused the drop. One notice covers every drop until it runs.
        if self._drop_notice_scheduled or self._loop is None:
            return
        self._drop_notice_scheduled = True
        self._loop.call_soon(self._drop_notice)

    def _drop_notice(self) -> None:
        self._drop_notice_scheduled = False
        by_kind = self.spool.take_drops() if not self.spool.closed else {}
        if not by_kind:
            return
        total = sum(by_kind.values())
        log.warning("kafka spool full: dropped %d records %s", total, by_kind)
        if self.on_drop is not None:
            try:
                self.on_drop({"name": "spool_drop", "dropped": total, "by_kind": by_kind})
            except Exception:
                log.exception("on_drop callback failed")

    def _set_up(self, up: bool, error: str | None = None) -> None:
        if not up and error and error != self.last_error and error.startswith(_CONFIG_PROBLEMS):
            # a wrong password or CA is no outage that heals: say it at once, once
            log.error("kafka at %s: %s", ",".join(self.bootstrap), error)
        if up != self.up:
            if up:
                log.info("kafka reachable again at %s", ",".join(self.bootstrap))
            else:
                log.warning("kafka unreachable at %s: %s", ",".join(self.bootstrap), error)
        self.up = up
        self.last_error = error
        self.metrics.up.set(1 if up else 0)

    async def _ensure_producer(self) -> AIOKafkaProducer:
        if not self._topic_ready:
            await ensure_topic(
                self.bootstrap,
                self.topic,
                partitions=self.partitions,
                replication_factor=self.replication_factor,
                retention_ms=self.retention_ms,
                timeout=self.request_timeout_ms / 1000,
                security=self.security,
            )
            self._topic_ready = True
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                client_id=f"pgsidecar-{self.node}",
                acks="all",
                enable_idempotence=True,
                linger_ms=int(self.linger * 1000),
                max_batch_size=self.max_batch_bytes + 64 * 1024,
                request_timeout_ms=self.request_timeout_ms,
                retry_backoff_ms=100,
                metadata_max_age_ms=60_000,
                **self.security,
            )
            try:
                await asyncio.wait_for(producer.start(), self.request_timeout_ms / 1000 + 1)
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.stop(), 2.0)
                raise
            self._producer = producer
            self._partition = None
        if self._partition is None:
            parts = await asyncio.wait_for(
                self._producer.partitions_for(self.topic), self.request_timeout_ms / 1000 + 1
            )
            ordered = sorted(parts)
            # the Java client's partitioner (murmur2 of the key), so every client agrees
            self._partition = DefaultPartitioner()(self._key, ordered, ordered)
        return self._producer

    async def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        self._partition = None
        if producer is None:
            return
        try:
            await asyncio.wait_for(producer.stop(), 3.0)
        except Exception:
            # stop() first waits for queued batches to be delivered, which never happens with
            # the broker away; its sender task would then go on retrying in the background.
            # End it and the connections ourselves (aiokafka has no public abort).
            sender = getattr(producer, "_sender", None)
            with contextlib.suppress(Exception):
                if sender is not None:
                    await asyncio.wait_for(sender.close(), 3.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.client.close(), 3.0)

    async def _sync_loop(self) -> None:
        """fsync the spool off the event loop, shortly after each transition or action (and a
        batch of inputs): the disk's latency never reaches ``emit``."""
        while True:
            with contextlib.suppress(TimeoutError):
                await bounded(self._sync_wanted.wait(), 1.0)
            self._sync_wanted.clear()
            fds = self.spool.dirty_handles()
            if fds:
                await asyncio.to_thread(fsync_and_close, fds)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake for a close."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await bounded(self._wake.wait(), seconds)

    async def _run(self) -> None:
        backoff = self.backoff_min
        idle = True
        while True:
            batch = self.spool.peek(self.max_batch_records, self.max_batch_bytes)
            if not batch:
                self._drained.set()
                if self._closing:
                    return
                if self.spool.fsync_mode == "inline":
                    self.spool.sync()  # inputs appended since the last fsync
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await bounded(self._wake.wait(), 1.0)
                idle = True
                continue
            if idle and self.linger > 0 and not self._closing:
                # bounded linger: let a burst (a transition and its inputs) share one batch
                await asyncio.sleep(self.linger)
                batch = self.spool.peek(self.max_batch_records, self.max_batch_bytes)
            idle = False
            try:
                n = await self._send(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # KafkaError, OSError, TimeoutError: all mean "try again"
                error = f"{type(exc).__name__}: {exc}"
                if "Unable to bootstrap" in str(exc):
                    error = await explain_connect_failure(self.bootstrap, self.security) or error
                self._set_up(False, error)
                if self._closing:
                    return  # what is left stays in the spool
                if (
                    not isinstance(exc, (TimeoutError, KafkaError, OSError))
                    or getattr(exc, "retriable", True) is False
                ):
                    # a producer in an unknown state (fatal error): start a fresh one
                    await self._drop_producer()
                await self._pause(backoff)
                backoff = min(backoff * 2, self.backoff_max)
                continue
            backoff = self.backoff_min
            self.spool.ack(batch[n - 1].id)
            self.sent += n
            self.metrics.sent.inc(n)
            self._update_gauges()
            self._set_up(True)

    async def _send(self, batch: list[Any]) -> int:
        """Publish the head of ``batch`` as one record batch; returns how many records went."""
        producer = await self._ensure_producer()
        builder = producer.create_batch()
        n = 0
        for entry in batch:
            # signed as it leaves: the spool keeps the plain value, so a record spooled before
            # a key was configured (or under the previous key) goes out signed with the current one
            headers = self.keys.headers(entry.data) if self.keys is not None else []
            if (
                builder.append(key=self._key, value=entry.data, timestamp=None, headers=headers)
                is None
            ):
                break  # the batch builder is full; the rest goes next time
            n += 1
        assert self._partition is not None
        timeout = self.request_timeout_ms / 1000
        fut = await asyncio.wait_for(
            producer.send_batch(builder, self.topic, partition=self._partition), timeout + 1
        )
        # The idempotent producer never gives up on a queued batch: it retries it with the same
        # sequence until the broker takes it. Waiting for it (and not queueing a copy) keeps
        # order and avoids duplicates; we only look up now and then to report the outage.
        started = time.monotonic()
        while True:
            done, _ = await asyncio.wait({fut}, timeout=1.0)
            if done:
                fut.result()
                return n
            if time.monotonic() - started > timeout:
                self._set_up(False, "produce request pending (broker unreachable or stalled)")
            if self._closing and time.monotonic() - started > timeout:
                raise TimeoutError("closing while the broker does not answer")


# ------------------------------------------------------------------------------------ consuming


@dataclass(frozen=True)
class Skipped:
    """A record read from the topic that could not be used."""

    where: str  # "partition P offset O" (topic) or "line N" (journal)
    reason: str
    # the record did not verify with the cluster's record key (unsigned or forged)
    unauthenticated: bool = False

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


class _Dedup:
    """Remembers the last ``capacity`` (node, seq) pairs seen."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._seen: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()

    def seen(self, node: str, seq: int) -> bool:
        key = (node, seq)
        if key in self._seen:
            return True
        self._seen[key] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return False


def _check(msg: Any, cluster: str | None, keys: RecordKeys | None = None) -> Record:
    if keys is not None:
        # before decoding: an unauthenticated value is never parsed further
        keys.verify(msg.value or b"", msg.headers)
    rec = decode(msg.value)
    if msg.key is not None and msg.key != rec.node.encode():
        raise ValueError(f"key {msg.key!r} does not match node {rec.node!r}")
    if cluster is not None and rec.cluster != cluster:
        raise ValueError(f"record of cluster {rec.cluster!r}, not {cluster!r}")
    return rec


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    # AIOKafkaConsumer.topics() fetches the cluster's metadata but does not keep it, so its
    # partitions_for_topic() still answers None for a topic never subscribed to: read the
    # partitions from that same fetch.
    cluster = await consumer._client.fetch_all_metadata()
    parts = cluster.partitions_for_topic(topic)
    if not parts:
        raise LookupError(f"topic {topic} does not exist")
    return [TopicPartition(topic, p) for p in sorted(parts)]


RecordCallback = Callable[[Record], Awaitable[None] | None]


class KafkaPeerConsumer:
    """Feeds other nodes' records from the cluster's topic to ``callback``, from the topic's end
    at start (no consumer group: each agent reads every partition itself).

    Malformed or unknown-schema records are skipped with a warning naming partition, offset and
    reason, and counted (``skipped``); duplicates (node, seq) are dropped and counted
    (``duplicates``); the node's own records are ignored. A failing callback is logged, never
    fatal. With the broker away the consumer keeps trying and picks up where it was.
    """

    def __init__(
        self,
        bootstrap_servers: str | Iterable[str],
        topic: str,
        node: str,
        callback: RecordCallback,
        *,
        cluster: str | None = None,
        from_beginning: bool = False,
        request_timeout_ms: int = 5000,
        registry: CollectorRegistry | None = None,
        security: dict[str, Any] | None = None,
        keys: RecordKeys | None = None,
    ) -> None:
        self.bootstrap = _servers(bootstrap_servers)
        self.security = dict(security or {})
        # with keys, records that do not verify are dropped and counted (unauthenticated)
        self.keys = keys
        self.unauthenticated = 0
        self.topic = topic
        self.node = node
        self.cluster = cluster
        self.callback = callback
        self.from_beginning = from_beginning
        self.request_timeout_ms = request_timeout_ms
        self.metrics = kafka_metrics(registry)
        self.skipped: list[Skipped] = []
        self.skipped_count = 0
        self.duplicates = 0
        self.delivered = 0
        self._dedup = _Dedup()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    @classmethod
    def from_settings(
        cls,
        settings: KafkaSettings,
        cluster: str,
        node: str,
        callback: RecordCallback,
        **kwargs: Any,
    ) -> KafkaPeerConsumer:
        """Built from the agent's ``kafka`` settings: its topic, TLS/SASL and record keys."""
        return cls(
            settings.bootstrap_servers,
            settings.topic or default_topic(cluster),
            node,
            callback,
            cluster=cluster,
            security=client_security(settings),
            keys=record_keys(settings),
            **kwargs,
        )

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"kafka-peers-{self.node}")

    async def wait_ready(self, timeout: float = 30.0) -> bool:
        """True once the partitions are assigned and positioned (records produced after this
        are delivered)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)
        return self._ready.is_set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 10.0)
            self._task = None

    async def _run(self) -> None:
        backoff = 0.1
        last_error = ""
        while True:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                client_id=f"pgsidecar-peers-{self.node}",
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest" if self.from_beginning else "latest",
                request_timeout_ms=self.request_timeout_ms,
                fetch_max_wait_ms=100,  # peers' records are a fast path: do not sit on them
                metadata_max_age_ms=30_000,
                **self.security,
            )
            try:
                await asyncio.wait_for(consumer.start(), self.request_timeout_ms / 1000 + 1)
                tps = await asyncio.wait_for(
                    _partitions(consumer, self.topic), self.request_timeout_ms / 1000 + 1
                )
                consumer.assign(tps)
                if self.from_beginning:
                    await consumer.seek_to_beginning(*tps)
                else:
                    await consumer.seek_to_end(*tps)
                for tp in tps:  # resolve the positions now, not at the first fetch
                    await asyncio.wait_for(
                        consumer.position(tp), self.request_timeout_ms / 1000 + 1
                    )
                self._ready.set()
                backoff = 0.1
                last_error = ""
                while True:
                    batches = await consumer.getmany(timeout_ms=1000, max_records=500)
                    for tp, msgs in batches.items():
                        for msg in msgs:
                            await self._handle(tp, msg)
            except asyncio.CancelledError:
                raise
            except (KafkaError, OSError, TimeoutError, LookupError) as exc:
                # the same trouble again (a topic not created yet, a broker still down) is
                # logged once, then quietly retried
                error = str(exc)
                if "Unable to bootstrap" in error:
                    error = await explain_connect_failure(self.bootstrap, self.security) or error
                level = logging.DEBUG if error == last_error else logging.WARNING
                last_error = error
                log.log(
                    level, "peer consumer on %s: %s; retrying in %.1fs", self.topic, error, backoff
                )
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(consumer.stop(), 5.0)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _handle(self, tp: TopicPartition, msg: Any) -> None:
        try:
            rec = _check(msg, self.cluster, self.keys)
        except RecordAuthError as exc:
            # a record someone without the cluster's key wrote: never reaches the machine
            log.warning(
                "dropping unauthenticated record on %s partition %d offset %d: %s",
                self.topic,
                tp.partition,
                msg.offset,
                exc,
            )
            self.unauthenticated += 1
            self.metrics.unauthenticated.labels(reason=exc.reason).inc()
            return
        except ValueError as exc:
            skip = Skipped(f"partition {tp.partition} offset {msg.offset}", str(exc))
            log.warning("skipping record on %s %s", self.topic, skip)
            self.skipped_count += 1
            if len(self.skipped) < 1000:
                self.skipped.append(skip)
            self.metrics.skipped.inc()
            return
        if self._dedup.seen(rec.node, rec.seq):
            self.duplicates += 1
            self.metrics.duplicates.inc()
            return
        if rec.node == self.node:
            return
        self.delivered += 1
        try:
            result = self.callback(rec)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("peer record callback failed for %s/%d", rec.node, rec.seq)


async def read_topic(
    bootstrap: str | Iterable[str],
    topic: str,
    since: float | None = None,
    node: str | None = None,
    timeout: float = 30.0,
    *,
    security: dict[str, Any] | None = None,
    keys: RecordKeys | None = None,
) -> tuple[list[Record], list[Skipped]]:
    """Every record on ``topic`` (up to its end at the time of the call), optionally only those
    of ``node`` and those with ``time >= since`` (epoch seconds); de-duplicated by (node, seq)
    and ordered by ``merge_by_time``. Returns (records, skipped). Raises LookupError if the
    topic does not exist, TimeoutError if the topic cannot be read within ``timeout``. With
    ``keys``, a record that does not verify is not returned: it is among the skipped, marked
    ``unauthenticated``."""
    deadline = time.monotonic() + timeout

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"reading {topic} took longer than {timeout:.0f}s")
        return remaining

    consumer = AIOKafkaConsumer(
        bootstrap_servers=_servers(bootstrap),
        client_id="pgsidecar-history",
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        request_timeout_ms=int(min(timeout, 30.0) * 1000),
        **(security or {}),
    )
    records: list[Record] = []
    skipped: list[Skipped] = []
    dedup = _Dedup(capacity=10_000_000)
    try:
        await asyncio.wait_for(consumer.start(), left())
        tps = await asyncio.wait_for(_partitions(consumer, topic), left())
        consumer.assign(tps)
        end = await asyncio.wait_for(consumer.end_offsets(tps), left())
        if since is None:
            await consumer.seek_to_beginning(*tps)
        else:
            # Kafka timestamps are send times, never earlier than the record's own time on the
            # same clock; a minute of margin covers clocks of different hosts.
            stamp = int((since - 60) * 1000)
            found = await asyncio.wait_for(
                consumer.offsets_for_times(dict.fromkeys(tps, stamp)), left()
            )
            for tp in tps:
                ot = found.get(tp)
                consumer.seek(tp, ot.offset if ot is not None else end[tp])
        remaining = set()
        for tp in tps:
            if await asyncio.wait_for(consumer.position(tp), left()) < end[tp]:
                remaining.add(tp)
        while remaining:
            batches = await consumer.getmany(
                *remaining, timeout_ms=int(min(left(), 1.0) * 1000), max_records=5000
            )
            for tp, msgs in batches.items():
                for msg in msgs:
                    if msg.offset >= end[tp]:
                        continue
                    try:
                        rec = _check(msg, None, keys)
                    except RecordAuthError as exc:
                        skipped.append(
                            Skipped(
                                f"partition {tp.partition} offset {msg.offset}",
                                f"unauthenticated, {exc}",
                                unauthenticated=True,
                            )
                        )
                        continue
                    except ValueError as exc:
                        skipped.append(
                            Skipped(f"partition {tp.partition} offset {msg.offset}", str(exc))
                        )
                        continue
                    if dedup.seen(rec.node, rec.seq):
                        continue
                    if node is not None and rec.node != node:
                        continue
                    if since is not None and rec.time < since:
                        continue
                    records.append(rec)
            for tp in list(remaining):
                if await asyncio.wait_for(consumer.position(tp), left()) >= end[tp]:
                    remaining.discard(tp)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(consumer.stop(), 5.0)
    for s in skipped:
        log.warning("skipped record on %s %s", topic, s)
    return merge_by_time(records), skipped


def journal_skipped(skipped: Iterable[tuple[int, str]]) -> list[Skipped]:
    """``read_journal``'s (line, reason) pairs in the form ``read_topic`` returns."""
    return [Skipped(f"line {line}", reason) for line, reason in skipped]


# ------------------------------------------------------------------------------------ benchmark


async def benchmark(
    bootstrap: str,
    spool_dir: Path,
    *,
    records: int = 20_000,
    outage: Callable[[], Awaitable[None]] | None = None,
    restore: Callable[[], Awaitable[None]] | None = None,
    outage_records: int = 10_000,
    outage_seconds: float = 10.0,
    topic: str = "pgsidecar.bench.events",
) -> dict[str, Any]:
    """Figures for the README: records/s a sink publishes (emit as fast as the loop allows, time
    until the broker acknowledged all), what ``emit`` costs the caller (the latency publishing
    adds to a transition), and, with ``outage``/``restore``, the spool's recovery: emit
    ``outage_records`` spread over an outage of ``outage_seconds``, then time from the broker's
    return (``restore`` returned) until the spool is empty."""
    registry = CollectorRegistry()
    sink = KafkaSink(bootstrap, topic, "bench-1", spool_dir, registry=registry, partitions=1)
    await sink.start()
    result: dict[str, Any] = {}
    seq = 0

    def make(i: int) -> Record:
        nonlocal seq
        seq += 1
        if i % 10 == 0:
            body: dict[str, Any] = {
                "from": "replica",
                "to": "candidate",
                "trigger": "leader_gone",
                "reason": "the leader key expired at term 41",
                "timeline": 3,
                "lsn": 50_331_744 + seq,
            }
            return Record("transition", "bench", "bench-1", seq, time.time(), 41, body)
        body = {"type": "pg", "data": {"lsn": 50_331_744 + seq, "timeline": 3, "running": True}}
        return Record("input", "bench", "bench-1", seq, time.time(), 41, body)

    def pct(xs: list[float], p: float) -> float:
        xs = sorted(xs)
        return round(xs[min(len(xs) - 1, int(p * len(xs)))] * 1e6, 1)

    try:
        # warm up: topic creation, producer id, the broker's JIT
        for i in range(1, 501):
            sink.emit(make(i))
        if not await sink.flush(60):
            raise TimeoutError("warm-up records not acknowledged within 60 s")
        lat_in: list[float] = []
        lat_tr: list[float] = []
        t0 = time.perf_counter()
        for i in range(records):
            rec = make(i)
            s = time.perf_counter()
            sink.emit(rec)
            (lat_tr if rec.kind == "transition" else lat_in).append(time.perf_counter() - s)
            if i % 100 == 0:
                await asyncio.sleep(0)  # an agent yields between inputs; so the sender runs
        t_emitted = time.perf_counter() - t0
        if not await sink.flush(120):
            raise TimeoutError("benchmark records not acknowledged within 120 s")
        elapsed = time.perf_counter() - t0
        result["publish"] = {
            "records": records,
            "transitions_share": 0.1,
            "seconds": round(elapsed, 3),
            "records_per_s": round(records / elapsed),
            "emit_seconds": round(t_emitted, 3),
            "emit_us_input_p50": pct(lat_in, 0.5),
            "emit_us_input_p99": pct(lat_in, 0.99),
            "emit_us_transition_p50": pct(lat_tr, 0.5),
            "emit_us_transition_p99": pct(lat_tr, 0.99),
            "emit_us_max": round(max(lat_in + lat_tr) * 1e6, 1),
        }
        if outage is not None and restore is not None:
            await outage()
            t_out = time.perf_counter()
            worst = 0.0
            for i in range(outage_records):
                rec = make(i)
                s = time.perf_counter()
                sink.emit(rec)
                worst = max(worst, time.perf_counter() - s)
                # spread the records over the outage, as an agent would produce them
                due = t_out + outage_seconds * (i + 1) / outage_records
                if due > time.perf_counter():
                    await asyncio.sleep(due - time.perf_counter())
            queued = sink.pending
            spool_bytes = sink.spool.stats.disk_bytes
            t_restore = time.perf_counter()
            await restore()
            t_back = time.perf_counter()
            if not await sink.flush(180):
                raise TimeoutError("spool not drained within 180 s after the broker returned")
            t_done = time.perf_counter()
            result["recovery"] = {
                "outage_seconds": round(t_back - t_out, 2),
                "records_queued": queued,
                "spool_bytes": spool_bytes,
                "emit_us_max_during_outage": round(worst * 1e6, 1),
                "broker_restart_seconds": round(t_back - t_restore, 2),
                "drain_seconds_after_broker_back": round(t_done - t_back, 3),
            }
    finally:
        await sink.close()
    return result
