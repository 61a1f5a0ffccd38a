"""What a node knows at one instant: the only argument of the decision core.

Plain frozen dataclasses, built by the runtime from its inputs (fsm.inputs.apply folds an input
into a snapshot). Nothing here does I/O, reads a clock or a file: time is a field (``now``,
monotonic seconds of the agent's own clock), so a decision is a pure function of a snapshot and a
recorded history can be replayed exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Protocol, TypeVar


class _Dataclass(Protocol):
    __dataclass_fields__: ClassVar[dict[str, Any]]


_D = TypeVar("_D", bound=_Dataclass)


def replace(obj: _D, /, **changes: Any) -> _D:
    """``dataclasses.replace`` for the frozen dataclasses of this module: a copy of ``obj`` with
    ``changes``, made by copying its attributes rather than by calling ``__init__`` again. The
    result is the same (none of these classes has a ``__post_init__``, an ``init=False`` field
    or slots), and the fold makes one or two per input, where ``dataclasses.replace`` was the
    largest single cost of running the machine. An unknown field is a TypeError, as there."""
    known = obj.__dataclass_fields__
    for name in changes:  # one look-up per change: a set difference costs one per field
        if name not in known:
            unknown = sorted(changes.keys() - known.keys())
            raise TypeError(f"{type(obj).__name__} has no field {unknown[0]!r}")
    new = object.__new__(type(obj))
    attrs = new.__dict__
    attrs.update(obj.__dict__)
    attrs.update(changes)
    return new


class DataState(StrEnum):
    """What pg_controldata says about the data directory, reduced to what decisions need."""

    UNKNOWN = "unknown"  # not probed yet
    MISSING = "missing"  # no data directory, or empty: must bootstrap or clone
    INVALID = "invalid"  # something is there but pg_controldata cannot read it: reclone
    STANDBY = "standby"  # last ran as a standby ("shut down in recovery" / "in archive recovery")
    PRIMARY_CLEAN = "primary_clean"  # last ran as a primary, shut down cleanly
    PRIMARY_CRASHED = (
        "primary_crashed"  # last ran as a primary, did not shut down ("in production")
    )


@dataclass(frozen=True)
class PgFacts:
    """Local PostgreSQL, as last probed."""

    data: DataState = DataState.UNKNOWN
    system_id: str | None = None
    running: bool = False
    accepting: bool = False  # answers queries
    in_recovery: bool | None = None
    timeline: int | None = None
    # primary: pg_current_wal_flush_lsn; standby: greatest of received/replayed
    lsn: int | None = None
    received_lsn: int | None = None
    replayed_lsn: int | None = None
    receiver_streaming: bool = False
    receiver_upstream: str | None = None  # host:port the walreceiver is connected to
    # the agent could not start it (consecutive failures since it last ran)
    start_failures: int = 0
    # PostgreSQL exited while the agent did not ask it to
    crashed: bool = False


@dataclass(frozen=True)
class MemberView:
    """A peer (or ourselves) as published in the DCS members/<name> key."""

    name: str
    role: str = "unknown"
    timeline: int | None = None
    lsn: int | None = None
    running: bool = False
    streaming: bool = False
    nofailover: bool = False
    failover_priority: int = 1
    api_url: str | None = None
    conn_host: str | None = None
    conn_port: int | None = None
    # after the leader vanished, members republish with election = the term they lost, so a
    # candidate knows their position is fresh
    election: int | None = None
    state: str | None = None

    @property
    def position(self) -> tuple[int, int]:
        return (self.timeline or 0, self.lsn or 0)


@dataclass(frozen=True)
class LeaderView:
    name: str
    term: int


@dataclass(frozen=True)
class Switchover:
    source: str | None  # the master being switched away from
    target: str | None  # None = any eligible member
    requested_at: float | None = None  # wall time
    # an operator failover (`pgsidecar failover --to X --force`): the target may race although
    # behind, or outside the synchronous set; the operator accepted the loss
    force: bool = False
    # a scheduled switchover: when, on our monotonic clock (None: now)
    at: float | None = None


@dataclass(frozen=True)
class SyncSet:
    """The synchronous set a master recorded in the DCS before relying on it: every member in
    it has every commit that master acknowledged (the master requires all of them to confirm)."""

    leader: str
    term: int | None
    members: frozenset[str]


@dataclass(frozen=True)
class DcsFacts:
    reachable: bool = False
    leader: LeaderView | None = None
    members: dict[str, MemberView] = field(default_factory=dict)
    initialized_by: str | None = None
    switchover: Switchover | None = None
    paused: bool = False
    # term of the last leader we saw vanish (None before the first loss), and when (our clock)
    lost_term: int | None = None
    lost_at: float | None = None
    # last LSN the last known leader published: the reference for maximum_lag_on_failover
    last_leader_lsn: int | None = None
    last_leader_timeline: int | None = None
    # the store's index (etcd revision / Consul index) this view was read at
    index: int = 0
    sync: SyncSet | None = None
    # ``promote-cluster`` wrote the promotion marker: standby mode is over for good (a view
    # without it later never turns it back on)
    standby_promoted: bool = False


@dataclass(frozen=True)
class LeaseFacts:
    """Our own hold on the leader key, as the runtime knows it from acquire/renew results."""

    held: bool = False
    term: int | None = None
    # our clock: the moment after which we must no longer behave as master (fencing deadline)
    deadline: float | None = None


# The leader lease TTL when nothing sets one (pgsidecar.config and the CLIs take it from here).
# 5 s: an hour of `pgsidecar lab soak --ttl 5` on a loaded 2-core machine and the fault suite
# held at it, and a hard kill costs about one TTL (ARCHITECTURE.md, "Why the default TTL is 5 s").
DEFAULT_TTL = 5.0


@dataclass(frozen=True)
class Settings:
    """The subset of config the decisions depend on (cluster config merged over local)."""

    ttl: float = DEFAULT_TTL
    maximum_lag_on_failover: int = 1024 * 1024
    election_timeout: float = 1.0
    master_start_timeout: float = 30.0
    rewind_attempts: int = 2
    nofailover: bool = False
    failover_priority: int = 1
    synchronous_mode: str = "off"  # off | on | strict
    synchronous_node_count: int = 1
    # the local config has a standby_cluster section: the leader follows another cluster
    standby_cluster: bool = False


# the ``upstream`` of a standby leader: the source cluster's master (not one of our members;
# member names cannot contain parentheses)
STANDBY_SOURCE = "(source cluster)"


@dataclass(frozen=True)
class Snapshot:
    name: str
    now: float = 0.0
    pg: PgFacts = PgFacts()
    dcs: DcsFacts = DcsFacts()
    lease: LeaseFacts = LeaseFacts()
    settings: Settings = Settings()
    # an effect (initdb, clone, rewind, start, stop, promote, acquire) is in flight: wait for it
    busy: str | None = None
    # results of effects that the decisions depend on
    bootstrap_lost: bool = False  # someone else won the initialize key
    rewind_failures: int = 0
    rewind_done: bool = False  # the last rewind (or its precheck) succeeded for this data dir
    needs_rewind: bool = False  # a replica's WAL receiver found our timeline forked
    clone_failures: int = 0
    master_down_since: float | None = None  # master: PostgreSQL not running since (our clock)
    stop_requested: bool = False  # SIGTERM / pod deletion: hand off and exit
    race_lost_term: int | None = None  # we raced at this term and lost: do not race again on it
    race_lost_at: float | None = None  # when (our clock): the winner's key must show within a TTL
    # the last effect whose *call* failed (an error or timeout, as opposed to an answer "no"),
    # how many times in a row, and when it may be retried (bounded back-off, our clock)
    # the term of the leader key of ours we deleted (hand-off, give-up, release): a view still
    # showing it is older than the deletion, not a key left behind
    released_term: int | None = None
    failed_effect: str | None = None
    effect_failures: int = 0
    retry_at: float | None = None
    # the member our primary_conninfo points at, as last configured by the agent (None: no upstream)
    upstream: str | None = None
    # candidate: we published a fresh position for this lost term (peers can compare with it)
    announced_term: int | None = None
    # Kubernetes: members whose pod is gone (deleted): a candidate does not wait on them
    pods_gone: frozenset[str] = frozenset()
    # an operator command addressed to this member (REST API): "restart" or "reinit"
    command: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def with_(self, **changes: Any) -> Snapshot:
        return replace(self, **changes)
