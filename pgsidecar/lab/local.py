"""A local cluster on loopback: etcd (one member, or a cluster of 3 or 5), optionally Kafka (one
broker, or several), and N members (PostgreSQL + its agent) under one dir.

Layout of DIR:

    cluster.json          what `local up` made: cluster name, members, ports, DCS
    secrets/              generated passwords and the API token (0600)
    pgpass                a libpq password file for the operator (status DSNs name it)
    etcd/                 etcd's data, etcd.log, etcd.pid (one member); with --dcs-members 3:
                          etcd/etcd1/, etcd/etcd2/, ... each with its data, log and pid
    kafka/                the broker's files (kafka_broker.py); with --kafka-brokers 3:
                          kafka/broker1/, kafka/broker2/, ...
    <name>/               one member: agent.yaml, agent.log, agent.pid, pgdata/, journal.jsonl ...

Used by the CLI (`pgsidecar local up|down|status|start|stop`), by the tests and by the
benchmark. Run as root, PostgreSQL runs as an unprivileged OS user (``postgres`` by default).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import secrets
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from events import netloc
from events.dcs import DCS, ClusterView
from pgsidecar.config import DEFAULT_TTL
from pgsidecar.procutil import (
    free_port_range,
    os_user_ids,
    pid_alive,
    read_pid,
    terminate,
    traversable_by,
)

if TYPE_CHECKING:
    from pgsidecar.backup.settings import RecoveryTargetSettings

DEFAULT_PG_BIN = Path("/usr/lib/postgresql/15/bin")

T = TypeVar("T")


class LocalClusterError(Exception):
    pass


def etcd_argv(
    name: str, data_dir: Path, listen_client: str, advertise_client: str, peer: str, initial: str
) -> list[str]:
    """The command line of a local cluster's etcd member: a new cluster of the members in
    ``initial`` ("name=peer URL,..."), with raft timings for one machine (heartbeat 100 ms,
    election 1 s)."""
    return [
        _which("etcd", "install etcd-server"),
        "--name",
        name,
        "--data-dir",
        str(data_dir),
        "--listen-client-urls",
        listen_client,
        "--advertise-client-urls",
        advertise_client,
        "--listen-peer-urls",
        peer,
        "--initial-advertise-peer-urls",
        peer,
        "--initial-cluster",
        initial,
        "--initial-cluster-state",
        "new",
        "--heartbeat-interval",
        "100",
        "--election-timeout",
        "1000",
    ]


def set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted ``key`` ("settings.synchronous_mode": the ``extra`` of ``create``) in a
    member's config, making the sections on the way."""
    node = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


# sizes of an etcd cluster `local up` makes: a raft quorum that survives 1 (or 2) failures
DCS_MEMBER_COUNTS = (1, 3, 5)


@dataclass
class EtcdMemberInfo:
    """One member of the cluster's own etcd."""

    name: str
    client_port: int
    peer_port: int
    dir: Path

    @property
    def pidfile(self) -> Path:
        return self.dir / "etcd.pid"


@dataclass
class KafkaBrokerInfo:
    """One broker of the cluster's own Kafka."""

    node_id: int
    port: int
    controller_port: int
    internal_port: int
    dir: Path


@dataclass
class MemberInfo:
    name: str
    pg_port: int
    api_port: int
    dir: Path
    tls: bool = False
    host: str = "127.0.0.1"  # what PostgreSQL and the API listen on (::1: an IPv6 cluster)

    @property
    def api_url(self) -> str:
        return netloc.url("https" if self.tls else "http", self.host, self.api_port)


def _which(binary: str, hint: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise LocalClusterError(f"{binary} not found on PATH: {hint}")
    return path


class LocalCluster:
    def __init__(self, dir: Path) -> None:
        self.dir = dir.resolve()
        self.meta_path = self.dir / "cluster.json"
        self.meta: dict[str, Any] = {}
        if self.meta_path.exists():
            self.meta = json.loads(self.meta_path.read_text())
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        # the KafkaBroker of each node id, made once: each holds the child process it started
        self._brokers: dict[int, Any] = {}

    # -- layout ----------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return str(self.meta.get("host") or "127.0.0.1")

    @property
    def cluster(self) -> str:
        return str(self.meta["cluster"])

    @property
    def members(self) -> list[MemberInfo]:
        return [
            MemberInfo(
                m["name"], m["pg_port"], m["api_port"], self.dir / m["name"], self.tls, self.host
            )
            for m in self.meta.get("members", [])
        ]

    # -- TLS (local up --tls) --------------------------------------------------------------------

    @property
    def tls(self) -> bool:
        return bool(self.meta.get("tls"))

    @property
    def tls_material(self) -> Any:
        """The cluster's CA and certificates (``pgsidecar.lab.tlsgen``), or None without TLS."""
        if not self.tls:
            return None
        from pgsidecar.lab.tlsgen import TlsMaterial

        d = self.dir / "tls"
        return TlsMaterial(d, d / "ca.crt", d / "ca.key")

    def _make_tls(self, names: list[str]) -> None:
        from pgsidecar.lab import tlsgen

        material = tlsgen.generate(self.dir / "tls", [*names, "etcd", "kafka"])
        # HAProxy takes a client certificate as one file, certificate then key
        client = material.member("client")
        pem = material.directory / "client.pem"
        pem.write_bytes(client.cert.read_bytes() + client.key.read_bytes())
        os.chmod(pem, 0o600)

    def client_ssl_context(self) -> ssl.SSLContext | None:
        """For the lab's own requests (the members' APIs, etcd): verifies against the cluster's
        CA and presents the client certificate, which both require."""
        material = self.tls_material
        if material is None:
            return None
        ctx = ssl.create_default_context(cafile=str(material.ca_cert))
        client = material.member("client")
        ctx.load_cert_chain(client.cert, client.key)
        return ctx

    def member(self, name: str) -> MemberInfo:
        for m in self.members:
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.members) or "none"
        raise LocalClusterError(f"no member {name!r} in {self.dir} (members: {known})")

    def dsn(self, name: str, dbname: str = "postgres") -> str:
        m = self.member(name)
        return (
            f"host={m.host} port={m.pg_port} user=postgres dbname={dbname} "
            f"passfile={self.dir / 'pgpass'} connect_timeout=3"
        ) + (f" sslmode=verify-full sslrootcert={self.tls_material.ca_cert}" if self.tls else "")

    def config_path(self, name: str) -> Path:
        return self.dir / name / "agent.yaml"

    # -- creation --------------------------------------------------------------------------------

    def create(
        self,
        nodes: int = 3,
        ttl: float = DEFAULT_TTL,
        base_port: int | None = None,
        cluster: str = "local",
        dcs: str = "etcd",
        pg_bin: Path = DEFAULT_PG_BIN,
        pg_user: str | None = None,
        extra: dict[str, Any] | None = None,
        dcs_url: str | None = None,
        kafka: bool = False,
        tls: bool = False,
        backup: bool = False,
        host: str = "127.0.0.1",
        backup_schedule: dict[str, str] | None = None,
        restore_from: Path | None = None,
        restore_target: RecoveryTargetSettings | None = None,
        dcs_members: int = 1,
        kafka_brokers: int = 1,
        standby_of: Path | None = None,
    ) -> None:
        """``dcs_url``: an already running store to use instead of starting one (the tests point
        a cluster at the Consul emulator this way). ``tls``: a generated CA (``dir/tls``) and TLS
        on every link: etcd's clients (certificates required), the REST API (client
        certificates required), PostgreSQL (verify-full), the Kafka broker's listener (SSL).
        ``backup``: the members archive into a pgBackRest repository in DIR/backup
        (docs/backup.md); ``backup_schedule`` (implies ``backup``): the backup section's
        schedule, e.g. {"full": "0 3 * * 0", "diff": "0 3 * * 1-6"}. ``restore_from`` (another
        local cluster's directory or its DIR/backup) and ``restore_target`` (a time, an LSN, a
        transaction id or a restore point name): the first member is restored to that target
        from that repository before the agents start (lab/pitr.py);
        the new cluster has the source's database passwords and archives into its own
        repository (implies ``backup``). ``host``: the loopback address PostgreSQL and the agents'
        APIs listen on, 127.0.0.1 or ::1 (the members then reach each other over IPv6; etcd, Kafka
        and the lab's HAProxy stay on 127.0.0.1). ``dcs_members``: etcd as a cluster of 3 or 5 members
        (every agent gets every client endpoint). ``kafka_brokers``: Kafka as that many brokers,
        each also a controller of the KRaft quorum; with 3 or more the topic has 3 replicas and
        min.insync.replicas 2. ``standby_of`` (another local cluster's directory): a standby
        cluster of that one, with its own etcd; its first member copies the source with
        pg_basebackup, its leader is a standby leader that streams from the source's members
        (every one listed, the first that answers serves) until `pgsidecar promote-cluster`."""
        source: dict[str, Any] | None = None
        standby: dict[str, Any] | None = None
        if standby_of is not None:
            if restore_from is not None:
                raise LocalClusterError("--standby-of and --restore-from exclude each other")
            if tls:
                raise LocalClusterError(
                    "--standby-of with --tls is not supported: the standby cluster would need "
                    "the source's CA and client certificates"
                )
            standby = self._standby_source(Path(standby_of), host)
        if (restore_from is None) != (restore_target is None):
            raise LocalClusterError(
                "--restore-from and a target (--target-time, --target-lsn, --target-xid or "
                "--target-name) go together"
            )
        if restore_from is not None and restore_target is not None:
            source = self._restore_source(Path(restore_from), restore_target)
            backup = True
        if dcs_members not in DCS_MEMBER_COUNTS:
            raise LocalClusterError(
                f"--dcs-members must be one of {', '.join(map(str, DCS_MEMBER_COUNTS))} (a raft "
                f"cluster of an even size tolerates no more failures than the odd size below it)"
            )
        if dcs_members > 1 and (dcs != "etcd" or dcs_url is not None):
            raise LocalClusterError("--dcs-members is for the cluster's own etcd (--dcs etcd)")
        if kafka_brokers < 1:
            raise LocalClusterError("--kafka-brokers must be at least 1")
        if kafka_brokers > 1 and not kafka:
            raise LocalClusterError("--kafka-brokers needs Kafka (--kafka)")
        if tls and dcs_url is not None:
            raise LocalClusterError(
                "--tls sets up its own etcd with TLS: it cannot use a given store"
            )
        if tls and dcs != "etcd":
            raise LocalClusterError("--tls is for --dcs etcd")
        if self.meta_path.exists():
            raise LocalClusterError(
                f"{self.dir} already holds a local cluster; `pgsidecar local down --dir {self.dir}` and remove it, "
                f"or use another --dir"
            )
        if nodes < 1:
            raise LocalClusterError("--nodes must be at least 1")
        if dcs != "etcd" and dcs_url is None:
            if dcs == "consul" and shutil.which("consul") is None:
                raise LocalClusterError(
                    "--dcs consul needs a `consul` binary on PATH (none is installed here); use --dcs etcd"
                )
        if not (pg_bin / "postgres").exists():
            raise LocalClusterError(
                f"PostgreSQL binaries not found in {pg_bin}: install postgresql-15 (apt-get install postgresql-15) "
                f"or pass --pg-bin"
            )
        if dcs == "etcd" and dcs_url is None:
            _which("etcd", "install Debian's etcd-server package (apt-get install etcd-server)")
        if os.geteuid() == 0:
            pg_user = pg_user or "postgres"
            uid, gid = os_user_ids(pg_user)
        else:
            pg_user = None
            uid, gid = os.getuid(), os.getgid()
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        blocked = traversable_by(self.dir, uid, gid)
        if blocked is not None:
            raise LocalClusterError(
                f"{blocked} cannot be entered by OS user {pg_user or uid}, who runs PostgreSQL: choose a --dir "
                f"outside it (for example under /tmp or /var/tmp), or chmod o+x {blocked}"
            )
        count = self.port_count(nodes, kafka, tls, dcs_members, kafka_brokers)
        further = 4 + 2 * nodes + (1 if kafka else 0)  # offset of further etcd members, brokers
        # below the kernel's ephemeral range (32768+), where an outgoing connection may hold a port
        base = base_port or free_port_range(count, start=21000, end=32000)
        secrets_dir = self.dir / "secrets"
        secrets_dir.mkdir(mode=0o700, exist_ok=True)
        pw = {k: secrets.token_urlsafe(18) for k in ("superuser", "replication", "api")}
        copied_from = source or standby
        if copied_from is not None:
            # the restored (or copied) database holds the source's roles and their passwords
            for k in ("superuser", "replication"):
                pw[k] = (Path(copied_from["dir"]) / "secrets" / f"{k}.secret").read_text().strip()
        for k, v in pw.items():
            p = secrets_dir / f"{k}.secret"
            p.write_text(v + "\n")
            os.chmod(p, 0o600)
        pgpass = self.dir / "pgpass"
        pgpass.write_text(
            f"*:*:*:postgres:{pw['superuser']}\n*:*:*:replicator:{pw['replication']}\n"
        )
        os.chmod(pgpass, 0o600)
        names = [f"pg{i + 1}" for i in range(nodes)]
        self.meta = {
            "cluster": cluster,
            "dcs": dcs,
            "ttl": ttl,
            "host": host,
            "base_port": base,
            "etcd": _etcd_meta(base, further, dcs_members),
            "dcs_url": dcs_url,
            "kafka": _kafka_meta(base, nodes, further + 2 * (dcs_members - 1), kafka_brokers)
            if kafka
            else None,
            "tls": tls,
            "backup": {"repository": str(self.dir / "backup"), "schedule": backup_schedule}
            if backup or backup_schedule
            else None,
            "pg_bin": str(pg_bin),
            "pg_user": pg_user,
            "restore": source,
            "standby_of": standby,
            "members": [
                {"name": n, "pg_port": base + 4 + 2 * i, "api_port": base + 5 + 2 * i}
                for i, n in enumerate(names)
            ],
        }
        if tls:
            self._make_tls(names)
        self.meta_path.write_text(json.dumps(self.meta, indent=2))
        for m in self.members:
            m.dir.mkdir(exist_ok=True)
            os.chmod(m.dir, 0o755)
            self.config_path(m.name).write_text(
                yaml.safe_dump(self._agent_config(m, extra or {}), sort_keys=False)
            )

    @staticmethod
    def port_count(
        nodes: int, kafka: bool, tls: bool = False, dcs_members: int = 1, kafka_brokers: int = 1
    ) -> int:
        """How many consecutive ports from the base port a cluster of this shape takes: etcd's
        client and peer, the broker's client and controller, two per member; with TLS the
        broker's loopback PLAINTEXT listener for its own traffic. Further etcd members (client,
        peer) and brokers (client, controller, internal) come after the first broker's
        internal port."""
        if dcs_members == 1 and kafka_brokers == 1:
            return 4 + 2 * nodes + (1 if tls and kafka else 0)
        extra = 4 + 2 * nodes + (1 if kafka else 0)
        return extra + 2 * (dcs_members - 1) + 3 * (kafka_brokers - 1)

    def _agent_config(self, m: MemberInfo, extra: dict[str, Any]) -> dict[str, Any]:
        meta = self.meta
        cfg: dict[str, Any] = {
            "name": m.name,
            "cluster": meta["cluster"],
            "state_dir": str(m.dir),
            "postgresql": {
                "bin_dir": meta["pg_bin"],
                "data_dir": str(m.dir / "pgdata"),
                "listen": m.host,
                "port": m.pg_port,
                "superuser": {
                    "username": "postgres",
                    "password_file": str(self.dir / "secrets/superuser.secret"),
                },
                "replication": {
                    "username": "replicator",
                    "password_file": str(self.dir / "secrets/replication.secret"),
                },
                "master_start_timeout": 20,
                "stop_timeout": 20,
                # the server log beside agent.log, as the fault suite's evidence expects; a
                # container's agent forwards it to its stderr instead (the default)
                "log_destination": "file",
            },
            "dcs": self._dcs_config(),
            "settings": {"ttl": meta["ttl"]},
            "kafka": {"bootstrap_servers": self.kafka_bootstrap, "partitions": 1}
            if meta.get("kafka")
            else {},
            "api": {
                "listen": m.host,
                "port": m.api_port,
                "token_file": str(self.dir / "secrets/api.secret"),
            },
        }
        if meta.get("pg_user"):
            cfg["postgresql"]["os_user"] = meta["pg_user"]
        if meta.get("kafka") and meta["kafka"].get("replication", 1) > 1:
            # the topic the first agent creates: replicated on the brokers (min.insync.replicas
            # comes from the brokers' default, 2), which the producer's acks=all relies on
            cfg["kafka"]["replication_factor"] = meta["kafka"]["replication"]
        if self.tls:
            self._tls_config(cfg, m)
        if meta.get("standby_of"):
            cfg["standby_cluster"] = {"hosts": list(meta["standby_of"]["hosts"])}
            if meta["standby_of"].get("restore_command"):
                cfg["standby_cluster"]["restore_command"] = meta["standby_of"]["restore_command"]
        if meta.get("backup"):
            # one repository for the cluster, which every member's agent creates if missing
            cfg["backup"] = {
                "repository": {"type": "posix", "path": meta["backup"]["repository"]},
                "archive_timeout": 30,
            }
            if meta["backup"].get("schedule"):
                cfg["backup"]["schedule"] = dict(meta["backup"]["schedule"])
        for key, value in extra.items():
            if isinstance(value, str):
                # per-member values: "{name}" is the member's name (e.g. its pod name)
                value = value.replace("{name}", m.name)
            set_dotted(cfg, key, value)
        return cfg

    def _tls_config(self, cfg: dict[str, Any], m: MemberInfo) -> None:
        """A member's TLS settings: its certificate for the API and PostgreSQL, the client
        certificate for etcd, the CA for all of them."""
        material = self.tls_material
        own = material.member(m.name)
        client = material.member("client")
        ca = str(material.ca_cert)
        cfg["api"]["tls"] = {
            "enabled": True,
            "cert_file": str(own.cert),
            "key_file": str(own.key),
            "ca_file": ca,
            "client_auth": "required",
        }
        cfg["postgresql"]["tls"] = {
            "enabled": True,
            "cert_file": str(own.cert),
            "key_file": str(own.key),
            "ca_file": ca,
        }
        cfg["dcs"]["etcd"].update(
            {"ca_cert": ca, "client_cert": str(client.cert), "client_key": str(client.key)}
        )
        if cfg["kafka"]:
            cfg["kafka"].update({"security_protocol": "SSL", "ssl_ca_file": ca})

    def _dcs_config(self) -> dict[str, Any]:
        meta = self.meta
        if meta.get("dcs_url"):
            urls = [meta["dcs_url"]]
        else:
            urls = self.etcd_endpoints
        if meta["dcs"] == "consul":
            # a local agent (or the emulator) accepts short sessions; real servers' minimum is 10 s
            return {"type": "consul", "consul": {"url": urls[0], "session_ttl_min": 2}}
        return {"type": "etcd", "etcd": {"endpoints": urls}}

    # -- the cluster's own etcd and Kafka --------------------------------------------------------

    @property
    def etcd_members(self) -> list[EtcdMemberInfo]:
        """The members of the cluster's own etcd (one, unless made with ``dcs_members``)."""
        e = self.meta["etcd"]
        if "members" not in e:
            return [EtcdMemberInfo("local", e["client_port"], e["peer_port"], self.dir / "etcd")]
        return [
            EtcdMemberInfo(
                m["name"], m["client_port"], m["peer_port"], self.dir / "etcd" / m["name"]
            )
            for m in e["members"]
        ]

    @property
    def etcd_endpoints(self) -> list[str]:
        scheme = "https" if self.tls else "http"
        return [f"{scheme}://127.0.0.1:{m.client_port}" for m in self.etcd_members]

    def etcd_member(self, name: str) -> EtcdMemberInfo:
        for m in self.etcd_members:
            if m.name == name:
                return m
        raise LocalClusterError(f"no etcd member {name!r} in {self.dir}")

    @property
    def kafka_broker_infos(self) -> list[KafkaBrokerInfo]:
        k = self.meta.get("kafka")
        if not k:
            return []
        if "brokers" not in k:
            return [
                KafkaBrokerInfo(
                    1, k["port"], k["controller_port"], k["internal_port"], self.dir / "kafka"
                )
            ]
        return [
            KafkaBrokerInfo(
                b["node_id"],
                b["port"],
                b["controller_port"],
                b["internal_port"],
                self.dir / "kafka" / f"broker{b['node_id']}",
            )
            for b in k["brokers"]
        ]

    @property
    def kafka_bootstrap(self) -> list[str]:
        return [f"127.0.0.1:{b.port}" for b in self.kafka_broker_infos]

    @property
    def kafka_brokers(self) -> list[Any]:
        """One ``KafkaBroker`` per broker, the same object on every call (it holds the child
        process it started, which ``stop_kafka`` reaps)."""
        cache = self._brokers
        infos = self.kafka_broker_infos
        if not infos:
            return []
        from pgsidecar.lab.kafka_broker import BrokerTls, KafkaBroker

        voters = ",".join(f"{b.node_id}@127.0.0.1:{b.controller_port}" for b in infos)
        k = self.meta["kafka"]
        material = self.tls_material
        for b in infos:
            if b.node_id in cache:
                continue
            tls = None
            if material is not None:
                own = material.member("kafka")
                tls = BrokerTls(own.cert, own.key, material.ca_cert, protocol="SSL")
            cache[b.node_id] = KafkaBroker(
                b.dir,
                b.port,
                b.controller_port,
                tls=tls,
                internal_port=b.internal_port if material is not None else None,
                node_id=b.node_id,
                voters=voters,
                replication=k.get("replication", 1),
                cluster_id=k.get("cluster_id"),
                heap=k.get("heap", "384m"),
            )
        return [cache[b.node_id] for b in infos]

    @property
    def kafka_broker(self) -> Any:
        """The first broker (the only one, unless made with ``kafka_brokers``)."""
        brokers = self.kafka_brokers
        return brokers[0] if brokers else None

    def start_kafka(self) -> None:
        """Every broker not running, all launched at once (a broker of a larger cluster serves
        only once a quorum of controllers runs; each first formats its storage, a JVM run of
        its own), then each waited for."""
        launched = [b for b in self.kafka_brokers if not b.running]
        _each_at_once(lambda b: b.launch(), launched)
        for broker in launched:
            broker.wait_serving(timeout=120)

    def stop_kafka(self) -> None:
        """Every broker, at once: one by one, the last ones would wait out their controlled
        shutdown once the quorum is gone."""
        _each_at_once(lambda b: b.stop(), self.kafka_brokers)

    @property
    def runs_own_dcs(self) -> bool:
        return not self.meta.get("dcs_url")

    # -- processes -------------------------------------------------------------------------------

    def _spawn(self, argv: list[str], log: Path, pidfile: Path, key: str, detach: bool) -> int:
        with open(log, "ab") as fh:
            proc = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=str(self.dir),
                # a crash in C code (a signal) still leaves its traceback in the log
                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"},
            )
        pidfile.write_text(f"{proc.pid}\n")
        if not detach:
            self._children[key] = proc
        return proc.pid

    def start_etcd(self, detach: bool = False) -> None:
        """Every member of the cluster's own etcd that is not running: all spawned first (a
        member of a larger cluster is healthy only once a quorum runs), then each waited for."""
        spawned = [m for m in self.etcd_members if self._spawn_etcd_member(m, detach)]
        for m in spawned:
            client = f"{'https' if self.tls else 'http'}://127.0.0.1:{m.client_port}"
            self._wait_http(f"{client}/health", 30, f"etcd {m.name}")

    def start_etcd_member(self, name: str) -> None:
        """One member again (the fault suite's restart of a killed member), on its data."""
        m = self.etcd_member(name)
        if self._spawn_etcd_member(m, detach=False):
            client = f"{'https' if self.tls else 'http'}://127.0.0.1:{m.client_port}"
            self._wait_http(f"{client}/health", 30, f"etcd {m.name}")

    def _spawn_etcd_member(self, m: EtcdMemberInfo, detach: bool) -> bool:
        """Spawn one etcd member unless it runs; True if spawned."""
        d = m.dir
        d.mkdir(parents=True, exist_ok=True)
        pid = read_pid(m.pidfile)
        if pid and pid_alive(pid):
            return False
        client = f"{'https' if self.tls else 'http'}://127.0.0.1:{m.client_port}"
        # on loopback the peer URLs stay plain: raft traffic never leaves the host
        peer = f"http://127.0.0.1:{m.peer_port}"
        initial = ",".join(f"{x.name}=http://127.0.0.1:{x.peer_port}" for x in self.etcd_members)
        argv = etcd_argv(m.name, d / "data", client, client, peer, initial)
        material = self.tls_material
        if material is not None:
            own = material.member("etcd")
            argv += [
                "--cert-file",
                str(own.cert),
                "--key-file",
                str(own.key),
                "--trusted-ca-file",
                str(material.ca_cert),
                "--client-cert-auth",
            ]
        self._spawn(argv, d / "etcd.log", m.pidfile, _etcd_key(m.name), detach)
        return True

    def stop_etcd(self) -> None:
        for m in self.etcd_members:
            pid = read_pid(m.pidfile)
            if pid:
                terminate(pid, signal.SIGTERM, timeout=10)
                self._reap(_etcd_key(m.name))

    def kill_etcd_member(self, name: str) -> None:
        """SIGKILL one etcd member and reap it (its data stays: ``start_etcd_member``)."""
        m = self.etcd_member(name)
        pid = read_pid(m.pidfile)
        if pid and pid_alive(pid):
            terminate(pid, signal.SIGKILL, timeout=10)
        self._reap(_etcd_key(m.name))

    def etcd_pid(self) -> int | None:
        """The pid of this cluster's own etcd (its first member), if it runs (the fault suite
        stops and resumes it)."""
        return self.etcd_member_pid(self.etcd_members[0].name)

    def etcd_member_pid(self, name: str) -> int | None:
        pid = read_pid(self.etcd_member(name).pidfile)
        return pid if pid and pid_alive(pid) else None

    def etcd_status(self, name: str, timeout: float = 1.0) -> dict[str, Any] | None:
        """One member's /v3/maintenance/status (its member id, the raft leader's id, the raft
        term), or None if it does not answer."""
        m = self.etcd_member(name)
        scheme = "https" if self.tls else "http"
        req = urllib.request.Request(
            f"{scheme}://127.0.0.1:{m.client_port}/v3/maintenance/status", data=b"{}"
        )
        try:
            with urllib.request.urlopen(
                req, timeout=timeout, context=self.client_ssl_context()
            ) as resp:
                data: dict[str, Any] = json.loads(resp.read())
                return data
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def etcd_leader(self) -> str | None:
        """The name of the etcd member that is the raft leader now, as its members report it
        (None while there is none, or no member answers)."""
        ids: dict[str, str] = {}
        leader_id = None
        for m in self.etcd_members:
            status = self.etcd_status(m.name)
            if status is None:
                continue
            ids[str(status.get("header", {}).get("member_id"))] = m.name
            leader_id = leader_id or status.get("leader")
        return ids.get(str(leader_id)) if leader_id else None

    def agent_pid(self, name: str) -> int | None:
        pid = read_pid(self.member(name).dir / "agent.pid")
        return pid if pid and pid_alive(pid) else None

    def postmaster_pid(self, name: str) -> int | None:
        path = self.member(name).dir / "pgdata" / "postmaster.pid"
        pid = read_pid_first_line(path)
        return pid if pid and pid_alive(pid) else None

    def start_member(self, name: str, detach: bool = False) -> int:
        m = self.member(name)
        pid = self.agent_pid(name)
        if pid:
            return pid
        argv = [sys.executable, "-m", "pgsidecar", "run", "--config", str(self.config_path(name))]
        return self._spawn(argv, m.dir / "agent.log", m.dir / "agent.pid", name, detach)

    def stop_member(self, name: str, timeout: float = 60) -> None:
        pid = self.agent_pid(name)
        if pid:
            terminate(pid, signal.SIGTERM, timeout=timeout)
        self._reap(name)

    def kill_member(self, name: str, postgres: bool = True) -> None:
        """Hard death: SIGKILL the agent (and its postmaster with it, at the same instant)."""
        pids = [self.agent_pid(name)]
        if postgres:
            pids.append(self.postmaster_pid(name))
        for pid in pids:
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for pid in pids:
            if pid:
                terminate(pid, signal.SIGKILL, timeout=10)
        self._reap(name)

    def _reap(self, key: str) -> None:
        proc = self._children.pop(key, None)
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def services(self) -> list[dict[str, Any]]:
        """The cluster's own etcd members and Kafka brokers: what runs where (`local status`)."""
        rows: list[dict[str, Any]] = []
        if self.runs_own_dcs and self.meta.get("dcs") == "etcd":
            leader = self.etcd_leader()
            for m, url in zip(self.etcd_members, self.etcd_endpoints, strict=True):
                rows.append(
                    {
                        "service": "etcd",
                        "name": m.name,
                        "pid": self.etcd_member_pid(m.name),
                        "address": url,
                        "leader": m.name == leader,
                    }
                )
        for info, broker in zip(self.kafka_broker_infos, self.kafka_brokers, strict=True):
            rows.append(
                {
                    "service": "kafka",
                    "name": f"broker{info.node_id}",
                    "pid": broker.pid if broker.running else None,
                    "address": broker.bootstrap,
                    "leader": None,
                }
            )
        return rows

    def up(self, detach: bool = False, timeout: float = 180) -> list[dict[str, Any]]:
        if self.runs_own_dcs:
            self.start_etcd(detach=detach)
        if self.meta.get("restore") and not (self.members[0].dir / "pgdata").exists():
            self._restore_first_member()
        self.start_kafka()
        for m in self.members:
            self.start_member(m.name, detach=detach)
        return self.wait_healthy(timeout=timeout)

    def down(self) -> None:
        # replicas first, then the master, so the master's hand-off does not trigger a failover
        # we are about to tear down anyway
        statuses = {m.name: self.api_status(m.name) for m in self.members}
        order = sorted(
            self.members, key=lambda m: (statuses.get(m.name) or {}).get("role") == "master"
        )
        for m in order:
            self.stop_member(m.name, timeout=30)
            pm = self.postmaster_pid(m.name)
            if pm:
                terminate(pm, signal.SIGQUIT, timeout=10)
        self.stop_kafka()
        if self.runs_own_dcs:
            self.stop_etcd()

    # -- observation -----------------------------------------------------------------------------

    def api_status(self, name: str, timeout: float = 1.0) -> dict[str, Any] | None:
        m = self.member(name)
        try:
            with urllib.request.urlopen(
                f"{m.api_url}/status", timeout=timeout, context=self.client_ssl_context()
            ) as resp:
                data: dict[str, Any] = json.loads(resp.read())
                return data
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def status(self) -> list[dict[str, Any]]:
        rows = []
        for m in self.members:
            st = self.api_status(m.name) or {}
            rows.append(
                {
                    "name": m.name,
                    "role": st.get("role", "down" if not self.agent_pid(m.name) else "unknown"),
                    "agent_pid": self.agent_pid(m.name),
                    "pg_running": st.get("pg_running", False),
                    "streaming": st.get("streaming", False),
                    "in_recovery": st.get("in_recovery"),
                    "timeline": st.get("timeline"),
                    "lsn": st.get("lsn"),
                    "lag_bytes": st.get("lag_bytes"),
                    "term": st.get("term"),
                    "leader": st.get("leader"),
                    "host": m.host,
                    "port": m.pg_port,
                    "api_url": m.api_url,
                    "dsn": self.dsn(m.name),
                }
            )
        return rows

    def master(self) -> str | None:
        masters = [r["name"] for r in self.status() if r["role"] == "master" and r["pg_running"]]
        return masters[0] if len(masters) == 1 else None

    def wait_healthy(
        self, timeout: float = 180, members: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Until one master that accepts writes (a standby cluster: or one standby leader) and
        every other (running) member a streaming replica. The lease is taken before the
        promotion ends: a master still in recovery is not there yet."""
        deadline = time.monotonic() + timeout
        want = members or [m.name for m in self.members]
        rows: list[dict[str, Any]] = []
        leading = ("master", "standby_leader") if self.meta.get("standby_of") else ("master",)
        while time.monotonic() < deadline:
            rows = self.status()
            by = {r["name"]: r for r in rows}
            masters = [
                n
                for n in want
                if by[n]["role"] in leading
                and by[n]["pg_running"]
                and (by[n]["role"] != "master" or by[n]["in_recovery"] is False)
            ]
            replicas = [n for n in want if by[n]["role"] == "replica" and by[n]["streaming"]]
            if (
                len(masters) == 1
                and len(replicas) == len(want) - 1
                and self._dcs_agrees(masters[0], replicas)
            ):
                return rows
            for n in want:
                if not self.agent_pid(n):
                    log = self.member(n).dir / "agent.log"
                    try:
                        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                    except OSError:
                        tail = "(no log)"
                    # the log's tail in the error itself: a test's cluster dir is gone by the
                    # time anyone reads the failure
                    raise LocalClusterError(
                        f"the agent of {n} is not running{self._exit_status(n)}; see {log}; "
                        f"its last lines:\n{tail}"
                    )
            time.sleep(0.2)
        raise LocalClusterError(f"cluster not healthy after {timeout:.0f} s: {rows}")

    def _exit_status(self, name: str) -> str:
        """How a member's agent that we started ended (" (exit code 1)", " (killed by SIGKILL)"),
        or "" if it was not our child or has not been reaped."""
        proc = self._children.get(name)
        rc = proc.poll() if proc is not None else None
        if rc is None:
            return ""
        if rc < 0:
            try:
                return f" (killed by {signal.Signals(-rc).name})"
            except ValueError:
                return f" (killed by signal {-rc})"
        return f" (exit code {rc})"

    def _dcs_agrees(self, leader: str, replicas: list[str]) -> bool:
        """Does the DCS, which `switchover`, `list` and the peers read, show what the agents'
        APIs do: ``leader`` holding the key and each replica's member key saying it streams?
        An agent publishes its key just after its API knows, so a command run at once could
        otherwise still see a replica that does not stream yet."""
        try:
            view = self.read_view()
        except Exception:  # a DCS that does not answer yet is not a healthy cluster yet
            return False
        if view.leader is None or view.leader.name != leader:
            return False
        return all(bool(view.members.get(n, {}).get("streaming")) for n in replicas)

    def _restore_source(self, path: Path, target: RecoveryTargetSettings) -> dict[str, Any]:
        """The source of a point-in-time recovery: a local cluster's directory or its backup
        repository (DIR/backup)."""
        src = path if (path / "cluster.json").exists() else path.parent
        meta_path = src / "cluster.json"
        if not meta_path.exists():
            raise LocalClusterError(
                f"{path} is neither a local cluster's directory nor its DIR/backup repository"
            )
        meta = json.loads(meta_path.read_text())
        repo = (meta.get("backup") or {}).get("repository")
        if not repo:
            raise LocalClusterError(
                f"the local cluster in {src} has no backup repository (--backup)"
            )
        if src.resolve() == self.dir.resolve():
            raise LocalClusterError("a cluster cannot be restored into its own directory")
        return {
            "dir": str(src),
            "repository": str(repo),
            "stanza": meta["cluster"],
            "target": target.model_dump(mode="json", exclude_none=True),
        }

    def _standby_source(self, path: Path, host: str) -> dict[str, Any]:
        """The source of a standby cluster: another local cluster's directory."""
        meta_path = path / "cluster.json"
        if not meta_path.exists():
            raise LocalClusterError(f"{path} is not a local cluster's directory (no cluster.json)")
        if path.resolve() == self.dir.resolve():
            raise LocalClusterError("a cluster cannot be a standby of itself")
        meta = json.loads(meta_path.read_text())
        if meta.get("tls"):
            raise LocalClusterError(
                f"the local cluster in {path} uses TLS: --standby-of is not supported for it"
            )
        src_host = str(meta.get("host") or "127.0.0.1")
        if src_host != host:
            raise LocalClusterError(
                f"the source listens on {src_host}: give the standby cluster --host {src_host}"
            )
        source: dict[str, Any] = {
            "dir": str(path.resolve()),
            "cluster": meta["cluster"],
            "hosts": [netloc.host_port(src_host, m["pg_port"]) for m in meta["members"]],
        }
        if meta.get("backup"):
            # the source archives: WAL from its repository when none of its members answers,
            # through the first member's pgbackrest.conf (the repository and the stanza), with
            # no log file (nothing of ours lands in the source's log directory). pgBackRest
            # checks that PostgreSQL's working directory is pg1-path: each member's own data
            # directory, which the shell running restore_command is in
            conf = path.resolve() / meta["members"][0]["name"] / "pgbackrest" / "pgbackrest.conf"
            source["restore_command"] = (
                f"pgbackrest --config={shlex.quote(str(conf))} --stanza={meta['cluster']} "
                '--log-level-file=off --pg1-path="$(pwd)" archive-get %f "%p"'
            )
        return source

    def _restore_first_member(self) -> None:
        """Point-in-time recovery of the first member from the source's repository, then the
        initialize key naming it, so that no other member runs initdb: they clone from it."""
        import asyncio

        from events.dcs.factory import create_dcs
        from pgsidecar.backup.settings import RecoveryTargetSettings
        from pgsidecar.config import load_config
        from pgsidecar.lab.pitr import restore_to_target

        src = self.meta["restore"]
        first = self.members[0]
        work = self.dir / "restore"
        work.mkdir(exist_ok=True)
        os.chmod(work, 0o755)
        try:
            restore_to_target(
                repository=Path(src["repository"]),
                stanza=src["stanza"],
                data_dir=first.dir / "pgdata",
                port=first.pg_port,
                # "target_time": a cluster.json written before the other targets existed
                target=RecoveryTargetSettings.model_validate(
                    src.get("target") or {"time": src["target_time"]}
                ),
                pg_bin=Path(self.meta["pg_bin"]),
                pg_user=self.meta.get("pg_user"),
                work_dir=work,
            )
        except Exception as exc:
            raise LocalClusterError(f"point-in-time recovery failed: {exc}") from exc
        cfg = load_config(self.config_path(first.name))

        async def claim() -> None:
            dcs = create_dcs(cfg.dcs, cfg.cluster)
            deadline = time.monotonic() + 30
            while True:
                try:
                    await dcs.connect()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            try:
                if not await dcs.try_initialize(first.name):
                    raise LocalClusterError("the new cluster's DCS already names a bootstrap")
            finally:
                await dcs.close()

        asyncio.run(claim())

    def with_dcs(self, use: Callable[[DCS], Awaitable[T]], via: str | None = None) -> T:
        """``use`` run with a client of the cluster's DCS made from member ``via``'s config (the
        first member's by default), connected first and closed after."""
        import asyncio

        from events.dcs.factory import create_dcs
        from pgsidecar.config import load_config

        cfg = load_config(self.config_path(via or self.members[0].name))

        async def go() -> T:
            dcs = create_dcs(cfg.dcs, cfg.cluster)
            await dcs.connect()
            try:
                return await use(dcs)
            finally:
                await dcs.close()

        return asyncio.run(go())

    def read_view(self) -> ClusterView:
        """The DCS view of the cluster (through the first member's config)."""
        return self.with_dcs(lambda dcs: dcs.read_cluster())

    def request_switchover(self, target: str | None = None, via: str | None = None) -> None:
        """Write a switchover command (to ``target``, or to the best replica) as `pgsidecar
        switchover` does, through member ``via``'s config (the first member's by default)."""
        from pgsidecar.ops import request_switchover

        self.with_dcs(lambda dcs: request_switchover(dcs, target), via)

    def wait_sync(self, timeout: float = 60) -> list[str]:
        """Until the master has recorded at least one synchronous standby in the DCS (before
        that, in synchronous mode, no member could be promoted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = self.read_view()
            sync = view.sync or {}
            members = sync.get("members") if isinstance(sync, dict) else None
            if view.leader is not None and sync.get("leader") == view.leader.name and members:
                return list(members)
            time.sleep(0.2)
        raise LocalClusterError(f"no synchronous standby recorded within {timeout:.0f} s")

    def _wait_http(self, url: str, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=1, context=self.client_ssl_context()):
                    return
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        raise LocalClusterError(f"{what} did not answer at {url} within {timeout:.0f} s")


def _each_at_once(fn: Callable[[Any], None], items: list[Any]) -> None:
    """``fn(item)`` for every item, in threads; the first error is raised once all are done."""
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(items)) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()


def _etcd_key(name: str) -> str:
    """The key of an etcd member's process among the cluster's children. The single member keeps
    the key "etcd" it always had."""
    return "etcd" if name == "local" else f"etcd:{name}"


def _etcd_meta(base: int, extra_base: int, size: int) -> dict[str, Any]:
    """cluster.json's etcd entry: the first member on base, base + 1 (as a single member always
    was); further members' (client, peer) pairs from ``base + extra_base`` on."""
    meta: dict[str, Any] = {"client_port": base, "peer_port": base + 1}
    if size > 1:
        pairs = [(base, base + 1)] + [
            (base + extra_base + 2 * i, base + extra_base + 2 * i + 1) for i in range(size - 1)
        ]
        meta["members"] = [
            {"name": f"etcd{i + 1}", "client_port": c, "peer_port": p}
            for i, (c, p) in enumerate(pairs)
        ]
    return meta


def _kafka_meta(base: int, nodes: int, extra_base: int, brokers: int) -> dict[str, Any]:
    """cluster.json's kafka entry: the first broker on the ports a single broker always had;
    further brokers' (client, controller, internal) ports from ``base + extra_base`` on."""
    meta: dict[str, Any] = {
        "port": base + 2,
        "controller_port": base + 3,
        "internal_port": base + 4 + 2 * nodes,
    }
    if brokers > 1:
        from pgsidecar.lab.kafka_broker import new_cluster_id

        triples = [(meta["port"], meta["controller_port"], meta["internal_port"])] + [
            (
                base + extra_base + 3 * i,
                base + extra_base + 3 * i + 1,
                base + extra_base + 3 * i + 2,
            )
            for i in range(brokers - 1)
        ]
        meta["brokers"] = [
            {"node_id": i + 1, "port": c, "controller_port": k, "internal_port": n}
            for i, (c, k, n) in enumerate(triples)
        ]
        meta["cluster_id"] = new_cluster_id()
        meta["replication"] = min(3, brokers)
        # several JVMs on one small machine: a smaller heap each
        meta["heap"] = "256m"
    return meta


def read_pid_first_line(path: Path) -> int | None:
    try:
        return int(path.read_text().splitlines()[0].strip())
    except (OSError, ValueError, IndexError):
        return None
