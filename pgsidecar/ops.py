"""Operator commands that act through the DCS (shared by the CLI and the REST API)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from events.dcs import DCS, ClusterView
from fsm.inputs import member_view


class SwitchoverError(Exception):
    pass


def members_table(view: ClusterView) -> list[dict[str, Any]]:
    leader = view.leader.name if view.leader else None
    leader_lsn = None
    if leader and leader in view.members:
        leader_lsn = (
            member_view(leader, view.members[leader]).lsn
            if member_view(leader, view.members[leader])
            else None
        )
    rows = []
    for name in sorted(view.members):
        raw = view.members[name]
        m = member_view(name, raw)
        if m is None:
            continue
        lag = None
        if name != leader and leader_lsn is not None and m.lsn is not None:
            lag = max(0, leader_lsn - m.lsn)
        rows.append(
            {
                "name": name,
                "role": m.role,
                "host": m.conn_host,
                "port": m.conn_port,
                "api_url": m.api_url,
                "timeline": m.timeline,
                "lsn": m.lsn,
                "lag_bytes": 0 if name == leader else lag,
                "pg_running": m.running,
                "streaming": m.streaming,
                "leader": name == leader,
            }
        )
    return rows


async def request_switchover(dcs: DCS, target: str | None) -> dict[str, Any]:
    """Validate and write the switchover command. Refuses (and writes nothing) when there is no
    master, the target is unknown, is the master, is not a streaming replica, or may not fail over."""
    view = await dcs.read_cluster()
    if view.leader is None:
        raise SwitchoverError("there is no master to switch over from; use failover instead")
    if view.switchover is not None:
        raise SwitchoverError(f"a switchover is already pending: {view.switchover}")
    if target is not None:
        if target not in view.members:
            known = ", ".join(sorted(view.members)) or "none"
            raise SwitchoverError(f"{target!r} is not a member of the cluster (members: {known})")
        if target == view.leader.name:
            raise SwitchoverError(f"{target!r} is already the master")
        m = member_view(target, view.members[target])
        if m is None or not m.running or not m.streaming:
            raise SwitchoverError(
                f"{target!r} is not a running, streaming replica; it cannot take over now"
            )
        if m.nofailover or m.failover_priority <= 0:
            raise SwitchoverError(f"{target!r} is tagged nofailover (or failover_priority 0)")
    else:
        ok = [
            n
            for n, raw in view.members.items()
            if n != view.leader.name
            and (mv := member_view(n, raw)) is not None
            and mv.running
            and mv.streaming
            and not mv.nofailover
            and mv.failover_priority > 0
        ]
        if not ok:
            raise SwitchoverError("no streaming replica can take over")
    cmd = {"from": view.leader.name, "to": target, "requested_at": time.time()}
    await dcs.put_switchover(cmd)
    return cmd


async def wait_for_leader(dcs: DCS, not_name: str | None, seconds: float) -> ClusterView | None:
    """Wait until a leader other than ``not_name`` holds the key (watch-driven)."""

    async def _wait() -> ClusterView | None:
        async for view in dcs.watch():
            if view.leader is not None and view.leader.name != not_name:
                return view
        return None

    try:
        return await asyncio.wait_for(_wait(), timeout=seconds)
    except TimeoutError:
        return None
