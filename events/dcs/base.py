"""The DCS interface: everything the agent asks of a consensus store.

One abstract class, one module per backend (etcd.py, consul.py), nothing backend-specific leaking
out (the Patroni `dcs/` model). The agent and the state machine only ever see the types below.

Keys, under ``<prefix>/<cluster>/`` (prefix without a leading slash, default ``pgsidecar``):

    leader              value = member name; bound to the holder's session/lease; its modify
                        index / mod_revision is the *term* (a fencing token)
    members/<name>      JSON of the member's state (role, lsn, timeline, api_url, tags, ...);
                        bound to the member's session/lease, so it vanishes when the agent dies
    initialize          value = name of the member that won the right to run initdb; never
                        bound to a session (the cluster stays initialized when that member dies)
    config              JSON: cluster-wide dynamic config
    switchover          JSON: a pending switchover command {"from": ..., "to": ..., ...}
    sync                JSON: the synchronous set {"leader": name, "term": n, "members": [...]},
                        written by the master only; after a failure only a member of the set
                        recorded by the last leader may race (synchronous mode)
    backup/<type>       JSON: the newest scheduled backup slot of that type a member claimed
                        (slot time, member, state); written only by compare-and-set on its
                        modify index, never bound to a session; not part of the ClusterView
    timeline            decimal text: the highest PostgreSQL timeline any member ever claimed
                        for a promotion; never bound to a session, only ever raised (create if
                        absent, else compare-and-set on its modify index)

Semantics every backend must provide (tests/contract/test_dcs_contract.py states them as tests):

* ``acquire_leader`` is an atomic create-if-absent bound to this agent's session: of concurrent
  acquirers exactly one wins.
* When the session expires (no renewal for ``ttl``) or is closed, every key bound to it is deleted
  (the leader key and the member key) and watchers see the deletion.
* ``release_leader`` deletes the key only if it is still held by us with the given term, and the
  key is free at once (no lock-delay).
* The term strictly increases on every change of leader.
* ``swap_backup_slot`` writes only when the key's modify index is still the one read (0: only
  when the key is absent): of concurrent writers from the same read exactly one wins.
* ``watch`` yields a full ``ClusterView`` now and after every change under the cluster prefix;
  after a lost connection it resumes from the last index it saw, without losing a change.
* ``put_timeline`` is an atomic create-if-absent (index 0) or compare-and-set on the key's
  modify index: of concurrent writers from the same read exactly one wins, so ``claim_timeline``
  hands every caller a different number, each above every number claimed before.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fsm import bounded_json


class DCSError(Exception):
    """The store could not be reached or answered with an error. Transient: the caller retries.

    No transition is ever taken because of a DCSError alone, except that a master that cannot
    renew its lease fences itself when its own deadline passes."""


class SessionLost(DCSError):
    """Our session/lease no longer exists on the store side (expired or invalidated). Every key
    bound to it is gone; a master must stop accepting writes at once."""


class DuplicateMember(Exception):
    """Another live agent (a different ``instance_id``) already holds ``members/<name>``."""


class AuthError(DCSError):
    """The store refused our credentials (ACL token, TLS client cert). Not transient: the message
    names the setting to fix."""


@dataclass(frozen=True)
class Leader:
    name: str
    term: int


@dataclass(frozen=True)
class ClusterView:
    """Everything the store knows about one cluster, read at one index."""

    leader: Leader | None = None
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    initialize: str | None = None
    config: dict[str, Any] | None = None
    switchover: dict[str, Any] | None = None
    sync: dict[str, Any] | None = None
    # the promotion marker of a standby cluster (``pgsidecar promote-cluster``): who, when
    standby_promoted: dict[str, Any] | None = None
    index: int = 0
    # keys whose value could not be decoded: (key, reason); skipped and counted, never acted on
    malformed: tuple[tuple[str, str], ...] = ()


# PostgreSQL's TimeLineID is an unsigned 32-bit integer (history files are named with 8 hex digits)
MAX_TIMELINE = 0xFFFFFFFF


@dataclass(frozen=True)
class TimelineCounter:
    """The ``timeline`` key as read: the highest timeline claimed so far (0 when the key is
    absent or unreadable) and the key's modify index (0 when absent) to compare-and-set on."""

    value: int = 0
    index: int = 0


def decode_timeline(raw: bytes | str | None) -> int | None:
    """The ``timeline`` key's value: a decimal timeline id, or None when it is not one."""
    if raw is None:
        return None
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    text = text.strip()
    if not text.isdigit() or len(text) > 10:
        return None
    value = int(text)
    return value if 1 <= value <= MAX_TIMELINE else None


def decode_json_object(
    key: str, raw: bytes | str | None
) -> tuple[dict[str, Any] | None, str | None]:
    """Decode a JSON object stored under ``key``. Returns (value, None) or (None, reason)."""
    if raw is None:
        return None, None
    try:
        value = bounded_json.loads(raw)
    except ValueError as exc:
        return None, f"{key}: {exc}"
    if not isinstance(value, dict):
        return None, f"{key}: expected a JSON object, got {type(value).__name__}"
    return value, None


def require_own_incarnation(
    name: str, key: str, raw: bytes | str | None, data: dict[str, Any]
) -> None:
    """``key``, member ``name``'s key, is held by a live session that is not ours: return if its
    value ``raw`` is our own previous incarnation's (the ``instance_id`` of our ``data``), whose
    key the caller then takes over; raise DuplicateMember if it is another agent's."""
    existing, _reason = decode_json_object(key, raw)
    theirs = existing.get("instance_id") if existing else None
    ours = data.get("instance_id")
    if ours is None or theirs != ours:
        raise DuplicateMember(
            f"member name {name!r} is already registered by another live agent "
            f"(instance_id {theirs!r}, ours {ours!r}): give this member another name, or "
            f"stop the other agent; its key disappears when its session ends"
        )


def build_view(base: str, entries: list[tuple[str, bytes, int, bool]], index: int) -> ClusterView:
    """The ClusterView of a cluster's keys, for every backend: ``entries`` are
    (full key, raw value, modify index, held) where ``held`` says a lock key is held by a live
    session (always true for etcd, whose keys vanish with their lease). Values that cannot be
    decoded go to ``malformed`` and are left out; keys of a newer version are ignored."""
    leader: Leader | None = None
    initialize: str | None = None
    objects: dict[str, dict[str, Any] | None] = {
        "config": None,
        "switchover": None,
        "sync": None,
        "standby_promoted": None,
    }
    members: dict[str, dict[str, Any]] = {}
    malformed: list[tuple[str, str]] = []
    for key, value, modify_index, held in sorted(entries):
        if not key.startswith(base):
            continue
        rel = key[len(base) :]
        if rel in ("leader", "initialize"):
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError:
                malformed.append((key, f"{key}: not valid UTF-8"))
                continue
            if rel == "leader" and not held:
                continue  # a lock nobody holds: no leader
            if not text:
                malformed.append((key, f"{key}: empty value"))
            elif rel == "leader":
                leader = Leader(text, modify_index)
            else:
                initialize = text
        elif rel in objects or rel.startswith("members/"):
            obj, reason = decode_json_object(key, value)
            if reason is not None:
                malformed.append((key, reason))
            elif rel in objects:
                objects[rel] = obj
            else:
                name = rel[len("members/") :]
                if name and "/" not in name and obj is not None:
                    members[name] = obj
    return ClusterView(
        leader=leader,
        members=members,
        initialize=initialize,
        config=objects["config"],
        switchover=objects["switchover"],
        sync=objects["sync"],
        standby_promoted=objects["standby_promoted"],
        index=index,
        malformed=tuple(malformed),
    )


class DCS(abc.ABC):
    """One agent's connection to the consensus store, scoped to one cluster.

    An agent opens exactly one session (etcd: lease; Consul: session) and binds its member key and,
    when it wins, the leader key to it."""

    def __init__(self, cluster: str, prefix: str = "pgsidecar") -> None:
        self.cluster = cluster
        self.prefix = prefix.strip("/")
        self.base = f"{self.prefix}/{cluster}/"

    # -- keys -----------------------------------------------------------------------------------
    def key(self, *parts: str) -> str:
        return self.base + "/".join(parts)

    # -- lifecycle ------------------------------------------------------------------------------
    @abc.abstractmethod
    async def connect(self) -> None:
        """Check that the store answers. Raises DCSError (or AuthError) otherwise."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close connections (does not close the session; see close_session)."""

    # -- session --------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def session_ttl(self) -> float:
        """The TTL the store granted to our session, in seconds (0 before open_session)."""

    @abc.abstractmethod
    async def open_session(self, ttl: float) -> None:
        """Create our session/lease with the given TTL (seconds)."""

    @abc.abstractmethod
    async def renew_session(self) -> None:
        """Extend our session by its TTL. Raises SessionLost if it no longer exists, DCSError on a
        transient failure. The caller measures the time it *sent* the request: the lease is valid
        for at most ``ttl`` after that moment."""

    @abc.abstractmethod
    async def close_session(self) -> None:
        """Destroy our session: every key bound to it is deleted at once."""

    # -- leader ---------------------------------------------------------------------------------
    @abc.abstractmethod
    async def acquire_leader(self, name: str) -> Leader | None:
        """Atomically create ``leader`` = name bound to our session if it does not exist.
        Returns the Leader (with its term) if we hold it now, None if someone else does."""

    @abc.abstractmethod
    async def release_leader(self, name: str, term: int) -> bool:
        """Delete ``leader`` if it still holds ``name`` at ``term``. True if deleted by us."""

    # -- members --------------------------------------------------------------------------------
    @abc.abstractmethod
    async def register_member(self, name: str, data: dict[str, Any]) -> None:
        """First write of our member key. Raises DuplicateMember if a live key with the same name
        carries a different ``instance_id`` in its data; takes over a key of our own previous
        incarnation (same ``instance_id``)."""

    @abc.abstractmethod
    async def put_member(self, name: str, data: dict[str, Any]) -> None:
        """Write our member key, bound to our session."""

    # -- initialize / config / commands --------------------------------------------------------
    @abc.abstractmethod
    async def try_initialize(self, name: str) -> bool:
        """Create ``initialize`` = name if absent (not bound to any session). True if we won."""

    @abc.abstractmethod
    async def cancel_initialize(self, name: str) -> bool:
        """Delete ``initialize`` if it still holds ``name`` (our bootstrap failed)."""

    @abc.abstractmethod
    async def put_config(self, config: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    async def put_switchover(self, command: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    async def delete_switchover(self) -> None: ...

    @abc.abstractmethod
    async def put_standby_promoted(self, record: dict[str, Any]) -> None:
        """Write the ``standby_promoted`` key (not bound to a session: it outlives its writer).
        Nothing in the agent deletes it: standby mode, once ended, stays ended."""

    @abc.abstractmethod
    async def put_sync(self, state: dict[str, Any]) -> None:
        """Write the synchronous set (master only, while it holds the lease)."""

    @abc.abstractmethod
    async def read_sync(self) -> tuple[dict[str, Any] | None, int]:
        """``sync``: (its JSON object, its modify index), or (None, 0) when absent."""

    @abc.abstractmethod
    async def swap_sync(self, state: dict[str, Any], index: int) -> bool:
        """Write ``sync`` = state if its modify index is still ``index`` (0: only if absent); True
        if written. A master changes its set through this: a write whose answer was lost can
        land only while the key is as that write read it, so one later swap from the same index
        rules it out for good (pgsidecar/syncrep.py)."""

    # -- scheduled backups ----------------------------------------------------------------------
    @abc.abstractmethod
    async def read_backup_slot(self, kind: str) -> tuple[dict[str, Any] | None, int]:
        """``backup/<kind>``: (its JSON object, its modify index), or (None, 0) when absent. A
        value that is not a JSON object reads as (None, index): it can be replaced by a swap."""

    @abc.abstractmethod
    async def swap_backup_slot(self, kind: str, value: dict[str, Any], index: int) -> bool:
        """Write ``backup/<kind>`` = value if its modify index is still ``index`` (0: only if the
        key does not exist). Not bound to a session: the record outlives its writer. True if
        written."""

    # -- the cluster's timeline counter ---------------------------------------------------------
    @abc.abstractmethod
    async def read_timeline(self) -> TimelineCounter:
        """The ``timeline`` key (``TimelineCounter()`` when absent). A value that is not a
        timeline id reads as 0 with the key's index, so a claim can overwrite it."""

    @abc.abstractmethod
    async def put_timeline(self, value: int, index: int) -> bool:
        """Write ``timeline`` = value if the key is still as read: absent when ``index`` is 0,
        else unchanged since modify index ``index``. True if written."""

    async def claim_timeline(self, at_least: int, attempts: int = 5) -> int:
        """Claim a timeline id for a promotion: the larger of ``at_least`` and one above the
        highest claimed so far, recorded before it is returned, so that no two promotions in the
        cluster ever name the same timeline (PostgreSQL alone picks one above the newest history
        file it can see, and two members promoted from the same point see the same ones).
        Raises DCSError if the key kept changing under us ``attempts`` times."""
        for _ in range(attempts):
            current = await self.read_timeline()
            value = max(at_least, current.value + 1)
            if value > MAX_TIMELINE:
                raise DCSError(f"timeline counter exhausted: {current.value}")
            if await self.put_timeline(value, current.index):
                return value
        raise DCSError("could not claim a timeline: the timeline key kept changing under us")

    # -- reading --------------------------------------------------------------------------------
    @abc.abstractmethod
    async def read_cluster(self) -> ClusterView:
        """A consistent read of every key of the cluster."""

    @abc.abstractmethod
    def watch(self) -> AsyncIterator[ClusterView]:
        """Yield the current view, then a new view after every change under the cluster prefix.
        Reconnects by itself (bounded backoff) and resumes from the last index seen; raises
        nothing but asyncio.CancelledError. While the store is unreachable it yields nothing."""
