"""Workloads against a local cluster, shared by the tests and the benchmark: a writer that
records every acknowledged commit (and which server acknowledged it), and a prober that checks
every member for writability to catch two masters at once."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pgsidecar.lab.local import LocalCluster


def multi_host_dsn(lc: LocalCluster) -> str:
    hosts = ",".join("127.0.0.1" for _ in lc.members)
    ports = ",".join(str(m.pg_port) for m in lc.members)
    return (
        f"host={hosts} port={ports} user=postgres dbname=postgres passfile={lc.dir / 'pgpass'} "
        f"target_session_attrs=read-write connect_timeout=2"
    )


def write_until_stopped(
    stop: threading.Event,
    connect: Callable[[], psycopg.Connection[Any]],
    write: Callable[[psycopg.Connection[Any]], None],
    failed: Callable[[Exception], None],
    *,
    error_pause: float,
    pause: float = 0.005,
) -> None:
    """A client's loop: ``write`` over one connection again and again, ``pause`` apart, until
    ``stop`` is set. After an error (PostgreSQL's or the socket's), ``failed`` is told, the
    connection is dropped and the next attempt, ``error_pause`` later, makes a new one: as a
    pooled client reconnects through a failover. The last connection is closed at the end."""
    conn: psycopg.Connection[Any] | None = None
    while not stop.is_set():
        try:
            if conn is None:
                conn = connect()
            write(conn)
        except (psycopg.Error, OSError) as exc:
            failed(exc)
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            conn = None
            time.sleep(error_pause)
        time.sleep(pause)
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()


@dataclass
class Writer:
    """Inserts sequential ids through a multi-host read-write DSN; remembers each id whose COMMIT
    was acknowledged, and by which server (inet_server_port)."""

    lc: LocalCluster
    acked: dict[int, int] = field(default_factory=dict)
    # when each acknowledged id's COMMIT returned (monotonic): how old a lost write was
    acked_at: dict[int, float] = field(default_factory=dict)
    errors: int = 0
    first_ok_after: dict[float, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    last_ok: float = 0.0
    ok_times: list[float] = field(default_factory=list)
    ok_ports: list[int] = field(default_factory=list)
    _next_id: int = 1

    def start(self) -> Writer:
        with psycopg.connect(self.lc.dsn(self.lc.master() or "pg1"), autocommit=True) as c:
            c.execute("CREATE TABLE IF NOT EXISTS writes (id bigint PRIMARY KEY, port int)")
            # start after the ids an earlier writer left: from 1, every one of them was a
            # refused duplicate first, seconds of writes that never counted (a bench's second
            # scenario measured that churn, or nothing at all within its bound)
            row = c.execute("SELECT coalesce(max(id), 0) FROM writes").fetchone()
            self._next_id = int(row[0]) + 1 if row is not None else 1
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        write_until_stopped(self._stop, self._connect, self._write, self._failed, error_pause=0.02)

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(multi_host_dsn(self.lc), autocommit=True)
        conn.execute("SET statement_timeout = '2s'")
        return conn

    def _write(self, conn: psycopg.Connection[Any]) -> None:
        try:
            row = conn.execute(
                "INSERT INTO writes VALUES (%s, inet_server_port()) RETURNING port",
                (self._next_id,),
            ).fetchone()
        except psycopg.errors.UniqueViolation:
            # the previous attempt committed but its ack was lost: it is not acknowledged,
            # move on to the next id
            self._next_id += 1
            return
        assert row is not None
        self.acked[self._next_id] = int(row[0])
        now = time.monotonic()
        self.acked_at[self._next_id] = now
        self.ok_ports.append(int(row[0]))
        self.ok_times.append(now)
        self.last_ok = now
        self._next_id += 1

    def _failed(self, _exc: Exception) -> None:
        self.errors += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def first_write_after(self, t: float, not_port: int | None = None) -> float | None:
        """Time of the first acknowledged write after ``t`` (on a server other than
        ``not_port`` if given: the first write on the new master)."""
        for x, port in zip(list(self.ok_times), list(self.ok_ports), strict=False):
            if x > t and port != not_port:
                return x
        return None

    def lost(self, lc: LocalCluster) -> list[int]:
        """Acknowledged ids missing on the current master."""
        deadline = time.monotonic() + 30
        master = lc.master()
        while master is None and time.monotonic() < deadline:
            time.sleep(0.1)
            master = lc.master()
        if master is None:
            raise RuntimeError("no master to check the writes on")
        with psycopg.connect(lc.dsn(master)) as c:
            present = {r[0] for r in c.execute("SELECT id FROM writes").fetchall()}
        return sorted(set(self.acked) - present)


@dataclass
class Prober:
    """Every ~50 ms, tries a write on every member at once (a thread each) and records the rounds
    in which two or more members committed: moments with two writable masters."""

    lc: LocalCluster
    rounds: int = 0
    double_writable: list[tuple[float, list[str]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Prober:
        with psycopg.connect(self.lc.dsn(self.lc.master() or "pg1"), autocommit=True) as c:
            c.execute("CREATE TABLE IF NOT EXISTS probe (member text, t double precision)")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _try(self, name: str, out: dict[str, bool]) -> None:
        try:
            dsn = self.lc.dsn(name).replace("connect_timeout=3", "connect_timeout=1")
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("SET statement_timeout = '1s'")
                c.execute("INSERT INTO probe VALUES (%s, extract(epoch from now()))", (name,))
                out[name] = True
        except (psycopg.Error, OSError):
            out[name] = False

    def _run(self) -> None:
        while not self._stop.is_set():
            out: dict[str, bool] = {}
            ts = [threading.Thread(target=self._try, args=(m.name, out)) for m in self.lc.members]
            for t in ts:
                t.start()
            for t in ts:
                t.join(timeout=5)
            self.rounds += 1
            ok = sorted(n for n, v in out.items() if v)
            if len(ok) > 1:
                self.double_writable.append((time.time(), ok))
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


@dataclass
class MemberWriters:
    """What a client sees of a switchover: one writer per member, each on one persistent
    connection straight to its member (no multi-host DSN, no target_session_attrs), committing
    every ``interval`` and retrying at once on error (reconnecting if the connection is gone).
    A replica refuses every write; the master acknowledges. The longest window with no
    acknowledged commit on any member is the outage a client sees, whatever its driver."""

    lc: LocalCluster
    interval: float = 0.005
    acked: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, port)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> MemberWriters:
        master = self.lc.master() or self.lc.members[0].name
        with psycopg.connect(self.lc.dsn(master), autocommit=True) as c:
            c.execute("CREATE TABLE IF NOT EXISTS client_writes (t double precision, port int)")
        for m in self.lc.members:
            t = threading.Thread(target=self._run, args=(m.name, m.pg_port), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _run(self, name: str, port: int) -> None:
        conn = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(
                        self.lc.dsn(name) + " connect_timeout=1", autocommit=True
                    )
                    conn.execute("SET statement_timeout = '2s'")
                conn.execute(
                    "INSERT INTO client_writes VALUES (extract(epoch from now()), %s)", (port,)
                )
                now = time.monotonic()
                with self._lock:
                    self.acked.append((now, port))
            except psycopg.errors.ReadOnlySqlTransaction:
                pass  # a replica (or a master that is demoting): the connection stays
            except (psycopg.Error, OSError):
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
            self._stop.wait(self.interval)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)

    def longest_gap(self, start: float, end: float) -> tuple[float, float, float]:
        """(seconds, from, to): the longest window in [start, end] with no acknowledged commit on
        any member (times are monotonic)."""
        with self._lock:
            times = sorted(t for t, _ in self.acked if start <= t <= end)
        best = (0.0, start, start)
        for a, b in zip(times, times[1:], strict=False):
            if b - a > best[0]:
                best = (b - a, a, b)
        return best
