"""`local up --dcs-members N --kafka-brokers N`: what `LocalCluster.create` writes (ports, the
agents' configs, each broker's properties), without starting anything."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgsidecar.config import load_config
from pgsidecar.lab import local as local_mod
from pgsidecar.lab.local import LocalCluster, LocalClusterError


@pytest.fixture
def make(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``make(**create_kwargs) -> LocalCluster`` in a fresh dir, with a stand-in PostgreSQL bin
    dir; etcd and the OS user looked up as if present (nothing is run)."""
    pg_bin = tmp_path / "pgbin"
    pg_bin.mkdir()
    (pg_bin / "postgres").touch()
    monkeypatch.setattr(local_mod.shutil, "which", lambda binary: f"/usr/bin/{binary}")
    monkeypatch.setattr(local_mod, "os_user_ids", lambda _user: (os.getuid(), os.getgid()))
    counter = iter(range(100))

    def make(**kwargs: Any) -> LocalCluster:
        lc = LocalCluster(tmp_path / f"c{next(counter)}")
        lc.create(nodes=3, ttl=5, base_port=21000, pg_bin=pg_bin, **kwargs)
        return lc

    return make


def _all_ports(lc: LocalCluster) -> list[int]:
    ports = [p for m in lc.members for p in (m.pg_port, m.api_port)]
    ports += [p for m in lc.etcd_members for p in (m.client_port, m.peer_port)]
    ports += [
        p for b in lc.kafka_broker_infos for p in (b.port, b.controller_port, b.internal_port)
    ]
    return ports


def test_the_single_member_default_is_unchanged(make: Any) -> None:
    lc = make(kafka=True)
    assert lc.meta["etcd"] == {"client_port": 21000, "peer_port": 21001}
    assert lc.meta["kafka"] == {"port": 21002, "controller_port": 21003, "internal_port": 21010}
    [etcd] = lc.etcd_members
    assert (etcd.name, etcd.dir) == ("local", lc.dir / "etcd")
    [broker] = lc.kafka_brokers
    assert broker.directory == lc.dir / "kafka" and broker.replication == 1
    cfg = yaml.safe_load(lc.config_path("pg1").read_text())
    assert cfg["dcs"]["etcd"]["endpoints"] == ["http://127.0.0.1:21000"]
    assert cfg["kafka"] == {"bootstrap_servers": ["127.0.0.1:21002"], "partitions": 1}


def test_three_etcd_members_and_three_brokers(make: Any) -> None:
    lc = make(kafka=True, dcs_members=3, kafka_brokers=3)
    ports = _all_ports(lc)
    assert len(ports) == len(set(ports)), "two services share a port"
    # within the range create() reserved
    assert LocalCluster.port_count(3, True, False, 3, 3) == 4 + 2 * 3 + 1 + 2 * 2 + 3 * 2
    assert all(21000 <= p < 21000 + LocalCluster.port_count(3, True, False, 3, 3) for p in ports)
    assert [m.name for m in lc.etcd_members] == ["etcd1", "etcd2", "etcd3"]
    assert len({m.dir for m in lc.etcd_members}) == 3
    for name in ("pg1", "pg2", "pg3"):
        cfg = load_config(lc.config_path(name))  # the agent accepts it
        assert cfg.dcs.etcd.endpoints == lc.etcd_endpoints
        assert len(cfg.dcs.etcd.endpoints) == 3
        assert cfg.kafka.bootstrap_servers == lc.kafka_bootstrap
        assert len(cfg.kafka.bootstrap_servers) == 3
        assert cfg.kafka.replication_factor == 3
    brokers = lc.kafka_brokers
    assert [b.node_id for b in brokers] == [1, 2, 3]
    assert len({b.cluster_id for b in brokers}) == 1 and brokers[0].cluster_id
    assert lc.kafka_brokers[1] is brokers[1]  # the same objects: they hold the child processes
    from pgsidecar.lab.kafka_broker import server_properties

    b = brokers[1]
    props = server_properties(
        b.directory,
        b.port,
        b.controller_port,
        node_id=b.node_id,
        voters=b.voters,
        replication=b.replication,
    )
    voters = ",".join(f"{x.node_id}@127.0.0.1:{x.controller_port}" for x in brokers)
    assert "node.id=2\n" in props
    assert f"controller.quorum.voters={voters}\n" in props
    assert "default.replication.factor=3\n" in props
    assert "min.insync.replicas=2\n" in props
    assert "offsets.topic.replication.factor=3\n" in props


def test_a_lone_broker_keeps_one_replica() -> None:
    from pgsidecar.lab.kafka_broker import server_properties

    props = server_properties(Path("/x"), 9092, 9093)
    assert "controller.quorum.voters=1@127.0.0.1:9093\n" in props
    assert "min.insync.replicas=1\n" in props and "default.replication.factor=1\n" in props


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dcs_members": 2}, "--dcs-members must be one of 1, 3, 5"),
        ({"dcs_members": 3, "dcs_url": "http://127.0.0.1:1"}, "--dcs-members is for"),
        ({"kafka_brokers": 3}, "--kafka-brokers needs Kafka"),
        ({"kafka": True, "kafka_brokers": 0}, "--kafka-brokers must be at least 1"),
    ],
)
def test_shapes_refused(make: Any, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(LocalClusterError, match=message):
        make(**kwargs)


def test_standby_of_lists_every_source_member_and_copies_its_passwords(make: Any) -> None:
    src = make()
    dst = make(standby_of=src.dir)
    assert dst.meta["standby_of"]["hosts"] == [f"127.0.0.1:{m.pg_port}" for m in src.members]
    for m in dst.members:
        cfg = load_config(dst.config_path(m.name))
        assert cfg.standby_cluster is not None
        assert cfg.standby_cluster.endpoints() == [("127.0.0.1", p.pg_port) for p in src.members]
    for secret in ("superuser", "replication"):
        path = f"secrets/{secret}.secret"
        assert (dst.dir / path).read_text() == (src.dir / path).read_text()
    assert (dst.dir / "secrets/api.secret").read_text() != (
        src.dir / "secrets/api.secret"
    ).read_text()
    # the source does not archive: nothing to restore from
    assert all(
        load_config(dst.config_path(m.name)).standby_cluster.restore_command is None  # type: ignore[union-attr]
        for m in dst.members
    )


def test_standby_of_an_archiving_source_restores_from_its_repository(make: Any) -> None:
    src = make(backup=True)
    dst = make(standby_of=src.dir)
    conf = src.dir / src.members[0].name / "pgbackrest" / "pgbackrest.conf"
    for m in dst.members:
        sc = load_config(dst.config_path(m.name)).standby_cluster
        assert sc is not None and sc.restore_command is not None
        argv = sc.restore_command.split()
        assert f"--config={conf}" in argv and f"--stanza={src.cluster}" in argv
        # pgBackRest refuses a pg1-path other than PostgreSQL's working directory
        assert '--pg1-path="$(pwd)"' in argv
        assert argv[-3:] == ["archive-get", "%f", '"%p"']


def test_standby_of_refusals(make: Any, tmp_path: Path) -> None:
    src = make()
    with pytest.raises(LocalClusterError, match="not a local cluster"):
        make(standby_of=tmp_path / "nothing")
    with pytest.raises(LocalClusterError, match="--host 127.0.0.1"):
        make(standby_of=src.dir, host="::1")
    with pytest.raises(LocalClusterError, match="--tls is not supported"):
        make(standby_of=src.dir, tls=True)
