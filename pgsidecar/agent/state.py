"""What the parts of the agent share: what the node knows now (NodeState), how a part posts an
input (Post), and the set of tasks the agent runs beside its loop (TaskSet)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from events.dcs import ClusterView
from fsm.machine import Role, RoleMachine
from fsm.snapshot import Snapshot

log = structlog.get_logger("pgsidecar.agent")


class Post(Protocol):
    """Put an input on the agent's queue (``type_`` is an input type of fsm.inputs)."""

    def __call__(self, type_: str, /, **data: Any) -> None: ...


@dataclass
class NodeState:
    """The node's knowledge, owned by the loop (``machine``, ``snapshot``) and the sources
    (``dcs_view``, ``lease_sent``), read by the effects and the API."""

    name: str
    machine: RoleMachine
    snapshot: Snapshot
    # the newest raw view of the DCS posted to the machine (tags and config are read from it)
    dcs_view: ClusterView | None = None
    # when the last successful grant or renewal of our session was *sent* (monotonic): the
    # session, and a leader key bound to it, lives at least ttl after that on the DCS's clock.
    # An acquire does not extend it, so the fencing deadline after winning counts from here.
    lease_sent: float = 0.0
    # settings PostgreSQL read but applies only after a restart (published in the member key)
    pending_restart: list[str] = field(default_factory=list)
    last_error: str | None = None
    # a standby cluster (the standby_cluster section): the source cluster's servers the standby
    # leader streams from, in order, and the slot it uses there (none: not a standby cluster)
    standby_source: tuple[tuple[str, int], ...] = ()
    standby_slot: str | None = None
    standby_restore_command: str | None = None

    @property
    def role(self) -> Role:
        return self.machine.role

    def term(self) -> int | None:
        """The term stamped on records: our lease's while we hold it, else the leader key's."""
        s = self.snapshot
        if s.lease.held and s.lease.term is not None:
            return s.lease.term
        return s.dcs.leader.term if s.dcs.leader else None


class TaskSet:
    """Tasks beside the loop (effects, publishing, slots, parameters, service registration, the
    postmaster's exit watch): each kept referenced until it ends, its exception logged (never
    lost silently), all cancelled at exit."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def finished(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("side_task_failed", task=what, error=str(t.exception()))

        task.add_done_callback(finished)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, task: object) -> bool:
        return task in self._tasks

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t


class ActionLog(Protocol):
    """Record what an effect did (an ``action`` record): ``started`` is the clock's monotonic
    time when it began (Recorder.action is the real one)."""

    def __call__(self, name: str, outcome: str, started: float, /, **detail: Any) -> None: ...
