"""The configuration the agent writes for its PostgreSQL: the role's settings, where a standby
connects to, the cluster's parameters from the DCS and the synchronous set's."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any

import structlog

from fsm.machine import Role, standby_mode
from fsm.snapshot import STANDBY_SOURCE
from pgsidecar import dcs_params
from pgsidecar.agent.ports import Clock, PostgresPort
from pgsidecar.agent.state import ActionLog, NodeState
from pgsidecar.config import slot_name
from pgsidecar.postgres.control import Conninfo, PostgresError

log = structlog.get_logger("pgsidecar.agent")

Upstream = tuple[str, Conninfo]


def source_conninfo(state: NodeState, pg: PostgresPort, replication: bool) -> Upstream | None:
    """The source cluster's servers (the standby_cluster section) as one libpq connection: with
    several, libpq tries each in turn (None: not a standby cluster)."""
    endpoints = state.standby_source
    if not endpoints:
        return None
    host, port = endpoints[0]
    ci = pg.replication_conninfo(host, port) if replication else pg.superuser_conninfo(host, port)
    if len(endpoints) > 1:
        ci = dataclasses.replace(
            ci,
            host=",".join(h for h, _ in endpoints),
            port=",".join(str(p) for _, p in endpoints),
        )
    return STANDBY_SOURCE, ci


def leader_conninfo(state: NodeState, pg: PostgresPort, replication: bool) -> Upstream | None:
    """The master's name and address as it published them (None: no master, or it is us, or
    its address is not published yet). A standby leader's upstream is the source cluster."""
    if state.role is Role.STANDBY_LEADER:
        return source_conninfo(state, pg, replication)
    s = state.snapshot
    leader = s.dcs.leader
    if leader is None or leader.name == state.name:
        return None
    m = s.dcs.members.get(leader.name)
    if m is None or m.conn_host is None or m.conn_port is None:
        return None
    if replication:
        return leader.name, pg.replication_conninfo(m.conn_host, m.conn_port)
    return leader.name, pg.superuser_conninfo(m.conn_host, m.conn_port)


def clone_source(state: NodeState, pg: PostgresPort) -> Upstream | None:
    """Where to clone from: a streaming replica tagged ``clonefrom`` (to spare the master the
    copy) if there is one, else the master."""
    view = state.dcs_view
    for name, raw in sorted((view.members if view is not None else {}).items()):
        tags = raw.get("tags") if isinstance(raw, dict) else None
        m = state.snapshot.dcs.members.get(name)
        if (
            name != state.name
            and isinstance(tags, dict)
            and tags.get("clonefrom") is True
            and m is not None
            and m.running
            and m.streaming
            and m.conn_host
            and m.conn_port
        ):
            return name, pg.replication_conninfo(m.conn_host, m.conn_port)
    return leader_conninfo(state, pg, replication=True)


class PgConfig:
    """Writes postgresql.conf for the role, with the cluster's parameters (the DCS config key,
    over the local config's) and, on the master, the synchronous set's settings."""

    def __init__(
        self,
        state: NodeState,
        pg: PostgresPort,
        clock: Clock,
        sync_parameters: Callable[[], dict[str, Any]],
        record: ActionLog,
        publish: Callable[[], None],
        allowed_from_dcs: Collection[str] = (),
        local_parameters: Collection[str] = (),
        primary_archiving: Mapping[str, Any] | None = None,
        standby_archiving: Mapping[str, Any] | None = None,
    ) -> None:
        self.state = state
        self.pg = pg
        self.clock = clock
        self.sync_parameters = sync_parameters
        self.record = record
        self.publish = publish
        # the cluster parameters last written and reloaded (None: not yet)
        self.applied: dict[str, Any] | None = None
        # the upstream a standby's config names, as last written on the machine's decision
        # (starting a standby, following a new master): a rewrite for new parameters keeps it
        self.standby_upstream: Upstream | None = None
        # parameters that run commands, load code or name files come from the DCS only when the
        # local config allows them by name (pgsidecar/dcs_params.py)
        self.allowed_from_dcs = tuple(allowed_from_dcs)
        # names the member's local config sets itself: never overridden by a derived value
        self.local_parameters = frozenset(k.lower() for k in local_parameters)
        # what the DCS asked for and this member refused ({name: reason}), as last reported
        self.refused: dict[str, str] = {}
        # archive_mode, archive_command (and a standby's restore_command) from the local config's
        # backup section: over the cluster's, since only the member's own config runs commands
        self.primary_archiving = dict(primary_archiving or {})
        self.standby_archiving = dict(standby_archiving or {})

    def cluster_parameters(self) -> dict[str, Any]:
        """PostgreSQL parameters from the DCS config key (`config set postgresql.parameters.X=Y`),
        over the local config's."""
        view = self.state.dcs_view
        cfg = view.config if view is not None and isinstance(view.config, dict) else {}
        pg = cfg.get("postgresql") if isinstance(cfg.get("postgresql"), dict) else {}
        params = pg.get("parameters") if isinstance(pg, dict) else None
        if not isinstance(params, dict):
            params = {}
        accepted, refused = dcs_params.screen(params, self.allowed_from_dcs)
        if refused != self.refused:
            self.refused = refused
            if refused:
                # once per change of what is refused: recorded, logged, counted by the API
                log.warning("dcs_parameters_refused", refused=refused)
                self.record(
                    "parameters_refused", "refused", self.clock.monotonic(), refused=refused
                )
        return accepted

    def derived_parameters(self, cluster: dict[str, Any]) -> dict[str, Any]:
        """Settings that follow the cluster's TTL, unless the local config or the DCS sets them.

        wal_receiver_timeout: a replica's stream from a master that is cut off (not dead: its
        socket stays open) ends only when the WAL receiver times out, and a candidate does not
        race while the old master's WAL still streams to it. At PostgreSQL's 10 s default the
        election after a partition waited for that, about one TTL after the lease had lapsed.
        At ttl/2 the stream ends before the lease can lapse, so a partition fails over in about
        one TTL, as a hard kill does; an idle link is pinged at half the timeout, so a live
        master is never mistaken for a dead one on a quiet cluster."""
        ttl = self.state.snapshot.settings.ttl
        timeout_ms = int(1000 * min(10.0, max(2.0, ttl / 2)))
        derived = {"wal_receiver_timeout": f"{timeout_ms}ms"}
        return {
            k: v for k, v in derived.items() if k not in cluster and k not in self.local_parameters
        }

    def write_primary(self) -> None:
        cluster = self.cluster_parameters()
        self.pg.write_config(
            "primary",
            None,
            None,
            parameters={
                **self.derived_parameters(cluster),
                **cluster,
                **self.primary_archiving,
                **self.sync_parameters(),
            },
        )

    def write_standby(self, upstream: Upstream | None) -> None:
        self.standby_upstream = upstream
        cluster = self.cluster_parameters()
        slot = slot_name(self.state.name) if upstream else None
        if upstream is not None and upstream[0] == STANDBY_SOURCE:
            slot = self.state.standby_slot  # our slot in another cluster: the one configured
        self.pg.write_config(
            "standby",
            upstream[1] if upstream else None,
            slot,
            parameters={
                **self.derived_parameters(cluster),
                **cluster,
                **self.standby_archiving,
                **self.standby_cluster_parameters(),
            },
        )

    def standby_cluster_parameters(self) -> dict[str, Any]:
        """A standby cluster's restore_command (the source's archive), while it is one: after
        the promotion the source's archive holds timelines that are not ours."""
        command = self.state.standby_restore_command
        if command is None or not standby_mode(self.state.snapshot):
            return {}
        return {"restore_command": command}

    def write_promoting(self) -> None:
        """Still a standby, with the primary's settings (synchronous_standby_names and the
        cluster's parameters) loaded before the promotion, so the first commit after it already
        waits as it must."""
        cluster = self.cluster_parameters()
        self.pg.write_config(
            "standby",
            None,
            None,
            parameters={
                **self.derived_parameters(cluster),
                **cluster,
                **self.standby_archiving,
                **self.sync_parameters(),
            },
        )

    def parameters_changed(self) -> bool:
        return self.cluster_parameters() != self.applied

    async def apply_cluster_parameters(self) -> None:
        """A change of the cluster's PostgreSQL parameters: rewrite the config and reload; what
        needs a restart is published as pending_restart (shown by `list`). Nothing is applied
        while they are unchanged, PostgreSQL is not running, an effect is in flight, or the role
        writes no config now (the next view of the DCS tries again). Raises when the write or
        the reload failed: nothing counts as applied then, so the next view retries."""
        params = self.cluster_parameters()
        role = self.state.role
        if (
            params == self.applied
            or not self.pg.running
            or self.state.snapshot.busy
            or role not in (Role.MASTER, Role.REPLICA, Role.STANDBY_LEADER)
        ):
            return
        previous, self.applied = self.applied, params  # also: one at a time
        started = self.clock.monotonic()
        try:
            if role is Role.MASTER:
                self.write_primary()
            else:
                # the upstream the machine chose, not the view's leader: the machine re-points a
                # standby only when the leader differs from the upstream it configured, so a
                # rewrite naming another (or none, in a view without a leader) would leave the
                # standby following nobody for good (simulator seed 2324, docs/simulation.md)
                self.write_standby(self.standby_upstream)
            await self.pg.reload()
        except BaseException:
            self.applied = previous
            raise
        await asyncio.sleep(0.2)  # the postmaster re-reads the files asynchronously
        pending = await self.pending_restart()
        self.state.pending_restart = pending
        self.record(
            "apply_parameters", "ok", started, parameters=sorted(params), pending_restart=pending
        )
        self.publish()

    async def pending_restart(self) -> list[str]:
        """The settings waiting for a restart ([] when PostgreSQL cannot tell us now)."""
        try:
            return await self.pg.pending_restart_settings()
        except PostgresError:
            return []
