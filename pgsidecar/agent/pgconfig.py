"""The configuration the agent writes for its PostgreSQL: the role's settings, where a standby
connects to, the cluster's parameters from the DCS and the synchronous set's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog

from fsm.machine import Role
from pgsidecar.agent.ports import Clock, PostgresPort
from pgsidecar.agent.state import ActionLog, NodeState
from pgsidecar.config import slot_name
from pgsidecar.postgres.control import Conninfo, PostgresError

log = structlog.get_logger("pgsidecar.agent")

Upstream = tuple[str, Conninfo]


def leader_conninfo(state: NodeState, pg: PostgresPort, replication: bool) -> Upstream | None:
    """The master's name and address as it published them (None: no master, or it is us, or
    its address is not published yet)."""
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
    ) -> None:
        self.state = state
        self.pg = pg
        self.clock = clock
        self.sync_parameters = sync_parameters
        self.record = record
        self.publish = publish
        # the cluster parameters last written and reloaded (None: not yet)
        self.applied: dict[str, Any] | None = None

    def cluster_parameters(self) -> dict[str, Any]:
        """PostgreSQL parameters from the DCS config key (`config set postgresql.parameters.X=Y`),
        over the local config's."""
        view = self.state.dcs_view
        cfg = view.config if view is not None and isinstance(view.config, dict) else {}
        pg = cfg.get("postgresql") if isinstance(cfg.get("postgresql"), dict) else {}
        params = pg.get("parameters") if isinstance(pg, dict) else None
        if not isinstance(params, dict):
            return {}
        return {str(k): v for k, v in params.items() if isinstance(v, (str, int, float, bool))}

    def write_primary(self) -> None:
        self.pg.write_config(
            "primary",
            None,
            None,
            parameters={**self.cluster_parameters(), **self.sync_parameters()},
        )

    def write_standby(self, upstream: Upstream | None) -> None:
        self.pg.write_config(
            "standby",
            upstream[1] if upstream else None,
            slot_name(self.state.name) if upstream else None,
            parameters=self.cluster_parameters(),
        )

    def write_promoting(self) -> None:
        """Still a standby, with the primary's settings (synchronous_standby_names and the
        cluster's parameters) loaded before the promotion, so the first commit after it already
        waits as it must."""
        self.pg.write_config(
            "standby",
            None,
            None,
            parameters={**self.cluster_parameters(), **self.sync_parameters()},
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
            or role not in (Role.MASTER, Role.REPLICA)
        ):
            return
        previous, self.applied = self.applied, params  # also: one at a time
        started = self.clock.monotonic()
        try:
            if role is Role.MASTER:
                self.write_primary()
            else:
                self.write_standby(leader_conninfo(self.state, self.pg, replication=True))
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
