"""Every SQL connection the agent makes, and every statement it runs.

One function opens a connection (``connect``): always with a connect timeout and a server-side
statement_timeout, always mapping a failure to PostgresError. ``Sql.session`` bounds a whole
conversation and maps what goes wrong in it the same way. Nothing else in pgsidecar.postgres
imports psycopg's connect.
"""

# The timeouts are part of this API's contract and are enforced inside.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
from psycopg import sql

from fsm.snapshot import DataState, PgFacts
from pgsidecar.postgres.conf import Conninfo, parse_timeline_history
from pgsidecar.postgres.errors import PostgresError

Connection = psycopg.AsyncConnection[Any]

PROBE_SQL = """
SELECT pg_is_in_recovery(),
       current_setting('data_directory'),
       (SELECT system_identifier FROM pg_control_system())::text,
       CASE WHEN NOT pg_is_in_recovery()
            THEN pg_wal_lsn_diff(pg_current_wal_flush_lsn(), '0/0')::bigint END,
       CASE WHEN NOT pg_is_in_recovery()
            THEN ('x' || substr(pg_walfile_name(pg_current_wal_flush_lsn()), 1, 8))::bit(32)::int END,
       pg_wal_lsn_diff(pg_last_wal_receive_lsn(), '0/0')::bigint,
       pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint,
       (SELECT timeline_id FROM pg_control_checkpoint()),
       (SELECT min_recovery_end_timeline FROM pg_control_recovery()),
       r.status, r.received_tli, r.sender_host, r.sender_port,
       extract(epoch FROM clock_timestamp() - r.last_msg_receipt_time)::float8,
       (SELECT setting::float8 / 1000 FROM pg_settings WHERE name = 'wal_receiver_timeout')
FROM (SELECT 1) AS one LEFT JOIN pg_stat_wal_receiver AS r ON true
"""

# How late a live sender's message may be beyond wal_receiver_timeout / 2 (see stream_alive):
# the walreceiver's 100 ms wake-ups, the round trip, and a loaded machine's scheduling delays.
STREAM_SILENCE_SLACK = 1.0

# the timeline a server writes (primary) or receives (standby) right now; pg_control_checkpoint()
# alone is stale after a promotion until the next checkpoint
CURRENT_TLI_SQL = """
SELECT pg_is_in_recovery(),
       (SELECT timeline_id FROM pg_control_checkpoint()),
       CASE WHEN pg_is_in_recovery()
            THEN (SELECT received_tli FROM pg_stat_wal_receiver)
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END
"""

REPLICATION_SQL = """
SELECT application_name, state, sync_state, flush_lsn - '0/0'::pg_lsn FROM pg_stat_replication
"""


def connect_error(ci: Conninfo, exc: BaseException, timeout: float) -> PostgresError:
    """A failed connection attempt as PostgresError (never the password: it is not in ``ci``)."""
    where = f"{ci.host}:{ci.port} as {ci.user}"
    if isinstance(exc, TimeoutError):
        return PostgresError(f"connecting to {where} timed out after {timeout:g}s")
    return PostgresError(f"cannot connect to {where}: {str(exc).strip() or type(exc).__name__}")


def statement_error(what: str, exc: BaseException, timeout: float) -> PostgresError:
    """A failed statement (or a conversation that ran out of time) as PostgresError."""
    if isinstance(exc, TimeoutError):
        return PostgresError(f"{what} timed out after {timeout:g}s")
    return PostgresError(f"{what} failed: {str(exc).strip() or type(exc).__name__}")


def statement_timeout_option(seconds: float) -> str:
    """libpq ``options`` that set the session's statement_timeout (whole milliseconds, at least
    1: 0 would mean no limit)."""
    if not seconds > 0:
        raise ValueError("every connection carries a statement timeout")
    return f"-c statement_timeout={max(1, round(seconds * 1000))}"


async def connect(
    ci: Conninfo,
    passfile: Path,
    *,
    application_name: str,
    timeout: float,
    statement_timeout: float,
) -> Connection:
    """An autocommit connection to ``ci``, the password from ``passfile``. ``timeout`` bounds the
    connection attempt (libpq's connect_timeout too, in whole seconds, at least 2), and every
    statement on it is bounded by ``statement_timeout`` on the server. Raises PostgresError."""
    dsn = ci.dsn(
        passfile,
        application_name=ci.application_name or application_name,
        connect_timeout=max(2, math.ceil(timeout)),
        options=statement_timeout_option(statement_timeout),
    )
    try:
        return await asyncio.wait_for(
            psycopg.AsyncConnection.connect(dsn, autocommit=True), timeout
        )
    except (TimeoutError, psycopg.Error) as exc:
        raise connect_error(ci, exc, timeout) from None


class Standby(NamedTuple):
    """A row of pg_stat_replication."""

    state: str  # streaming, catchup, ...
    sync_state: str  # async, potential, sync, quorum
    flush_lsn: int


class ReplicationState(NamedTuple):
    """The master's standbys by application_name (= member name), and its own flush position."""

    standbys: dict[str, Standby]
    flush_lsn: int


def stream_alive(status: str | None, msg_age: float | None, receiver_timeout: float | None) -> bool:
    """Is WAL (or a keepalive) still arriving from the sender, judged by what arrived?

    pg_stat_wal_receiver says 'streaming' until wal_receiver_timeout ends the walreceiver, long
    after a partitioned sender went silent. A live link is never silent for long, even with no
    WAL to send: after wal_receiver_timeout / 2 without a message the walreceiver asks the
    sender for a reply, which the sender answers at once (it sends no keepalive of its own
    while our status replies keep arriving). So a last message older than that, plus a slack,
    means the sender is cut off or dead. Both times are on this server's clock. With the
    timeout disabled (0) there is no ping and nothing to judge by: the status alone says."""
    if status != "streaming":
        return False
    if msg_age is None or not receiver_timeout:
        return True
    return msg_age < receiver_timeout / 2 + STREAM_SILENCE_SLACK


def probe_facts(row: Sequence[Any], tli_seen: int) -> tuple[PgFacts, int]:
    """The facts of a running server from PROBE_SQL's row; ``tli_seen`` is the highest timeline
    a standby has received since its postmaster started (returned updated)."""
    (
        in_recovery,
        _data_directory,
        system_id,
        flush_lsn,
        wal_tli,
        received,
        replayed,
        ckpt_tli,
        minrec_tli,
        status,
        received_tli,
        sender_host,
        sender_port,
        msg_age,
        receiver_timeout,
    ) = row
    received = int(received) if received is not None else None
    replayed = int(replayed) if replayed is not None else None
    if in_recovery:
        # pg_stat_wal_receiver has a row only while the receiver runs, and the checkpoint's
        # timeline lags; once a master is gone its replicas must still compare the timeline
        # they had received, so remember the highest one seen since this postmaster started
        tli_seen = max(tli_seen, received_tli or 0)
        timeline = max(tli_seen, ckpt_tli or 0, minrec_tli or 0) or None
        positions = [p for p in (received, replayed) if p is not None]
        lsn = max(positions) if positions else None
    else:
        timeline = wal_tli
        lsn = int(flush_lsn) if flush_lsn is not None else None
    facts = PgFacts(
        data=DataState.STANDBY if in_recovery else DataState.PRIMARY_CRASHED,
        system_id=system_id,
        running=True,
        accepting=True,
        in_recovery=bool(in_recovery),
        timeline=timeline,
        lsn=lsn,
        received_lsn=received,
        replayed_lsn=replayed,
        receiver_streaming=stream_alive(status, msg_age, receiver_timeout),
        receiver_upstream=f"{sender_host}:{sender_port}" if sender_host else None,
    )
    return facts, tli_seen


def role_statements(
    username: str,
    verifier: str,
    *,
    exists: bool,
    replication: bool,
    member_of: Sequence[str] = (),
) -> list[sql.Composed]:
    """The statements that make ``username`` a LOGIN role, never a superuser, with or without
    REPLICATION, whose password is ``verifier`` (a SCRAM verifier, never the password itself),
    and a member of each role in ``member_of``. An existing role is altered to that: a role
    made by hand as a superuser loses it."""
    statements = [
        sql.SQL(
            "{verb} ROLE {name} WITH LOGIN {replication} NOSUPERUSER PASSWORD {verifier}"
        ).format(
            verb=sql.SQL("ALTER" if exists else "CREATE"),
            name=sql.Identifier(username),
            replication=sql.SQL("REPLICATION" if replication else "NOREPLICATION"),
            verifier=sql.Literal(verifier),
        )
    ]
    statements += [
        sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(username))
        for group in member_of
    ]
    return statements


class Sql:
    """The statements the agent runs, on the local server (as the superuser, unless a method
    takes a peer's Conninfo)."""

    def __init__(self, local: Conninfo, passfile: Path, name: str, log: Any) -> None:
        self.local = local
        self.passfile = passfile
        self.name = name
        self.log = log
        self._probe_conn: Connection | None = None
        self._probe_task: asyncio.Future[Any] | None = None  # the query running on it
        self._probe_lock = asyncio.Lock()

    async def connect(
        self, ci: Conninfo | None = None, *, timeout: float = 5.0, statement_timeout: float = 5.0
    ) -> Connection:
        return await connect(
            ci or self.local,
            self.passfile,
            application_name=f"pgsidecar-{self.name}",
            timeout=timeout,
            statement_timeout=statement_timeout,
        )

    @contextlib.asynccontextmanager
    async def session(
        self,
        what: str,
        ci: Conninfo | None = None,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        statement_timeout: float = 10.0,
    ) -> AsyncIterator[Connection]:
        """A connection for one conversation: ``timeout`` bounds it after the connection is made
        (even when the server stops answering mid-transaction), and a psycopg error or the
        timeout leaves it as PostgresError naming ``what``. The connection is closed after."""
        conn = await self.connect(ci, timeout=connect_timeout, statement_timeout=statement_timeout)
        try:
            async with asyncio.timeout(timeout), conn:
                yield conn
        except (TimeoutError, psycopg.Error) as exc:
            raise statement_error(what, exc, timeout) from None

    async def one(
        self, what: str, query: str, params: Sequence[Any] | None = None, *, timeout: float = 10.0
    ) -> tuple[Any, ...] | None:
        """One statement on a fresh local connection; returns its first row (None if none)."""
        async with self.session(
            what, timeout=timeout + 2, connect_timeout=min(timeout, 5.0), statement_timeout=timeout
        ) as conn:
            cur = await conn.execute(query, params)
            return await cur.fetchone() if cur.description else None

    # ------------------------------------------------------------------ the local server

    async def data_directory(self, timeout: float) -> str:
        """Who answers on our port: its data directory (start() checks that it is ours)."""
        async with self.session(
            "SELECT data_directory", timeout=3, connect_timeout=timeout, statement_timeout=2
        ) as conn:
            cur = await conn.execute("SELECT current_setting('data_directory')")
            row = await cur.fetchone()
        if row is None:
            raise PostgresError("SELECT data_directory returned no row")
        return str(row[0])

    async def promote(self, timeout: float) -> bool:
        """Promote a standby and wait until it is writable; False if it already was. pg_promote
        (wait => true) polls every 100 ms; every millisecond here is a millisecond without a
        writable master, so ask without waiting and poll ourselves, every 10 ms."""
        async with self.session("promote", timeout=timeout + 10) as conn:
            cur = await conn.execute("SELECT pg_is_in_recovery()")
            row = await cur.fetchone()
            if row is None or not row[0]:
                return False
            cur = await conn.execute("SELECT pg_promote(false)")
            row = await cur.fetchone()
            if row is None or not row[0]:
                raise PostgresError("pg_promote refused to signal the promotion")
            deadline = time.monotonic() + timeout
            while True:
                cur = await conn.execute("SELECT pg_is_in_recovery()")
                row = await cur.fetchone()
                if row is not None and not row[0]:
                    return True
                if time.monotonic() > deadline:
                    raise PostgresError(f"promotion did not complete within {timeout:g}s")
                await asyncio.sleep(0.01)

    async def reload(self) -> None:
        await self.one("pg_reload_conf", "SELECT pg_reload_conf()")

    async def checkpoint(self, timeout: float) -> None:
        await self.one("CHECKPOINT", "CHECKPOINT", timeout=timeout)

    async def pending_restart_settings(self) -> list[str]:
        """The parameters whose new value in the config files waits for a restart."""
        async with self.session(
            "reading pending_restart", timeout=10, connect_timeout=3, statement_timeout=5
        ) as conn:
            cur = await conn.execute(
                "SELECT name FROM pg_settings WHERE pending_restart ORDER BY name"
            )
            return [str(r[0]) for r in await cur.fetchall()]

    async def replication_state(self) -> ReplicationState:
        """What synchronous replication decides on: the master's standbys (pg_stat_replication)
        and its own flush position, read on one connection."""
        async with self.session(
            "reading pg_stat_replication", timeout=10, connect_timeout=3, statement_timeout=5
        ) as conn:
            cur = await conn.execute(REPLICATION_SQL)
            rows = await cur.fetchall()
            cur = await conn.execute("SELECT pg_current_wal_flush_lsn() - '0/0'::pg_lsn")
            one = await cur.fetchone()
        standbys = {str(r[0]): Standby(str(r[1]), str(r[2]), int(r[3] or 0)) for r in rows}
        return ReplicationState(standbys, int(one[0]) if one and one[0] is not None else 0)

    async def archiver_stats(self) -> tuple[int, float | None, int, float | None]:
        """pg_stat_archiver: WAL files archived, when the last one was (epoch seconds), failed
        attempts, when the last one failed (None: never since the statistics were reset)."""
        row = await self.one(
            "reading pg_stat_archiver",
            "SELECT archived_count, extract(epoch FROM last_archived_time)::float8,"
            " failed_count, extract(epoch FROM last_failed_time)::float8 FROM pg_stat_archiver",
            timeout=5,
        )
        if row is None:
            return 0, None, 0, None
        return int(row[0]), row[1], int(row[2]), row[3]

    async def ensure_role(
        self,
        username: str,
        password: str,
        *,
        replication: bool = True,
        member_of: Sequence[str] = (),
    ) -> bool:
        """Create or update a LOGIN role (see ``role_statements``); True if it was created. The
        password is hashed client-side into a SCRAM verifier (libpq PQencryptPasswordConn), and
        statement logging is off in that transaction, so the password reaches neither the server
        log nor the wire."""
        async with self.session("ensure_roles", timeout=30) as conn, conn.transaction():
            for setting in (
                "SET LOCAL log_statement = 'none'",
                "SET LOCAL log_min_error_statement = 'panic'",
                "SET LOCAL log_min_duration_statement = -1",
                "SET LOCAL log_min_duration_sample = -1",
            ):
                await conn.execute(setting)
            verifier = conn.pgconn.encrypt_password(
                password.encode(), username.encode(), b"scram-sha-256"
            ).decode()
            cur = await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (username,))
            exists = await cur.fetchone() is not None
            for statement in role_statements(
                username, verifier, exists=exists, replication=replication, member_of=member_of
            ):
                await conn.execute(statement)
        return not exists

    async def ensure_slots(self, wanted: set[str], droppable: set[str]) -> set[str]:
        """Create the physical slots ``wanted`` that are missing and drop those of ``droppable``
        that exist. Returns the ones it could not drop (still in use: retried next time)."""
        undropped: set[str] = set()
        async with self.session("ensure_slots", timeout=30) as conn:
            cur = await conn.execute(
                "SELECT slot_name, active_pid FROM pg_replication_slots "
                "WHERE slot_type = 'physical' AND NOT temporary"
            )
            existing = {name: active for name, active in await cur.fetchall()}
            for name in sorted(wanted - existing.keys()):
                try:
                    await conn.execute(
                        "SELECT pg_create_physical_replication_slot(%s, true)", (name,)
                    )
                    self.log.info("pg_slot_created", slot=name)
                except psycopg.errors.DuplicateObject:
                    pass
            for name in sorted(droppable & existing.keys()):
                if not await self._drop_slot(conn, name, existing[name]):
                    undropped.add(name)
        return undropped

    async def _drop_slot(self, conn: Connection, name: str, active_pid: int | None) -> bool:
        for _ in range(20):
            if active_pid:
                # the member left the cluster but its walsender still holds the slot
                await conn.execute("SELECT pg_terminate_backend(%s)", (active_pid,))
            try:
                await conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
                self.log.info("pg_slot_dropped", slot=name)
                return True
            except psycopg.errors.UndefinedObject:
                return True
            except psycopg.errors.ObjectInUse:
                cur = await conn.execute(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (name,)
                )
                row = await cur.fetchone()
                active_pid = row[0] if row else None
                await asyncio.sleep(0.1)
        self.log.warning("pg_slot_drop_failed", slot=name, reason="still active; retried next time")
        return False

    # ------------------------------------------------------------------ the probe

    async def close_probe(self) -> None:
        """Drop the kept probe connection. It may have a probe query running on it: the exit
        watch probes a server that has just died (and so closes the connection) while the probe
        loop still waits for its answer. Closing a psycopg connection frees its libpq connection
        at once, under the query's generator, which goes on reading the freed memory (a
        segfault or a hung agent, seen in the fault suite after a frozen master's fence).
        Such a connection is abandoned instead: the query cancelled, the connection closed once
        the query has let go of it."""
        conn, self._probe_conn = self._probe_conn, None
        task, self._probe_task = self._probe_task, None
        if conn is None:
            return
        if task is not None and not task.done():
            self._abandon(conn, task)
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), 1)

    async def probe_row(self) -> tuple[Any, ...]:
        """PROBE_SQL's row, on a connection kept between probes; raises PostgresError within
        about 3 s whatever the server does."""
        async with self._probe_lock:
            for attempt in (1, 2):
                fresh = self._probe_conn is None or self._probe_conn.closed
                if fresh:
                    self._probe_conn = await self.connect(timeout=2.5, statement_timeout=2)
                conn = self._probe_conn
                assert conn is not None
                task = asyncio.ensure_future(self._probe_exec(conn))
                self._probe_task = task  # close_probe must not close the connection under it
                # not wait_for: cancelling a query makes psycopg send a cancel request and wait
                # for the server (up to 10 s if it is frozen); the probe returns at once instead
                # and leaves that clean-up to the abandoned task
                try:
                    done, _ = await asyncio.wait({task}, timeout=3)
                except asyncio.CancelledError:
                    self._drop_probe(conn, task)
                    raise
                if not done:
                    self._drop_probe(conn, task)
                    raise PostgresError("probe query: no answer within 3s")
                if self._probe_task is task:
                    self._probe_task = None
                if task.cancelled():  # close_probe abandoned it: the server is going away
                    raise PostgresError("probe query: the connection was closed under it")
                try:
                    return task.result()
                except psycopg.Error as exc:
                    await self.close_probe()
                    # a restarted server leaves the kept connection broken: retry once afresh
                    if fresh or attempt == 2:
                        raise statement_error("probe query", exc, 3) from None
        raise AssertionError("unreachable")

    @staticmethod
    async def _probe_exec(conn: Connection) -> tuple[Any, ...]:
        cur = await conn.execute(PROBE_SQL)
        row = await cur.fetchone()
        assert row is not None
        return tuple(row)

    def _drop_probe(self, conn: Connection, task: asyncio.Future[Any]) -> None:
        """Forget ``conn`` (unless close_probe did already) and abandon its running query."""
        if self._probe_conn is conn:
            self._probe_conn = None
        if self._probe_task is task:
            self._probe_task = None
        self._abandon(conn, task)

    @staticmethod
    def _abandon(conn: Connection, task: asyncio.Future[Any]) -> None:
        def finished(t: asyncio.Future[Any]) -> None:
            if not t.cancelled():
                t.exception()  # retrieved: no "exception never retrieved" noise
            with contextlib.suppress(Exception):
                conn.pgconn.finish()

        task.add_done_callback(finished)
        task.cancel()

    # ------------------------------------------------------------------ a peer

    async def checkpoint_if_promoted(self, src: Conninfo, promote_wait: float = 30.0) -> None:
        """PostgreSQL 15's pg_rewind reads the source's timeline from its control file, which a
        promotion updates only at the next checkpoint: without one, pg_rewind says "no rewind
        required" for a target that has forked, or (a source still finishing its promotion,
        whose control file names the timeline of its last restartpoint) writes a minimum
        recovery point on that old timeline, and the rewound standby can never start again
        ("requested timeline N does not contain minimum recovery point ... on timeline M", seen
        in the bench right after a switchover). So wait until the source has left recovery,
        then checkpoint it if its control file is behind its timeline."""
        async with self.session(
            "rewind: checkpoint on the source",
            src,
            timeout=promote_wait + 330,
            connect_timeout=10,
            statement_timeout=300,
        ) as conn:
            loop = asyncio.get_running_loop()
            until = loop.time() + promote_wait
            while True:
                cur = await conn.execute(CURRENT_TLI_SQL)
                row = await cur.fetchone()
                assert row is not None
                in_recovery, ckpt_tli, cur_tli = row
                if not in_recovery:
                    break
                if loop.time() >= until:
                    raise PostgresError(
                        f"the source {src.host}:{src.port} is still in recovery after "
                        f"{promote_wait:.0f} s: not a master to rewind from yet"
                    )
                await asyncio.sleep(0.1)
            if cur_tli is not None and cur_tli != ckpt_tli:
                self.log.info(
                    "pg_rewind_source_checkpoint", source=f"{src.host}:{src.port}", timeline=cur_tli
                )
                await conn.execute("CHECKPOINT")

    async def timeline_history(self, src: Conninfo) -> list[tuple[int, int]]:
        """[(parent_tli, switchpoint_lsn)] of ``src``'s current timeline, oldest first ([] on
        timeline 1)."""
        async with self.session(
            f"reading the timeline history of {src.host}:{src.port}", src, timeout=15
        ) as conn:
            cur = await conn.execute(CURRENT_TLI_SQL)
            row = await cur.fetchone()
            assert row is not None
            tli = row[2] or row[1]
            if not tli or tli <= 1:
                return []
            cur = await conn.execute("SELECT pg_read_file(%s)", (f"pg_wal/{tli:08X}.history",))
            text_row = await cur.fetchone()
        return parse_timeline_history(text_row[0] if text_row else "")
