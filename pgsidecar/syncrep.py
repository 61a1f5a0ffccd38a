"""Synchronous replication, run by the master (synchronous_mode on | strict).

The invariant: every member of the synchronous set recorded in the DCS has every commit the
master acknowledged. After the master fails, only a member of that set may race for the lease
(fsm.machine.sync_allows), so no acknowledged commit is lost under any single fault.

How the master keeps it, each tick (every probe, ~1 s, and on member changes):

1. *Shrink the record first.* A recorded member that is no longer a healthy streaming standby is
   removed from the DCS record before anything else: from then on it may not be promoted, so
   PostgreSQL may stop waiting for it.
2. *PostgreSQL requires every member being kept or added*: synchronous_standby_names =
   ``FIRST k ("a", "b")`` with k = the number of names, so a commit is acknowledged only when all
   of them have flushed it. With nobody to wait for, ``on`` runs asynchronously (the record stays
   empty: no automatic failover) and ``strict`` sets ``*`` (commits wait for any standby).
3. *Grow the record last.* A member is added to the record only once pg_stat_replication shows it
   synchronous and its flush position has passed our flush position at the moment it was added to
   synchronous_standby_names: it then has every commit acknowledged before it joined, and every
   later one waits for it.

Every write of the record is a compare-and-set from the index just read (``DCS.swap_sync``). A
write whose answer never came (a timeout, a lost answer, a stalled store) may have landed, or
may still land later, as long as the key stays at the index it was made from: until a later
swap from that index succeeds, its members count as recorded, so PostgreSQL keeps waiting for
them. Found by the simulator (seed 105160): a grow naming m1 was sent into a stalled store and
timed out; the next tick, m1 cut off, set synchronous_standby_names to '' and acknowledged
commits m1 never had; the grow landed when the store came back, and m1 won the election
without them.

A new master writes an empty record for itself before it promotes (``prepare_promotion``), so the
set of a dead predecessor never outlives it and nothing is promised before it is true.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog

from fsm.snapshot import Snapshot

log = structlog.get_logger("pgsidecar.syncrep")

# application_name -> (state, sync_state, flush LSN), and our own flush LSN
ReplicationStats = tuple[dict[str, tuple[str, str, int]], int]


class SyncStore(Protocol):
    """Where the synchronous set is recorded (the DCS)."""

    async def put_sync(self, state: dict[str, Any]) -> None: ...

    async def read_sync(self) -> tuple[dict[str, Any] | None, int]: ...

    async def swap_sync(self, state: dict[str, Any], index: int) -> bool: ...


class ActionLog(Protocol):
    def __call__(self, name: str, outcome: str, started: float, /, **detail: Any) -> None: ...


def standby_names(members: set[str], mode: str) -> str:
    if not members:
        return "*" if mode == "strict" else ""
    names = ", ".join(f'"{n}"' for n in sorted(members))
    return f"FIRST {len(members)} ({names})"


class SyncManager:
    """Run by the master's probe loop (``tick``) and its promotion (``prepare_promotion``).

    It reads the node's snapshot, the members' tags and pg_stat_replication; it writes the DCS
    record and, through ``reconfigure`` (write the primary's config, reload), PostgreSQL's
    synchronous_standby_names. ``still_master`` says we may write the record: master, holding
    the lease, valid on our own clock."""

    def __init__(
        self,
        name: str,
        store: SyncStore,
        *,
        snapshot: Callable[[], Snapshot],
        still_master: Callable[[], bool],
        member_tags: Callable[[str], dict[str, Any]],
        read_replication: Callable[[], Awaitable[ReplicationStats]],
        reconfigure: Callable[[], Awaitable[None]],
        record: ActionLog,
        monotonic: Callable[[], float],
    ) -> None:
        self.name = name
        self.store = store
        self.snapshot = snapshot
        self.still_master = still_master
        self.member_tags = member_tags
        self.read_replication = read_replication
        self.reconfigure = reconfigure
        self.record = record
        self.monotonic = monotonic
        self.applied: str | None = None  # synchronous_standby_names as last written and reloaded
        self._added_at: dict[str, int] = {}  # member -> our flush LSN when it was required
        # a write of the record with no answer: (the index it was made from, the members it
        # named); it may still land while the key stays at that index
        self._unanswered: tuple[int, frozenset[str]] | None = None

    @property
    def mode(self) -> str:
        return self.snapshot().settings.synchronous_mode

    def parameters(self) -> dict[str, Any]:
        """Extra postgresql.conf settings the master's config must carry."""
        return {"synchronous_standby_names": self.applied or ""}

    async def prepare_promotion(self, term: int | None) -> None:
        """Before a new master accepts its first write: an empty record of our own (no member
        may be promoted on our behalf yet), and strict mode waits for any standby."""
        self._added_at.clear()
        self._unanswered = None  # a new term: the previous one's writes name another leader
        if self.mode == "off":
            self.applied = ""
            return
        self.applied = standby_names(set(), self.mode)
        await self.store.put_sync({"leader": self.name, "term": term, "members": []})

    async def _set_standby_names(self, value: str) -> None:
        if value == self.applied:
            return
        # the config is written with the new value; it counts as applied only once PostgreSQL
        # reloaded it: a failed write or reload leaves the old value, so the next tick retries
        previous, self.applied = self.applied, value
        try:
            await self.reconfigure()
        except BaseException:
            self.applied = previous
            raise
        log.info("synchronous_standby_names", value=value)

    async def _put(self, state: dict[str, Any]) -> None:
        # every write of the record is made only while our lease is valid on our own clock: a
        # master cut off from the DCS must not rewrite the set after its lease may have lapsed
        if not self.still_master():
            raise RuntimeError("no longer master: the synchronous set is not written")
        _value, index = await self.store.read_sync()
        if self._unanswered is not None and self._unanswered[0] != index:
            self._unanswered = None  # the key moved on since: that write can never land now
        try:
            written = await self.store.swap_sync(state, index)
        except BaseException:
            # no answer: it may land yet, as long as the key stays at ``index``
            earlier = self._unanswered[1] if self._unanswered is not None else frozenset()
            self._unanswered = (index, earlier | frozenset(state["members"]))
            raise
        if not written:
            raise RuntimeError("the synchronous set changed since it was read: next tick")
        self._unanswered = None

    async def tick(self) -> None:
        s = self.snapshot()
        if not self.still_master():
            return
        term = s.lease.term
        if self.mode == "off":
            await self._set_standby_names("")
            return
        started = self.monotonic()
        rec = s.dcs.sync
        recorded = (
            set(rec.members)
            if rec is not None and rec.leader == self.name and rec.term == term
            else None
        )
        if recorded is None:
            recorded = set()
            await self._put({"leader": self.name, "term": term, "members": []})
        stats, flush = await self.read_replication()
        n = max(1, s.settings.synchronous_node_count)
        healthy = [
            name
            for name, m in s.dcs.members.items()
            if name != self.name
            and name in stats
            and stats[name][0] == "streaming"
            and self.member_tags(name).get("nosync") is not True
        ]
        healthy.sort(key=lambda x: -stats[x][2])
        # keep the members already recorded while healthy, fill up with the most advanced
        target = [x for x in healthy if x in recorded][:n]
        target += [x for x in healthy if x not in target][: n - len(target)]
        keep = recorded & set(target)
        # members of an unanswered write count as recorded until a swap from its index succeeds
        unanswered = self._unanswered[1] if self._unanswered is not None else frozenset()
        if keep != recorded or unanswered:
            # 1. shrink the record before PostgreSQL stops waiting for anyone
            await self._put({"leader": self.name, "term": term, "members": sorted(keep)})
            self.record(
                "sync_set",
                "shrunk",
                started,
                members=sorted(keep),
                removed=sorted((recorded | unanswered) - keep),
            )
            recorded = keep
        adding = set(target) - recorded
        for x in list(self._added_at):
            if x not in adding:
                del self._added_at[x]
        # 2. PostgreSQL waits for every member kept or being added
        await self._set_standby_names(standby_names(recorded | adding, self.mode))
        for x in adding:
            self._added_at.setdefault(x, flush)
        # 3. grow the record once a new member is synchronous and caught up
        confirmed = {
            x
            for x in adding
            if stats[x][1] in ("sync", "quorum") and stats[x][2] >= self._added_at[x]
        }
        if confirmed:
            members = sorted(recorded | confirmed)
            await self._put({"leader": self.name, "term": term, "members": members})
            self.record("sync_set", "grown", started, members=members, added=sorted(confirmed))
            for x in confirmed:
                self._added_at.pop(x, None)
