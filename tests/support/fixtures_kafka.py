"""Apache Kafka fixtures: one real KRaft broker for the test session (pgsidecar/lab/kafka_broker.py).

Registered as a pytest plugin (``tests.support.fixtures_kafka`` in conftest's ``pytest_plugins``).
The jars are fetched with Maven on first use (about 25 s and 46 MB on a fresh machine, then
cached in .cache/kafka). Without Java the Kafka tests are skipped with the reason; a failing
fetch or start is an error, not a skip.

Every test that uses the broker is marked ``integration`` and ``kafka`` at collection (it starts
a real broker process), so ``-m "not integration"`` never starts Kafka.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from pgsidecar.lab import tlsgen
from pgsidecar.lab.kafka_broker import BrokerTls, KafkaBroker, fetch, java_available
from pgsidecar.procutil import free_port_range

_topics = itertools.count(1)
# fixtures that start a real broker (tests/conftest.py keeps them out of tests/unit)
KAFKA_FIXTURES = frozenset({"kafka_session_broker", "kafka_secure_broker"})
# the SCRAM user of the secure broker
SCRAM_USER = "agent"
SCRAM_PASSWORD = "scram-Pa55-w0rd-x"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if KAFKA_FIXTURES & set(getattr(item, "fixturenames", ())):
            for name in ("integration", "kafka"):
                if item.get_closest_marker(name) is None:
                    item.add_marker(getattr(pytest.mark, name))


@pytest.fixture(scope="session")
def kafka_session_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    if not java_available():
        pytest.skip(
            "Java is not installed: the Kafka tests need a Java 17 runtime (openjdk-17-jre-headless)"
        )
    fetch()
    port = free_port_range(2)
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka"), port, port + 1)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop(timeout=20)


@pytest.fixture(scope="session")
def kafka_secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A second broker whose clients' listener is SASL_SSL (SCRAM-SHA-512 user ``SCRAM_USER``),
    its certificate from a CA in ``broker.tls.ca_cert`` (pgsidecar.lab.tlsgen)."""
    if not java_available():
        pytest.skip(
            "Java is not installed: the Kafka tests need a Java 17 runtime (openjdk-17-jre-headless)"
        )
    fetch()
    material = tlsgen.generate(tmp_path_factory.mktemp("kafka-tls"), ["kafka"])
    issued = material.member("kafka")
    tls = BrokerTls(
        cert=issued.cert,
        key=issued.key,
        ca_cert=material.ca_cert,
        protocol="SASL_SSL",
        scram_users=((SCRAM_USER, SCRAM_PASSWORD),),
    )
    port = free_port_range(3)
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka-secure"), port, port + 1, tls=tls)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop(timeout=20)


@pytest.fixture
def kafka_broker(kafka_session_broker: KafkaBroker) -> Iterator[KafkaBroker]:
    """The session's broker, running and not paused when the test starts and again after it:
    a test may pause, kill or restart it."""
    b = kafka_session_broker
    b.resume()
    if not b.running:
        b.start()
    yield b
    b.resume()
    if not b.running:
        b.start()


@pytest.fixture
def kafka_topic() -> str:
    """A fresh topic name per test (created by the code under test, or by the test)."""
    return f"pgsidecar.test{next(_topics)}.events"
