"""The monitoring role and postgres_exporter against a live local cluster (real PostgreSQL 15,
etcd, agents, and Kafka when Java is there): the master creates the role, the replicas have it by
replication, it is a pg_monitor member and nothing more and reads pg_stat_replication in full;
Debian's postgres_exporter logs in as it, and every metric name the alerting rules and the
dashboards of deploy/monitoring (and the Helm chart's copies) use is exported by the exporter or
the agent. Its password reaches no log, journal, agent config or Kafka record."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from aiokafka import AIOKafkaConsumer

from events.kafka import default_topic
from pgsidecar.lab.kafka_broker import java_available
from pgsidecar.lab.local import LocalCluster
from pgsidecar.procutil import free_port
from tests.support.clusterutil import local_cluster, wait_for
from tests.support.promql import metric_names

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
CHART_FILES = ROOT / "deploy" / "helm" / "pgsidecar" / "files"
EXPORTER = shutil.which("prometheus-postgres-exporter")
MONITOR = "pgsidecar_monitor"
# a password with characters a DSN or a log line would mangle or quote
PASSWORD = "mon:it/or@pw%" + os.urandom(6).hex()

# Names the rules and dashboards use that neither the exporter nor the agent exports, and why.
# Each entry must stay true: used somewhere, and absent from the live scrape.
NOT_EXPORTED = {
    # Prometheus writes `up` itself for every target it scrapes (1 when the scrape succeeded):
    # no exporter ever serves it
    "up": "synthesized by Prometheus per scrape target",
}
# Exported once a backup schedule has run a backup, which this cluster (no repository) never
# does: tests/e2e/test_backup_schedule_e2e.py scrapes them from a cluster with a schedule; and
# one exported once the repository holds a backup.
EXPORTED_WITH_A_BACKUP_SCHEDULE = {
    "pgsidecar_backup_last_success_timestamp_seconds",
    "pgsidecar_backup_last_scheduled_failed",
    # by a master whose repository holds a backup: tests/e2e/test_backup_cluster.py scrapes it
    "pgsidecar_backup_last_age_seconds",
}


# ------------------------------------------------------------------ the cluster


@pytest.fixture(scope="module")
def secret_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pgsc-mon-", dir="/tmp"))
    (d / "monitor-password").write_text(PASSWORD + "\n")
    os.chmod(d / "monitor-password", 0o600)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(secret_dir: Path) -> Iterator[LocalCluster]:
    extra = {
        "postgresql.monitoring.username": MONITOR,
        "postgresql.monitoring.password_file": str(secret_dir / "monitor-password"),
        # every statement in the server log: the password must not be in it even so
        "postgresql.parameters.log_statement": "all",
    }
    with local_cluster(nodes=3, ttl=5.0, extra=extra, kafka=java_available()) as lc:
        yield lc


def master_of(lc: LocalCluster) -> str:
    master = lc.master()
    assert master is not None
    return master


def monitor_dsn(lc: LocalCluster, name: str) -> str:
    """As postgres_exporter connects: over TCP loopback, the password in the DSN, no TLS."""
    return (
        f"postgresql://{MONITOR}:{urllib.parse.quote(PASSWORD, safe='')}@127.0.0.1:"
        f"{lc.member(name).pg_port}/postgres?sslmode=disable&connect_timeout=3"
    )


REPLAYED_SQL = "SELECT pg_last_wal_replay_lsn() >= %s"
ROLE_SQL = """
SELECT rolcanlogin, rolsuper, rolreplication, rolcreatedb, rolcreaterole,
       pg_has_role(oid, 'pg_monitor', 'MEMBER')
FROM pg_roles WHERE rolname = %s
"""


def test_the_role_is_on_the_master_and_every_replica(cluster: LocalCluster) -> None:
    lc = cluster
    master = master_of(lc)
    with psycopg.connect(lc.dsn(master), autocommit=True) as c:
        assert c.execute(ROLE_SQL, (MONITOR,)).fetchall() == [
            (True, False, False, False, False, True)
        ]
        lsn = c.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
    for m in lc.members:
        if m.name == master:
            continue
        with psycopg.connect(lc.dsn(m.name), autocommit=True) as c:
            wait_for(
                lambda c=c: c.execute(REPLAYED_SQL, (lsn,)).fetchone() == (True,),
                30,
                what=f"{m.name} replaying the role",
            )
            assert c.execute(ROLE_SQL, (MONITOR,)).fetchall() == [
                (True, False, False, False, False, True)
            ], m.name
        # ... and it logs in there with the password, over loopback like the exporter
        with psycopg.connect(monitor_dsn(lc, m.name), autocommit=True) as c:
            assert c.execute("SELECT current_user, pg_is_in_recovery()").fetchone() == (
                MONITOR,
                True,
            )


def test_the_role_reads_pg_stat_replication_in_full_and_writes_nothing(
    cluster: LocalCluster,
) -> None:
    lc = cluster
    master = master_of(lc)
    columns = "client_addr, state, sent_lsn, write_lsn, flush_lsn, replay_lsn, sync_state"
    with psycopg.connect(monitor_dsn(lc, master), autocommit=True) as c:
        rows = wait_for(
            lambda: (
                r
                if len(r := c.execute(f"SELECT {columns} FROM pg_stat_replication").fetchall()) == 2
                else None
            ),
            30,
            what="two standbys in pg_stat_replication",
        )
        for row in rows:
            assert None not in row, row
            assert row[1] == "streaming"
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("CREATE TABLE monitor_writes (x int)")
    # a role without pg_monitor sees the rows with those columns empty: what the grant is for
    with psycopg.connect(lc.dsn(master), autocommit=True) as c:
        c.execute("CREATE ROLE no_monitor LOGIN PASSWORD 'no-monitor-pw'")
    try:
        plain = monitor_dsn(lc, master).replace(
            f"{MONITOR}:{urllib.parse.quote(PASSWORD, safe='')}", "no_monitor:no-monitor-pw"
        )
        with psycopg.connect(plain, autocommit=True) as c:
            rows = c.execute(f"SELECT {columns} FROM pg_stat_replication").fetchall()
            assert len(rows) == 2 and all(r == (None,) * 7 for r in rows), rows
    finally:
        with psycopg.connect(lc.dsn(master), autocommit=True) as c:
            c.execute("DROP ROLE no_monitor")


# ------------------------------------------------------------------ the exporter


@contextlib.contextmanager
def postgres_exporter(dsn: str, cwd: Path) -> Iterator[str]:
    """Debian's postgres_exporter on a free loopback port; yields its /metrics URL. Stopped
    and reaped by its pid."""
    assert EXPORTER is not None
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATA_SOURCE", "PG"))}
    env["DATA_SOURCE_NAME"] = dsn
    with (cwd / "postgres_exporter.log").open("wb") as log:
        proc = subprocess.Popen(
            [EXPORTER, f"--web.listen-address=127.0.0.1:{port}"],
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def scrape(url: str) -> dict[str, Any]:
    """family name -> (type, {(sample name, value)}), read from the text exposition as
    Prometheus ingests it. Not prometheus_client's parser: it renames a counter's samples to
    <name>_total, which is not the series Prometheus stores for postgres_exporter's counters."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    types: dict[str, str] = {}
    samples: dict[str, set[tuple[str, float]]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            types[name] = kind
        elif line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)", line)
            assert m, f"not a sample line: {line!r}"
            samples.setdefault(m.group(1), set()).add((m.group(1), float(m.group(3))))
    families: dict[str, Any] = {n: (t, set()) for n, t in types.items()}
    for name, got in samples.items():
        family = next(
            (
                name.removesuffix(x)
                for x in ("_bucket", "_sum", "_count", "_total", "_created", "")
                if name.removesuffix(x) in types
            ),
            name,
        )
        families.setdefault(family, ("untyped", set()))[1].update(got)
    return families


def exported(families: dict[str, Any]) -> set[str]:
    """The names a query can select: every sample's name. A family without a sample (a labelled
    metric no child of which was made yet) gives no series, so it does not count."""
    return {name for _, samples in families.values() for name, _ in samples}


def used_names() -> dict[str, set[str]]:
    """metric name -> the files whose rules or panels use it, over deploy/monitoring and the
    Helm chart's copies."""
    files = {
        p.resolve()
        for p in [
            MONITORING / "prometheusrule.yaml",
            *(MONITORING / "dashboards").glob("*.json"),
            *CHART_FILES.glob("*.json"),
            *CHART_FILES.glob("prometheusrule*.yaml"),
        ]
    }
    used: dict[str, set[str]] = {}
    for f in sorted(files):
        for expr in exprs_of(f):
            for name in metric_names(expr):
                used.setdefault(name, set()).add(f.relative_to(ROOT).as_posix())
    return used


def exprs_of(path: Path) -> list[str]:
    if path.suffix == ".json":
        import json

        dash = json.loads(path.read_text())
        out = []

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                if isinstance(node.get("expr"), str):
                    out.append(node["expr"])
                # a query variable: label_values(<selector>, <label>) or a plain query
                if node.get("type") == "query" and isinstance(node.get("definition"), str):
                    d = node["definition"]
                    if d.startswith("label_values(") and d.endswith(")"):
                        out.append(d[len("label_values(") : -1].rsplit(",", 1)[0])
                    else:
                        out.append(d)
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(dash)
        assert out, f"no query in {path}"
        return out
    doc = yaml.safe_load(path.read_text())
    return [r["expr"] for g in doc["spec"]["groups"] for r in g["rules"]]


def covered(name: str, families: dict[str, Any], names: set[str]) -> bool:
    """``name`` is exported; a histogram's or summary's _bucket/_sum/_count count as its base."""
    if name in names:
        return True
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and families.get(base, ("",))[0] in ("histogram", "summary"):
            return True
    return False


@pytest.mark.skipif(
    EXPORTER is None,
    reason="Debian's prometheus-postgres-exporter is not installed (scripts/setup.sh)",
)
@pytest.mark.skipif(
    not java_available(),
    reason="the agent's Kafka metrics need a broker: Apache Kafka needs Java 17",
)
@pytest.mark.kafka
def test_every_metric_the_rules_and_dashboards_use_is_exported(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """On the master (the member with replicas and the archiver's view), as the monitoring
    role: postgres_exporter 0.11.1 (Debian 12) plus the agent's /metrics."""
    lc = cluster
    master = master_of(lc)
    version = subprocess.run(
        [str(EXPORTER), "--version"], capture_output=True, text=True, check=False, timeout=10
    )
    assert "0.11" in version.stdout + version.stderr, version
    used = used_names()
    assert {"pgsidecar_role", "pg_up"} <= used.keys(), used
    with postgres_exporter(monitor_dsn(lc, master), tmp_path) as url:
        # pg_up 1: it logged in as the monitoring role (0 if the role or its password is wrong)
        wait_for(
            lambda: ("pg_up", 1.0) in _try_scrape(url).get("pg_up", ("", set()))[1],
            30,
            interval=0.5,
            what="postgres_exporter reporting pg_up 1",
        )
        # 0.11 learns the server's version in its first scrape after connecting and only
        # then loads the built-in queries for it (pg_stat_database, pg_stat_archiver, ...):
        # that scrape lacks them, the next has them
        exporter = scrape(url)
        assert ("pg_up", 1.0) in exporter["pg_up"][1]
    agent = scrape(f"{lc.member(master).api_url}/metrics")
    families = {**exporter, **agent}
    names = exported(exporter) | exported(agent)
    missing = {
        name: sorted(where)
        for name, where in used.items()
        if name not in NOT_EXPORTED
        and name not in EXPORTED_WITH_A_BACKUP_SCHEDULE
        and not covered(name, families, names)
    }
    assert missing == {}, "used by the rules or dashboards but exported by neither"
    # the documented exceptions stay true: used, and really not exported
    for name in (*NOT_EXPORTED, *EXPORTED_WITH_A_BACKUP_SCHEDULE):
        assert name in used and not covered(name, families, names), name
    # the exporter's names come from the exporter, the agent's from the agent
    assert {n for n in used if n.startswith("pg_")} <= exported(exporter)
    assert {
        n for n in used if n.startswith("pgsidecar_") and n not in EXPORTED_WITH_A_BACKUP_SCHEDULE
    } <= exported(agent)


def _try_scrape(url: str) -> dict[str, Any]:
    try:
        return scrape(url)
    except OSError:
        return {}


# ------------------------------------------------------------------ the password stays secret


async def raw_topic(bootstrap: str, topic: str, want: int, within: float) -> list[bytes]:
    """The record values on ``topic`` as bytes, from its beginning, until there are ``want`` of
    them (or ``within`` seconds have passed: then what there is)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        async with asyncio.timeout(within):
            while len(values) < want:
                batch = await consumer.getmany(timeout_ms=1000)
                values += [m.value for msgs in batch.values() for m in msgs if m.value]
    except TimeoutError:
        pass
    finally:
        await consumer.stop()
    return values


def test_the_password_reaches_no_log_journal_config_or_record(cluster: LocalCluster) -> None:
    lc = cluster
    secrets = [PASSWORD, urllib.parse.quote(PASSWORD, safe=""), "SCRAM-SHA-256$"]
    statements = 0
    for m in lc.members:
        for f in ("agent.log", "journal.jsonl", "postgresql.log", "agent.yaml"):
            text = (m.dir / f).read_text(errors="replace")
            assert not any(s in text for s in secrets), f"a secret in {m.name}/{f}"
        statements += (m.dir / "postgresql.log").read_text(errors="replace").count("statement:")
    # with log_statement=all: the check above means something
    assert statements > 0
    if lc.meta.get("kafka"):
        journal_lines = sum(
            len((m.dir / "journal.jsonl").read_text().splitlines()) for m in lc.members
        )
        bootstrap = f"127.0.0.1:{lc.meta['kafka']['port']}"
        topic = default_topic(lc.cluster)
        values = asyncio.run(raw_topic(bootstrap, topic, journal_lines, 60))
        assert len(values) >= journal_lines, "the journals' records are not all on the topic"
        for value in values:
            assert not any(s.encode() in value for s in secrets)
