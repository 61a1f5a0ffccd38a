"""HAProxy in front of a local cluster, with deploy/haproxy/haproxy.cfg as shipped: the tests
and the benchmark run the very file operators use, its addresses set through the environment
variables it reads (PGSC_PG<i>_ADDR, PGSC_PG<i>_API_PORT, PGSC_*_BIND).

``measure_haproxy_failover(lc)`` is the benchmark's figure: seconds from SIGTERM of the master's
agent to the first write committed through HAProxy's read-write port on the new master.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from pgsidecar.lab.local import LocalCluster
from pgsidecar.lab.workload import write_until_stopped
from pgsidecar.procutil import die_with_parent, free_port_range, terminate

HAPROXY_CFG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg"
# the shipped config has a server line for members 0..2
MAX_MEMBERS = 3


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None
    )


def check_tls_options(ca_file: Path | None, client_pem: Path | None = None) -> str:
    """The server options (PGSC_API_CHECK_TLS of the shipped config) that make HAProxy's health
    checks speak TLS to the agents' API and verify it against ``ca_file``; empty for plain
    HTTP."""
    if ca_file is None:
        return ""
    options = f"check-ssl verify required ca-file {ca_file}"
    if client_pem is not None:
        options += f" crt {client_pem}"
    return options


@dataclass
class HAProxy:
    """One HAProxy process (our child) on free loopback ports."""

    lc: LocalCluster
    rw_port: int = 0
    ro_port: int = 0
    stats_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    # the agents' API over TLS: the CA HAProxy verifies it with and, when the agents require a
    # client certificate, the certificate and key in one PEM file
    api_ca_file: Path | None = None
    api_client_pem: Path | None = None

    def env(self) -> dict[str, str]:
        members = self.lc.members
        if not 0 < len(members) <= MAX_MEMBERS:
            raise ValueError(
                f"{HAPROXY_CFG} has server lines for {MAX_MEMBERS} members; the cluster has {len(members)}"
            )
        env = {
            "PGSC_RW_BIND": f"127.0.0.1:{self.rw_port}",
            "PGSC_RO_BIND": f"127.0.0.1:{self.ro_port}",
            "PGSC_STATS_BIND": f"127.0.0.1:{self.stats_port}",
            "PGSC_API_CHECK_TLS": check_tls_options(*self._api_tls()),
        }
        for i in range(MAX_MEMBERS):
            if i < len(members):
                m = members[i]
                env[f"PGSC_PG{i}_ADDR"] = f"127.0.0.1:{m.pg_port}"
                env[f"PGSC_PG{i}_API_PORT"] = str(m.api_port)
            else:
                # a closed port: the server line stays, always down
                env[f"PGSC_PG{i}_ADDR"] = "127.0.0.1:1"
                env[f"PGSC_PG{i}_API_PORT"] = "1"
        return env

    def _api_tls(self) -> tuple[Path | None, Path | None]:
        """The CA and client certificate of the checks: as given, else those of a cluster
        brought up with ``--tls`` (its API requires client certificates)."""
        if self.api_ca_file is not None:
            return self.api_ca_file, self.api_client_pem
        material = getattr(self.lc, "tls_material", None)
        if material is None:
            return None, None
        return material.ca_cert, material.directory / "client.pem"

    def start(self) -> HAProxy:
        binary = haproxy_binary()
        if binary is None:
            raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
        if not HAPROXY_CFG.exists():
            raise RuntimeError(f"{HAPROXY_CFG} not found: run from a source checkout")
        base = free_port_range(3)
        self.rw_port, self.ro_port, self.stats_port = base, base + 1, base + 2
        env = {**os.environ, **self.env()}
        check = subprocess.run(
            [binary, "-c", "-q", "-f", str(HAPROXY_CFG)],
            env=env,
            capture_output=True,
            text=True,
            timeout=15,
        )
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c refused {HAPROXY_CFG}:\n{check.stdout}{check.stderr}")
        fd, name = tempfile.mkstemp(prefix="pgsidecar-haproxy-", suffix=".log")
        self.log_path = Path(name)
        with os.fdopen(fd, "ab") as log:
            # -db: foreground, no daemon: it stays our child and we stop it by pid
            self.proc = subprocess.Popen(
                [binary, "-db", "-f", str(HAPROXY_CFG)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        self.wait_checked()
        return self

    def stats(self) -> list[dict[str, str]]:
        """HAProxy's stats as CSV rows (one per frontend, backend and server)."""
        import csv
        import io
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/;csv", timeout=2) as r:
            text = r.read().decode().lstrip("# ")
        return list(csv.DictReader(io.StringIO(text)))

    def wait_checked(self, timeout: float = 15.0) -> None:
        """Until every server has had its first health check. HAProxy 2.6 counts a server as up
        until its first check says otherwise, so until then a connection could reach any member
        (a write sent to a replica would fail, read-only; nothing worse)."""
        deadline = time.monotonic() + timeout
        pending: list[str] = ["(stats not answering)"]
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited at start:\n{self.log_tail()}")
            try:
                rows = self.stats()
            except OSError:
                time.sleep(0.05)
                continue
            servers = [r for r in rows if r.get("svname") not in ("FRONTEND", "BACKEND")]
            pending = [
                f"{r['pxname']}/{r['svname']}"
                for r in servers
                if r.get("pxname") != "stats" and r.get("check_status", "").startswith("INI")
            ]
            if servers and not pending:
                return
            time.sleep(0.05)
        raise RuntimeError(f"haproxy did not check {', '.join(pending)} within {timeout:g} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        terminate(proc.pid, signal.SIGTERM, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
            proc.wait(timeout=5)

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None:
            return "(not started)"
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def dsn(self, port: int, timeout: float = 1.0) -> str:
        return (
            f"host=127.0.0.1 port={port} user=postgres dbname=postgres "
            f"passfile={self.lc.dir / 'pgpass'} connect_timeout={max(1, int(timeout))}"
        )

    def server_behind(self, port: int) -> tuple[int, bool] | None:
        """(PostgreSQL port, in recovery) of the server a new connection through ``port``
        reaches, or None if HAProxy has none to offer."""
        try:
            with psycopg.connect(self.dsn(port), autocommit=True) as c:
                row = c.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone()
        except (psycopg.Error, OSError):
            return None
        return None if row is None else (int(row[0]), bool(row[1]))

    def wait_routes(
        self, port: int, want_pg_port: int | None, timeout: float = 20.0
    ) -> tuple[int, bool]:
        """Until a new connection through ``port`` reaches a server (``want_pg_port`` if given)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.server_behind(port)
            if last is not None and (want_pg_port is None or last[0] == want_pg_port):
                return last
            time.sleep(0.05)
        raise RuntimeError(
            f"port {port} did not route to {want_pg_port or 'any server'} within {timeout:g} s "
            f"(last: {last}); haproxy log:\n{self.log_tail()}"
        )

    def close(self) -> None:
        self.stop()
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()


@contextlib.contextmanager
def running_haproxy(lc: LocalCluster) -> Iterator[HAProxy]:
    hp = HAProxy(lc)
    try:
        yield hp.start()
    finally:
        hp.close()


@dataclass
class HAProxyWriter:
    """Inserts through HAProxy's read-write port, reconnecting after every error as a pooled
    client would, and remembers (time, server port) of each acknowledged commit."""

    hp: HAProxy
    acked: list[tuple[float, int]] = field(default_factory=list)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> HAProxyWriter:
        with psycopg.connect(self.hp.dsn(self.hp.rw_port, 3), autocommit=True) as c:
            c.execute("CREATE TABLE IF NOT EXISTS haproxy_writes (t double precision, port int)")
        self._thread = threading.Thread(target=self._run, name="haproxy-writer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        write_until_stopped(self._stop, self._connect, self._write, self._failed, error_pause=0.01)

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.hp.dsn(self.hp.rw_port), autocommit=True)
        conn.execute("SET statement_timeout = '1s'")
        return conn

    def _write(self, conn: psycopg.Connection[Any]) -> None:
        row = conn.execute(
            "INSERT INTO haproxy_writes VALUES (extract(epoch from now()), "
            "inet_server_port()) RETURNING port"
        ).fetchone()
        assert row is not None
        self.acked.append((time.monotonic(), int(row[0])))

    def _failed(self, _exc: Exception) -> None:
        self.errors += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def first_after(self, t0: float, not_port: int) -> tuple[float, int] | None:
        for t, port in list(self.acked):
            if t > t0 and port != not_port:
                return t, port
        return None


@dataclass
class FailoverResult:
    old_master: str
    new_master: str
    seconds: float  # SIGTERM of the old master's agent -> first write through HAProxy
    new_master_port: int
    errors: int
    t0: float  # monotonic time of the SIGTERM, to compare with other observers


def haproxy_failover(lc: LocalCluster, hp: HAProxy, timeout: float = 30.0) -> FailoverResult:
    """Stop the master's agent (SIGTERM, as a pod deletion does) while a client writes through
    ``hp``'s read-write port; measure until a write commits on another server."""
    old = lc.master()
    if old is None:
        raise RuntimeError("the cluster has no master")
    old_port = lc.member(old).pg_port
    hp.wait_routes(hp.rw_port, old_port)
    w = HAProxyWriter(hp).start()
    stopper: threading.Thread | None = None
    try:
        deadline = time.monotonic() + 10
        while not w.acked and time.monotonic() < deadline:
            time.sleep(0.01)
        if not w.acked:
            raise RuntimeError(
                f"no write went through HAProxy before the failover:\n{hp.log_tail()}"
            )
        t0 = time.monotonic()
        # stop_member sends SIGTERM and waits for the agent's hand-off and exit: in a thread,
        # so the clock runs from the signal, not from the end of the hand-off
        stopper = threading.Thread(target=lc.stop_member, args=(old,), daemon=True)
        stopper.start()
        end = t0 + timeout
        first = None
        while first is None and time.monotonic() < end:
            first = w.first_after(t0, old_port)
            time.sleep(0.005)
        if first is None:
            raise RuntimeError(
                f"no write through HAProxy on a new master within {timeout:g} s:\n{hp.log_tail()}"
            )
        new = next(m.name for m in lc.members if m.pg_port == first[1])
        return FailoverResult(old, new, first[0] - t0, first[1], w.errors, t0)
    finally:
        w.stop()
        if stopper is not None:
            stopper.join(timeout=90)


def measure_haproxy_failover(lc: LocalCluster) -> float:
    """For the benchmark: seconds from SIGTERM of the master's agent to the first write through
    HAProxy's read-write port on the new master. The old master's agent stays stopped: the
    caller starts it again (``lc.start_member``) when it needs the cluster whole."""
    with running_haproxy(lc) as hp:
        return haproxy_failover(lc, hp).seconds
