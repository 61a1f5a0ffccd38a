"""PgBouncer (Debian's) in front of a real local cluster, configured as the Helm chart configures
it (deploy/helm/pgsidecar: the [pgbouncer] settings of its pgbouncer.ini, transaction pooling,
SCRAM pass-through from a userlist of verifiers) and pointing, as the chart points at the
<cluster>-primary Service, at what follows the master: HAProxy's read-write port with the shipped
deploy/haproxy/haproxy.cfg. A client writes through PgBouncer, reconnecting after every error,
through a switchover and then a hard kill of the new master (synchronous mode on, so that an
acknowledged commit must survive it). Each time, writes go on through PgBouncer on the new
master, and at the end every acknowledged write is on the last master."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from pgsidecar.lab.haproxy import running_haproxy
from pgsidecar.lab.workload import write_until_stopped
from pgsidecar.procutil import free_port, os_user_ids, terminate
from tests.support.clusterutil import local_cluster, new_master, wait_for

pytestmark = pytest.mark.integration

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "pgsidecar"
TTL = 5.0


def chart_pgbouncer_settings() -> dict[str, str]:
    """The [pgbouncer] section of the chart's pgbouncer.ini (templates/_helpers.tpl), its values
    from the chart's values.yaml: the settings under test are the ones users get."""
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    body = re.search(r'define "pgsidecar.pgbouncerIni" -}}\n(.*?)\{\{- end', helpers, re.S)
    assert body is not None, "the chart defines pgsidecar.pgbouncerIni"
    values = yaml.safe_load((CHART / "values.yaml").read_text())["pgbouncer"]
    text = re.sub(
        r"\{\{ \.Values\.pgbouncer\.(\w+) \}\}", lambda m: str(values[m.group(1)]), body.group(1)
    )
    section = text.split("[pgbouncer]", 1)[1]
    assert "{{" not in section, f"a template expression the test does not fill in: {section}"
    settings = {}
    for line in section.splitlines():
        line = line.strip()
        if line and not line.startswith(";"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


@contextlib.contextmanager
def running_pgbouncer(target_port: int, verifier: str) -> Iterator[int]:
    """PgBouncer as the OS user PostgreSQL runs as (it refuses root), in a temp dir, on a free
    port, forwarding every database to 127.0.0.1:target_port; stopped and reaped by pid."""
    d = Path(tempfile.mkdtemp(prefix="pgsc-pgbouncer-", dir="/tmp"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        port = free_port()
        settings = chart_pgbouncer_settings()
        settings.update(
            listen_addr="127.0.0.1",
            listen_port=str(port),
            auth_file=str(d / "userlist.txt"),
            logfile=str(d / "pgbouncer.log"),
        )
        (d / "userlist.txt").write_text(f'"postgres" "{verifier}"\n')
        ini = f"[databases]\n* = host=127.0.0.1 port={target_port}\n\n[pgbouncer]\n" + "".join(
            f"{k} = {v}\n" for k, v in settings.items()
        )
        (d / "pgbouncer.ini").write_text(ini)
        argv = [PGBOUNCER, str(d / "pgbouncer.ini")]
        if os.geteuid() == 0:
            uid, gid = os_user_ids("postgres")
            for p in (d, *d.iterdir()):
                os.chown(p, uid, gid)
            setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
            argv = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--", *argv]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def listening() -> bool:
            assert proc is not None and proc.poll() is None, (d / "pgbouncer.log").read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                return True
            return False

        wait_for(listening, 15, what="PgBouncer listening")
        yield port
    finally:
        if proc is not None:
            terminate(proc.pid, signal.SIGTERM, timeout=10)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class PooledWriter:
    """Inserts numbered rows through PgBouncer, one transaction each, reconnecting after every
    error as an application would; remembers each acknowledged id and the PostgreSQL port
    (which member) that committed it."""

    dsn: str
    acked: list[tuple[float, int, int]] = field(default_factory=list)  # (time, id, pg port)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _attempts: int = 0

    def start(self) -> PooledWriter:
        self._thread = threading.Thread(target=self._run, name="pooled-writer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        write_until_stopped(
            self._stop, self._connect, self._write, self._failed, error_pause=0.05, pause=0.01
        )

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.dsn, autocommit=True)
        conn.prepare_threshold = None  # transaction pooling: no named statements
        return conn

    def _write(self, conn: psycopg.Connection[Any]) -> None:
        # a fresh id for every attempt: one whose commit was acknowledged but whose answer was
        # lost is not reused
        self._attempts += 1
        n = self._attempts
        row = conn.execute(
            "INSERT INTO pooled_writes (id) VALUES (%s) RETURNING inet_server_port()", (n,)
        ).fetchone()
        assert row is not None
        self.acked.append((time.monotonic(), n, int(row[0])))

    def _failed(self, exc: Exception) -> None:
        self.errors.append(type(exc).__name__)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def committed_on(self, port: int, after: float) -> bool:
        return any(t > after and p == port for t, _, p in list(self.acked))


def pg_port(lc: object, name: str) -> int:
    return int(lc.member(name).pg_port)  # type: ignore[attr-defined]


@pytest.mark.skipif(not os.path.exists(PGBOUNCER), reason="Debian's pgbouncer is not installed")
def test_clients_through_pgbouncer_follow_the_master_and_lose_no_acknowledged_write() -> None:
    extra = {"settings.synchronous_mode": "on"}
    with local_cluster(ttl=TTL, extra=extra) as lc, running_haproxy(lc) as hp:
        lc.wait_sync()
        first = lc.master()
        assert first is not None
        with psycopg.connect(lc.dsn(first), autocommit=True) as c:
            c.execute("CREATE TABLE pooled_writes (id int PRIMARY KEY)")
            row = c.execute(
                "SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'"
            ).fetchone()
        assert row is not None and str(row[0]).startswith("SCRAM-SHA-256$")
        hp.wait_routes(hp.rw_port, pg_port(lc, first))
        with running_pgbouncer(hp.rw_port, str(row[0])) as port:
            dsn = (
                f"host=127.0.0.1 port={port} user=postgres dbname=postgres "
                f"passfile={lc.dir / 'pgpass'} connect_timeout=3"
            )
            w = PooledWriter(dsn).start()
            try:
                wait_for(
                    lambda: w.committed_on(pg_port(lc, first), 0), 20, what="writes via PgBouncer"
                )

                # a switchover, the path `pgsidecar switchover` takes
                t0 = time.monotonic()
                sw = subprocess.run(
                    [sys.executable, "-m", "pgsidecar", "switchover", "--dir", str(lc.dir), "--wait", "30"],
                    capture_output=True, text=True, timeout=60,
                )  # fmt: skip
                assert sw.returncode == 0, sw.stdout + sw.stderr
                second = wait_for(lambda: new_master(lc, first), 30, what="a new master")
                wait_for(
                    lambda: w.committed_on(pg_port(lc, second), t0),
                    30,
                    what=f"writes through PgBouncer on {second} after the switchover",
                )

                # a hard kill of that master (agent and PostgreSQL, SIGKILL)
                wait_for(lambda: lc.wait_sync(), 60, what="a synchronous standby again")
                t1 = time.monotonic()
                lc.kill_member(second)
                third = wait_for(
                    lambda: new_master(lc, second), TTL * 4, what="a master after the kill"
                )
                wait_for(
                    lambda: w.committed_on(pg_port(lc, third), t1),
                    30,
                    what=f"writes through PgBouncer on {third} after the hard kill",
                )
            finally:
                w.stop()
            acked = {i for _, i, _ in w.acked}
            with psycopg.connect(lc.dsn(third), autocommit=True) as c:
                present = {r[0] for r in c.execute("SELECT id FROM pooled_writes")}
            lost = sorted(acked - present)
            assert lost == [], f"{len(lost)} acknowledged writes missing on {third}: {lost[:20]}"
            assert len(acked) > 50, f"too few writes to mean anything: {len(acked)}"
            # one pooler address, three masters behind it (in transaction pooling a client
            # between transactions does not even see the move: PgBouncer holds its next query
            # until a server connection to the new master is up)
            ports = {p for _, _, p in w.acked}
            assert {pg_port(lc, first), pg_port(lc, second), pg_port(lc, third)} <= ports
