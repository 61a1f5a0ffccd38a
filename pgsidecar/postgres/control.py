"""Everything the agent does to its local PostgreSQL, as one async API.

``PostgresControl`` composes the parts, one job each, and adds only what needs more than one of
them (starting = spawning + seeing the server answer as ours; the probe; rewind's recovery of an
unclean target; the record of the slots it made):

* ``process.Postmaster``: the postmaster as the agent's child (parent-death signal, pidfd, fence).
* ``config.ConfigFiles``: postgresql.conf, pg_hba.conf, standby.signal, the passfile.
* ``dataops.DataOps``: pg_controldata, initdb, pg_basebackup, pg_rewind, wiping the data.
* ``sql.Sql``: every SQL connection (timeouts, errors as PostgresError) and every statement.
* ``osuser.OsUser``: the OS user all of it runs as.
* ``serverlog.ServerLog``: where the server's log goes (the agent's stderr, or a rotated file).
"""

# The timeouts are part of this API's contract (the agent passes its own budgets per step), and
# each is enforced inside, so ASYNC109 does not apply here.
# ruff: noqa: ASYNC109

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

from events.rotation import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES
from fsm.snapshot import DataState, PgFacts
from pgsidecar.config import ConfigError, PostgresSettings, slot_name
from pgsidecar.postgres.conf import Conninfo, local_host
from pgsidecar.postgres.config import ConfigFiles
from pgsidecar.postgres.dataops import ControlData, DataOps
from pgsidecar.postgres.errors import PostgresError
from pgsidecar.postgres.osuser import OsUser
from pgsidecar.postgres.process import Postmaster
from pgsidecar.postgres.serverlog import ServerLog
from pgsidecar.postgres.sql import ReplicationState, Sql, probe_facts
from pgsidecar.postgres.tls import PostgresTlsFiles

__all__ = ["Conninfo", "ControlData", "PostgresControl", "PostgresError", "ReplicationState"]


class PostgresControl:
    def __init__(
        self,
        settings: PostgresSettings,
        state_dir: Path,
        name: str,
        log: Any,
        *,
        cluster: str | None = None,
        log_max_bytes: int = DEFAULT_MAX_BYTES,
        log_backups: int = DEFAULT_BACKUPS,
    ) -> None:
        self.settings = settings
        self.state_dir = Path(state_dir)
        self.name = name
        self.log = log
        self.data_dir = Path(settings.data_dir)
        self.bin_dir = Path(settings.bin_dir)
        self.passfile = self.state_dir / "pgpass"
        # the server log in log_destination "file" (rotated: postgresql.log.1 ...)
        self.log_path = self.state_dir / "postgresql.log"
        # slots this agent created for members: ensure_slots() drops only these
        self.slots_path = self.state_dir / "replication_slots.json"

        self.osuser = OsUser(settings.os_user, self.passfile, log)
        self.tls = PostgresTlsFiles(settings, self.state_dir, self.osuser)
        self.server_log = ServerLog(
            settings.log_destination,
            member=name,
            cluster=cluster,
            path=self.log_path,
            max_bytes=log_max_bytes,
            backups=log_backups,
            secrets=_passwords(settings),
        )
        self.postmaster = Postmaster(
            self.data_dir, self.bin_dir, self.server_log, settings.stop_timeout, self.osuser, log
        )
        self.config_files = ConfigFiles(
            settings, name, self.data_dir, self.state_dir, self.passfile, self.osuser, log
        )
        self.dataops = DataOps(
            settings,
            name,
            self.data_dir,
            self.state_dir,
            self.passfile,
            self.server_log,
            self.osuser,
            log,
        )
        self.sql = Sql(self.superuser_conninfo(), self.passfile, name, log)
        # the highest timeline a standby received since its postmaster started (see probe_facts)
        self._standby_tli_seen = 0

    # ------------------------------------------------------------------ identities, files

    def superuser_conninfo(self, host: str | None = None, port: int | None = None) -> Conninfo:
        return self._conninfo(
            host or local_host(self.settings.listen),
            port or self.settings.port,
            self.settings.superuser.username,
        )

    def replication_conninfo(self, host: str, port: int) -> Conninfo:
        return self._conninfo(host, port, self.settings.replication.username)

    def _conninfo(self, host: str, port: int, user: str) -> Conninfo:
        tls = self.tls.client_options(host)  # empty with postgresql.tls off
        return Conninfo(
            host=host,
            port=port,
            user=user,
            sslmode=tls.get("sslmode"),
            sslrootcert=tls.get("sslrootcert"),
            require_auth=tls.get("require_auth"),
        )

    def write_passfile(self) -> None:
        self.config_files.write_passfile()

    def write_config(
        self,
        role: Literal["primary", "standby"],
        upstream: Conninfo | None,
        slot: str | None,
        parameters: dict[str, Any] | None = None,
    ) -> None:
        self.config_files.write(role, upstream, slot, parameters)

    # ------------------------------------------------------------------ the data directory

    async def controldata(self, timeout: float = 30.0) -> ControlData:
        return await self.dataops.controldata(timeout)

    async def initdb(self, timeout: float = 300.0) -> None:
        if self.running:
            raise PostgresError("initdb: PostgreSQL is running")
        await self.dataops.initdb(timeout)

    async def basebackup(self, source: Conninfo, timeout: float = 3600.0) -> None:
        """Clone ``source`` into the empty data dir, as the replication user. No -R: the agent
        writes the recovery settings itself (write_config). A failure leaves the dir empty."""
        if self.running:
            raise PostgresError("basebackup: PostgreSQL is running")
        await self.dataops.basebackup(source, timeout)

    def next_timeline(self, current: int) -> int:
        return self.dataops.next_timeline(current)

    def reserve_timelines(self, current: int, new: int) -> list[int]:
        return self.dataops.reserve_timelines(current, new)

    async def wipe_data(self) -> None:
        if self.running:
            raise PostgresError("wipe_data: PostgreSQL is running")
        await self.dataops.wipe()
        self.log.warning("pg_data_wiped", data_dir=str(self.data_dir))

    async def rewind(self, source: Conninfo, timeout: float = 3600.0) -> str:
        """Make a stopped former primary (or a diverged standby) follow ``source``.
        Returns "rewound" or "not_needed". Connects as the superuser whatever ``source.user``.
        An uncleanly stopped target is recovered first: a former primary in single-user mode, a
        standby by a brief start/stop as a standby without upstream (so start()/stop() log and
        the postmaster runs for a moment). Either way the agent rewrites the config afterwards."""
        if self.running:
            raise PostgresError("rewind: PostgreSQL must be stopped first")
        src = dataclasses.replace(source, user=self.settings.superuser.username)
        cd = await self.controldata()
        if cd.data_state in (DataState.MISSING, DataState.INVALID):
            raise PostgresError(f"rewind: data directory is {cd.data_state.value}; reclone instead")
        if not cd.clean:
            # pg_rewind only works on a cleanly shut down target
            if cd.data_state == DataState.STANDBY:
                await self._standby_recovery(cd.cluster_state, timeout)
            else:
                # single-user mode cannot run in standby mode, and the agent rewrites the
                # signal files with write_config() after the rewind anyway
                self.config_files.remove_signal_files()
                await self.dataops.single_user_recovery(cd.cluster_state, timeout)
                after = await self.controldata()
                if not after.clean:
                    raise PostgresError(
                        f"crash recovery left the cluster {after.cluster_state!r}, not shut down"
                    )
        try:
            await self.sql.checkpoint_if_promoted(src)
        except PostgresError as exc:
            raise PostgresError(f"rewind: {exc}") from None
        return await self.dataops.pg_rewind(src, timeout)

    async def _standby_recovery(self, state: str | None, timeout: float) -> None:
        """Bring a crashed standby to "shut down in recovery" without writing WAL: start it as a
        standby with no upstream (it replays only its own WAL) until consistent, then stop it.
        Single-user mode would end recovery with a checkpoint record appended to the local WAL,
        which the upstream does not have: the standby would then diverge from it."""
        self.log.info("pg_standby_recovery", cluster_state=state)
        self.write_config("standby", None, None)
        await self.start(min(timeout, 600.0))
        await self.stop("fast")
        cd = await self.controldata()
        if not cd.clean:
            raise PostgresError(f"standby recovery left the cluster {cd.cluster_state!r}")

    # ------------------------------------------------------------------ the postmaster

    @property
    def running(self) -> bool:
        return self.postmaster.running

    @property
    def postmaster_pid(self) -> int | None:
        return self.postmaster.pid

    async def start(self, timeout: float) -> None:
        if not self.running:
            self._standby_tli_seen = 0  # a new postmaster (maybe after a rewind): forget the old
        await self.postmaster.start(timeout, self._answers_as_ours)

    async def _answers_as_ours(self, timeout: float) -> None:
        # whoever answers on our port must be our postmaster, not another instance that holds
        # the port (ours would then fail to bind and exit)
        data_directory = await self.sql.data_directory(timeout)
        if not self.postmaster.is_our_data_dir(data_directory):
            raise PostgresError(f"another server ({data_directory}) answers on our port")

    async def wait_exit(self) -> int:
        """Resolves with the return code (negative = killed by that signal) when the postmaster
        started by start() exits; at once if it already has."""
        return await self.postmaster.wait_exit()

    def fence(self) -> bool:
        """SIGQUIT the postmaster (immediate shutdown: no more writes). Synchronous and
        thread-safe: the fencing watchdog calls it while the event loop may be stuck."""
        return self.postmaster.fence()

    async def stop(
        self, mode: Literal["fast", "immediate"] = "fast", timeout: float | None = None
    ) -> None:
        await self.sql.close_probe()
        await self.postmaster.stop(mode, timeout)

    def close_server_log(self) -> None:
        """Release the server log's pipe (its threads end once no server process holds it);
        for a PostgresControl that is done with, not needed at the agent's exit."""
        self.server_log.close()

    # ------------------------------------------------------------------ SQL

    async def promote(self, timeout: float = 30) -> None:
        if await self.sql.promote(timeout):
            self.log.info("pg_promoted")
        else:
            self.log.info("pg_promote_not_needed")

    async def reload(self) -> None:
        await self.sql.reload()
        self.log.info("pg_reloaded")

    async def checkpoint(self, timeout: float = 300.0) -> None:
        await self.sql.checkpoint(timeout)

    async def pending_restart_settings(self) -> list[str]:
        """The parameters changed in the config files that take effect only after a restart
        (pg_settings.pending_restart), sorted. Raises PostgresError."""
        return await self.sql.pending_restart_settings()

    async def archiver_stats(self) -> tuple[int, float | None, int, float | None]:
        """pg_stat_archiver's counts and times (Sql.archiver_stats). Raises PostgresError."""
        return await self.sql.archiver_stats()

    async def replication_state(self) -> ReplicationState:
        """The master's standbys (pg_stat_replication by application_name) and its own flush
        position, for synchronous replication. Raises PostgresError."""
        return await self.sql.replication_state()

    async def ensure_roles(self) -> None:
        """Create or update the replication role, and the monitoring role when the config has
        one (LOGIN, no superuser, a member of pg_monitor: what postgres_exporter needs), on the
        running primary; replicas get them by replication. No password reaches the server log
        or the wire in clear (see Sql.ensure_role)."""
        repl = self.settings.replication
        password = repl.resolve_password()
        if not password:
            raise PostgresError(
                f"replication user {repl.username!r} has no password (needed for scram-sha-256): set "
                f"postgresql.replication.password or password_file"
            )
        created = await self.sql.ensure_role(repl.username, password)
        self.log.info("pg_roles_ensured", role=repl.username, created=created)
        monitoring = self.settings.monitoring
        if monitoring is None:
            return
        password = monitoring.resolve_password()
        if not password:
            raise PostgresError(
                f"monitoring user {monitoring.username!r} has an empty password: set "
                f"postgresql.monitoring.password or put one in its password_file"
            )
        created = await self.sql.ensure_role(
            monitoring.username, password, replication=False, member_of=("pg_monitor",)
        )
        self.log.info("pg_roles_ensured", role=monitoring.username, created=created)

    async def ensure_slots(self, members: set[str]) -> None:
        """A physical slot per other member; drop slots this agent created for members that left.
        Slots made by anyone else (operators, other tools) are never touched."""
        own = slot_name(self.name)
        wanted = {slot_name(m) for m in members} - {own}
        recorded = self._recorded_slots()
        # record before creating: a crash in between must not leave a slot we would never drop
        if not wanted <= recorded:
            self._record_slots(recorded | wanted)
        undropped = await self.sql.ensure_slots(wanted, recorded - wanted - {own})
        # only after success: a failure half way must not forget slots still to be dropped
        keep_recorded = wanted | undropped
        if keep_recorded != recorded:
            self._record_slots(keep_recorded)

    def _recorded_slots(self) -> set[str]:
        try:
            return set(json.loads(self.slots_path.read_text()))
        except FileNotFoundError:
            return set()
        except (OSError, ValueError) as exc:
            self.log.warning("pg_slot_record_unreadable", path=str(self.slots_path), error=str(exc))
            return set()

    def _record_slots(self, slots: set[str]) -> None:
        self.osuser.write_file(self.slots_path, json.dumps(sorted(slots)) + "\n")

    async def timeline_history(self, source: Conninfo) -> list[tuple[int, int]]:
        """[(parent_tli, switchpoint_lsn)] of ``source``'s current timeline, oldest first ([] on
        timeline 1). A standby whose (timeline, lsn) lies past a switchpoint of its parent
        timeline has forked and needs a rewind. Connects as the superuser."""
        src = dataclasses.replace(source, user=self.settings.superuser.username)
        return await self.sql.timeline_history(src)

    # ------------------------------------------------------------------ probe

    async def probe(self) -> PgFacts:
        """Facts about the local PostgreSQL; never raises, never hangs (each step is bounded).
        While it runs, ``data`` is what pg_controldata would report (STANDBY in recovery,
        PRIMARY_CRASHED = "in production" otherwise) without forking pg_controldata."""
        running = self.running or self.postmaster.foreign_pid() is not None
        if not running:
            await self.sql.close_probe()
            return await self._offline_facts(False)
        try:
            row = await self.sql.probe_row()
        except PostgresError as exc:
            self.log.info("pg_probe_unanswered", error=str(exc))
            return await self._offline_facts(True)
        data_directory = row[1]
        if not self.postmaster.is_our_data_dir(data_directory):
            self.log.error(
                "pg_probe_wrong_server", port=self.settings.port, data_directory=data_directory
            )
            await self.sql.close_probe()
            return PgFacts(running=self.running, accepting=False)
        facts, self._standby_tli_seen = probe_facts(row, self._standby_tli_seen)
        return facts

    async def _offline_facts(self, running: bool) -> PgFacts:
        try:
            cd = await self.controldata(timeout=10)
        except PostgresError as exc:
            self.log.warning("pg_probe_controldata_failed", error=str(exc))
            return PgFacts(running=running)
        tli = cd.timeline
        if cd.min_recovery_end_timeline and cd.data_state == DataState.STANDBY:
            # a stopped standby's data can be on a later timeline than its last restartpoint
            tli = max(tli or 0, cd.min_recovery_end_timeline)
        return PgFacts(data=cd.data_state, system_id=cd.system_id, running=running, timeline=tli)


def _passwords(settings: PostgresSettings) -> list[str]:
    """The configured passwords, kept out of the forwarded server log (an unreadable
    password_file is the config loader's error to report, not this)."""
    found: list[str] = []
    for creds in (settings.superuser, settings.replication):
        try:
            password = creds.resolve_password()
        except ConfigError:
            continue
        if password:
            found.append(password)
    return found
