"""An Apache Kafka broker (KRaft mode, combined broker and controller, loopback only) for tests,
benchmarks and ``pgsidecar local``: the Python twin of ``scripts/kafka.sh``, with the same cache
layout and the same files in the broker's directory. Alone it is a one-node cluster; several
brokers given the same ``voters`` and ``cluster_id`` form one cluster (``local up
--kafka-brokers 3``).

The jars are Apache Kafka's own Maven Central artifacts (``kafka_2.13`` and its runtime
dependencies), fetched once with Maven into ``$PGSIDECAR_KAFKA_HOME/libs`` (default
``<repo>/.cache/kafka/libs``). The broker process is our child: we hold its Popen, reap it, and
stop it by pid; it runs in its own session so that SIGSTOP/SIGKILL reach it and nothing else.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pgsidecar.procutil import pid_alive, read_pid, stop_child, terminate

KAFKA_VERSION = os.environ.get("PGSIDECAR_KAFKA_VERSION", "3.9.2")
# kafka_2.13 depends on slf4j-api only; the distribution's binding is slf4j-reload4j.
SLF4J_VERSION = "1.7.36"
REPO = Path(__file__).resolve().parents[2]


class KafkaBrokerError(RuntimeError):
    """The broker could not be fetched, formatted or started; the message says why."""


def kafka_home() -> Path:
    return Path(os.environ.get("PGSIDECAR_KAFKA_HOME") or REPO / ".cache" / "kafka")


def java_available() -> bool:
    """True if a ``java`` is on PATH (Kafka 3.9's broker wants Java 11+; this machine has 17)."""
    return shutil.which("java") is not None


def fetched(home: Path | None = None) -> bool:
    stamp = (home or kafka_home()) / "libs" / ".complete"
    try:
        return stamp.read_text().strip() == KAFKA_VERSION
    except OSError:
        return False


_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>pgsidecar</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-reload4j</artifactId>
      <version>{slf4j}</version>
    </dependency>
  </dependencies>
</project>
"""


def fetch(home: Path | None = None, timeout: float = 900.0) -> Path:
    """Download the broker's jars with Maven unless present; returns the libs dir. Safe to call
    from several processes at once (a lock file serialises them)."""
    home = home or kafka_home()
    libs = home / "libs"
    if fetched(home):
        return libs
    if shutil.which("mvn") is None:
        raise KafkaBrokerError("mvn not found: apt-get install maven (and a Java 17 runtime)")
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        deadline = time.monotonic() + timeout
        # flock with a bound: a stuck fetch elsewhere must not hang us forever
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise KafkaBrokerError(
                        f"timed out waiting for another fetch ({home}/.lock)"
                    ) from None
                time.sleep(0.5)
        if fetched(home):
            return libs
        work = home / f"fetch-{KAFKA_VERSION}"
        staging = home / "libs.new"
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        work.mkdir(parents=True)
        (work / "pom.xml").write_text(_POM.format(kafka=KAFKA_VERSION, slf4j=SLF4J_VERSION))
        cmd = [
            "mvn",
            "-q",
            "-B",
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={staging}",
        ]
        try:
            proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise KafkaBrokerError(f"Maven fetch of kafka_2.13 {KAFKA_VERSION} timed out") from None
        if proc.returncode != 0 or not list(staging.glob("kafka_2.13-*.jar")):
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            raise KafkaBrokerError(
                f"Maven could not fetch kafka_2.13 {KAFKA_VERSION}:\n" + "\n".join(tail)
            )
        # rename at the end so that a half-done fetch never looks done
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        (libs / ".complete").write_text(KAFKA_VERSION + "\n")
        shutil.rmtree(work, ignore_errors=True)
    return libs


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect((host, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class BrokerTls:
    """A TLS client listener: the broker's certificate and key (PEM, the key unencrypted PKCS#8,
    as ``pgsidecar.lab.tlsgen`` writes them), the CA clients verify it with, and the SCRAM users
    (name -> password) created when the storage is formatted. ``protocol`` SASL_SSL asks every
    client for a SCRAM-SHA-512 login over TLS; SSL is TLS alone."""

    cert: Path
    key: Path
    ca_cert: Path
    protocol: Literal["SSL", "SASL_SSL"] = "SASL_SSL"
    scram_users: tuple[tuple[str, str], ...] = ()


def new_cluster_id() -> str:
    """16 random bytes, base64url without padding: the form of Kafka's random-uuid. As Kafka's own
    Uuid.randomUuid(), never one starting with "-" (it would read as an option)."""
    cluster_id = "-"
    while cluster_id.startswith("-"):
        cluster_id = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
    return cluster_id


def server_properties(
    directory: Path,
    port: int,
    controller_port: int,
    tls: BrokerTls | None = None,
    internal_port: int | None = None,
    *,
    node_id: int = 1,
    voters: str | None = None,
    replication: int = 1,
) -> str:
    """The broker's configuration. With ``tls`` the clients' listener on ``port`` speaks TLS
    (and SCRAM); the broker's own traffic to itself stays on a loopback PLAINTEXT listener on
    ``internal_port``, which only processes of this host reach.

    ``voters`` (``id@host:port,...``, default this node alone) is the controller quorum;
    ``replication`` the replication factor of new topics and of Kafka's internal ones. With 3 or
    more replicas a write needs 2 in sync (``min.insync.replicas``): with acks=all an
    acknowledged record survives the loss of any one broker."""
    voters = voters or f"{node_id}@127.0.0.1:{controller_port}"
    min_isr = 2 if replication >= 3 else 1
    if tls is None:
        listeners = f"""listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
"""
    else:
        name = tls.protocol
        internal = internal_port if internal_port is not None else controller_port + 1
        listeners = f"""listeners={name}://127.0.0.1:{port},PLAINTEXT://127.0.0.1:{internal},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners={name}://127.0.0.1:{port},PLAINTEXT://127.0.0.1:{internal}
listener.security.protocol.map={name}:{name},PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
ssl.keystore.type=PEM
ssl.keystore.location={directory}/broker-keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location={tls.ca_cert}
ssl.client.auth=none
"""
        if name == "SASL_SSL":
            listeners += """sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
"""
    return f"""# written by pgsidecar (pgsidecar/lab/kafka_broker.py): KRaft on loopback
process.roles=broker,controller
node.id={node_id}
controller.quorum.voters={voters}
{listeners}controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs={directory}/data
num.partitions=1
default.replication.factor={replication}
min.insync.replicas={min_isr}
offsets.topic.replication.factor={replication}
offsets.topic.num.partitions=1
transaction.state.log.replication.factor={replication}
transaction.state.log.min.isr={min_isr}
transaction.state.log.num.partitions=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
# A killed broker must come back fast in the outage tests: its restart is refused
# (DUPLICATE_BROKER_REGISTRATION) until the old incarnation's session lapses, 9 s by default.
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=500
num.recovery.threads.per.data.dir=1
log.flush.interval.messages=9223372036854775807
"""


def log4j_properties(directory: Path) -> str:
    return f"""log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File={directory}/server.log
log4j.appender.file.MaxFileSize=20MB
log4j.appender.file.MaxBackupIndex=1
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
"""


class KafkaBroker:
    """One broker whose files live in ``directory``: server.properties, data/, server.log,
    kafka.out, kafka.pid. ``start`` formats the storage on first use only, so a stopped or killed
    broker restarts on the same data."""

    def __init__(
        self,
        directory: Path | str,
        port: int,
        controller_port: int | None = None,
        *,
        home: Path | None = None,
        heap: str = "384m",
        tls: BrokerTls | None = None,
        internal_port: int | None = None,
        node_id: int = 1,
        voters: str | None = None,
        replication: int = 1,
        cluster_id: str | None = None,
    ) -> None:
        """``node_id``, ``voters``, ``replication``: see ``server_properties``. ``cluster_id``:
        the id the storage is formatted with, the same for every broker of one cluster (default:
        a new one, for a broker alone)."""
        self.directory = Path(directory).resolve()
        self.port = port
        self.controller_port = controller_port if controller_port is not None else port + 1
        # with TLS: the broker's own PLAINTEXT listener on loopback (default controller_port + 1)
        self.tls = tls
        self.internal_port = (
            internal_port if internal_port is not None else self.controller_port + 1
        )
        self.home = home or kafka_home()
        self.heap = heap
        self.node_id = node_id
        self.voters = voters
        self.replication = replication
        self.cluster_id = cluster_id
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        if self._proc is not None:
            return self._proc.pid
        return read_pid(self.directory / "kafka.pid")

    @property
    def running(self) -> bool:
        pid = self.pid
        if pid is None:
            return False
        if self._proc is not None:
            return self._proc.poll() is None and pid_alive(pid)
        return pid_alive(pid)

    @staticmethod
    def java_available() -> bool:
        return java_available()

    def fetch(self, timeout: float = 900.0) -> Path:
        return fetch(self.home, timeout)

    def _java(self) -> list[str]:
        return [
            "java",
            "-Xms64m",
            f"-Xmx{self.heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.directory}/log4j.properties",
            f"-Dkafka.logs.dir={self.directory}",
            "-cp",
            f"{self.home / 'libs'}/*",
        ]

    def start(self, timeout: float = 90.0) -> None:
        """Start the broker and return once it serves (``launch`` then ``wait_serving``)."""
        self.launch()
        self.wait_serving(timeout)

    def launch(self) -> None:
        """Format the storage on first use and start the broker's process, without waiting for it
        to serve: a broker of a larger cluster serves only once a quorum of the controllers runs,
        so a cluster's brokers are all launched before any is waited for."""
        if not java_available():
            raise KafkaBrokerError("java not found: apt-get install openjdk-17-jre-headless")
        if self.running:
            raise KafkaBrokerError(f"a broker already runs for {self.directory} (pid {self.pid})")
        self.fetch()
        self.directory.mkdir(parents=True, exist_ok=True)
        props = self.directory / "server.properties"
        props.write_text(
            server_properties(
                self.directory,
                self.port,
                self.controller_port,
                self.tls,
                self.internal_port,
                node_id=self.node_id,
                voters=self.voters,
                replication=self.replication,
            )
        )
        if self.tls is not None:
            # Kafka's PEM key store: the private key, then the certificate chain, in one file
            keystore = self.directory / "broker-keystore.pem"
            fd = os.open(keystore, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(self.tls.key.read_bytes() + self.tls.cert.read_bytes())
        (self.directory / "log4j.properties").write_text(log4j_properties(self.directory))
        if not (self.directory / "data" / "meta.properties").exists():
            cluster_id = self.cluster_id or new_cluster_id()
            cmd = [*self._java(), "kafka.tools.StorageTool", "format", "-t", cluster_id]
            cmd += ["-c", str(props), "--ignore-formatted"]
            for user, password in self.tls.scram_users if self.tls is not None else ():
                # KIP-900: SCRAM credentials written into the metadata log at format time
                cmd += ["--add-scram", f"SCRAM-SHA-512=[name={user},password={password}]"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            except subprocess.TimeoutExpired:
                raise KafkaBrokerError("kafka storage format timed out") from None
            if proc.returncode != 0:
                output = proc.stdout + proc.stderr
                for _, password in self.tls.scram_users if self.tls is not None else ():
                    output = output.replace(password, "***")
                raise KafkaBrokerError(f"kafka storage format failed: {output}")
        out = open(self.directory / "kafka.out", "ab")  # noqa: SIM115 - handed to the child
        try:
            self._proc = subprocess.Popen(
                [*self._java(), "kafka.Kafka", str(props)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # in its own directory: a harness that finds a cluster's processes by their
                # working directory (the fault suite) finds the broker too
                cwd=self.directory,
            )
        finally:
            out.close()
        self._paused = False
        (self.directory / "kafka.pid").write_text(f"{self._proc.pid}\n")

    def wait_serving(self, timeout: float = 90.0) -> None:
        """Until the broker's client port answers; kills it and raises if it exits or does not
        answer within ``timeout``."""
        assert self._proc is not None, "wait_serving() after launch()"
        deadline = time.monotonic() + timeout
        # The broker opens its listener last, after the controller has unfenced it: a port that
        # answers is a broker that serves.
        while not _port_open(self.port):
            if self._proc.poll() is not None:
                raise KafkaBrokerError(
                    f"broker exited with {self._proc.returncode} during start; "
                    f"last lines of {self.directory}/server.log:\n{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise KafkaBrokerError(
                    f"broker did not answer on {self.bootstrap} within {timeout:.0f}s:\n{self._log_tail()}"
                )
            time.sleep(0.1)

    def _log_tail(self, lines: int = 15) -> str:
        text = ""
        for name in ("kafka.out", "server.log"):
            with contextlib.suppress(OSError):
                text += (self.directory / name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _signal(self, sig: int) -> None:
        pid = self.pid
        if pid is not None and self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def pause(self) -> None:
        """SIGSTOP: the broker keeps its sockets open but answers nothing (a hung broker)."""
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self._paused = False

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a controlled shutdown), SIGKILL after ``timeout``; reaps the process."""
        self._terminate(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: the broker dies without a clean shutdown (its logs are recovered on start)."""
        self._terminate(signal.SIGKILL, 10.0)

    def _terminate(self, sig: int, timeout: float) -> None:
        pid = self.pid
        if pid is None:
            return
        if self._paused:
            # a stopped process does not run its SIGTERM handler until continued
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            self._paused = False
        if self._proc is not None:
            stop_child(self._proc, sig, timeout)
            self._proc = None
        else:
            # started by another process (scripts/kafka.sh or an earlier run): by pid file
            terminate(pid, sig, timeout=timeout)
        with contextlib.suppress(FileNotFoundError):
            (self.directory / "kafka.pid").unlink()

    def __enter__(self) -> KafkaBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
