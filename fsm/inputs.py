"""Inputs of the machine and how each one folds into the snapshot. Pure: no I/O, no clock.

An input is (type, now, data) with JSON-able data; the runtime records every input it feeds the
machine, so ``step`` applied to the recorded inputs reproduces the recorded transitions.

    start    data: {settings: {...}}                 first input of an agent run
    dcs      data: {leader, members, initialize, config, switchover, sync, standby_promoted}
                                                     a new view of the DCS
    dcs_down data: {}                                the DCS stopped answering
    pg       data: PgFacts fields                    a PostgreSQL probe that differs from the last
    lease    data: {held, term, deadline}            result of acquire / renew / loss of the lease
    effect   data: {name, done, ok, ...}             an effect finished (or reported a finding)
    timer    data: {}                                a wake-up asked for by a Decision.wake_at
    stop     data: {}                                SIGTERM or pod deletion: hand off and exit
    peer     data: {record}                          a peer's record from Kafka (advisory only)
    command  data: {name}                            an operator command for this member (restart,
                                                     reinit), from the REST API
    pod      data: {event, member, own, deleting, ready, ...}   a Kubernetes pod event: our own pod
                                                     terminating is a stop; a peer's pod gone
                                                     is advisory (it is not waited on)

Anything malformed in ``data`` (values written by hand, or by another version, into the DCS) is
ignored field by field: a member whose key cannot be read is left out, never guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from fsm.machine import EFFECT, TABLE, Decision, Effect, Role, decide, retry_delay
from fsm.snapshot import (
    DataState,
    DcsFacts,
    LeaderView,
    LeaseFacts,
    MemberView,
    PgFacts,
    Settings,
    Snapshot,
    Switchover,
    SyncSet,
    replace,
)

INPUT_TYPES = (
    "start",
    "dcs",
    "dcs_down",
    "pg",
    "lease",
    "effect",
    "timer",
    "stop",
    "peer",
    "pod",
    "command",
)

# cluster config keys (DCS ``config``) that override local settings, with their types
DYNAMIC_SETTINGS: dict[str, type] = {
    "ttl": float,
    "maximum_lag_on_failover": int,
    "election_timeout": float,
    "master_start_timeout": float,
    "synchronous_mode": str,
    "synchronous_node_count": int,
}

SYNC_MODES = ("off", "on", "strict")


@dataclass(frozen=True)
class Input:
    type: str
    now: float
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "now": self.now, "data": self.data}

    @classmethod
    def from_dict(cls, d: Any) -> Input:
        if not isinstance(d, dict):
            raise ValueError("input is not an object")
        t, now, data = d.get("type"), d.get("now"), d.get("data")
        if t not in INPUT_TYPES:
            raise ValueError(f"unknown input type {t!r}")
        if not isinstance(now, (int, float)) or isinstance(now, bool):
            raise ValueError("input 'now' must be a number")
        if not isinstance(data, dict):
            raise ValueError("input 'data' must be an object")
        return cls(t, float(now), data)


# --- tolerant field readers ------------------------------------------------------------------------


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _float(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    return float(v) if isinstance(v, (int, float)) else None


def _str(v: Any) -> str | None:
    return str(v) if isinstance(v, str) else None  # str(): a StrEnum (Effect) becomes its value


def _bool(v: Any, default: bool = False) -> bool:
    return v if isinstance(v, bool) else default


def member_view(name: str, d: Any) -> MemberView | None:
    """A member as published; None if the value is not usable at all."""
    if not isinstance(d, dict):
        return None
    prio = _int(d.get("failover_priority"))
    tags = d.get("tags")
    if isinstance(tags, dict):
        nofailover = _bool(tags.get("nofailover"))
        if prio is None:
            prio = _int(tags.get("failover_priority"))
    else:
        nofailover = _bool(d.get("nofailover"))
    return MemberView(
        name=name,
        role=_str(d.get("role")) or "unknown",
        timeline=_int(d.get("timeline")),
        lsn=_int(d.get("lsn")),
        running=_bool(d.get("running")),
        streaming=_bool(d.get("streaming")),
        nofailover=nofailover,
        failover_priority=1 if prio is None or prio < 0 else prio,
        api_url=_str(d.get("api_url")),
        conn_host=_str(d.get("host")),
        conn_port=_int(d.get("port")),
        election=_int(d.get("election")),
        state=_str(d.get("state")),
    )


def _settings(base: Settings, config: Any) -> Settings:
    if not isinstance(config, dict):
        return base
    changes: dict[str, Any] = {}
    for key, typ in DYNAMIC_SETTINGS.items():
        v = config.get(key)
        if key == "synchronous_mode":
            # Patroni-style booleans are accepted too
            mode = {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v
            if mode in SYNC_MODES:
                changes[key] = mode
            continue
        if typ is float:
            f = _float(v)
            if f is not None and f > 0:
                changes[key] = f
        else:
            i = _int(v)
            if i is not None and i >= 0:
                changes[key] = i
    return replace(base, **changes) if changes else base


def settings_from(d: Any) -> Settings:
    out = Settings()
    if not isinstance(d, dict):
        return out
    names = {f.name: f.type for f in fields(Settings)}
    changes: dict[str, Any] = {}
    for k, v in d.items():
        if k not in names:
            continue
        if isinstance(v, bool) or k in ("nofailover", "standby_cluster"):
            if isinstance(v, bool) and k in ("nofailover", "standby_cluster"):
                changes[k] = v
            continue
        if k == "synchronous_mode":
            if v in SYNC_MODES:
                changes[k] = v
            continue
        if isinstance(v, (int, float)):
            changes[k] = (
                int(v)
                if k
                in (
                    "maximum_lag_on_failover",
                    "rewind_attempts",
                    "failover_priority",
                    "synchronous_node_count",
                )
                else float(v)
            )
    return replace(out, **changes)


def pg_facts(d: dict[str, Any]) -> PgFacts:
    try:
        data = DataState(d.get("data", "unknown"))
    except ValueError:
        data = DataState.UNKNOWN
    return PgFacts(
        data=data,
        system_id=_str(d.get("system_id")),
        running=_bool(d.get("running")),
        accepting=_bool(d.get("accepting")),
        in_recovery=d.get("in_recovery") if isinstance(d.get("in_recovery"), bool) else None,
        timeline=_int(d.get("timeline")),
        lsn=_int(d.get("lsn")),
        received_lsn=_int(d.get("received_lsn")),
        replayed_lsn=_int(d.get("replayed_lsn")),
        receiver_streaming=_bool(d.get("receiver_streaming")),
        receiver_upstream=_str(d.get("receiver_upstream")),
        start_failures=_int(d.get("start_failures")) or 0,
        crashed=_bool(d.get("crashed")),
    )


_PG_FACTS_FIELDS = tuple(f.name for f in fields(PgFacts))


def pg_facts_to_dict(p: PgFacts) -> dict[str, Any]:
    out: dict[str, Any] = {name: getattr(p, name) for name in _PG_FACTS_FIELDS}
    out["data"] = p.data.value
    return out


# --- the fold ------------------------------------------------------------------------------------


def _apply_dcs(role: Role, s: Snapshot, d: dict[str, Any]) -> Snapshot:
    prev = s.dcs
    raw_leader = d.get("leader")
    leader = None
    if isinstance(raw_leader, dict):
        name, term = _str(raw_leader.get("name")), _int(raw_leader.get("term"))
        if name and term is not None:
            leader = LeaderView(name, term)
    members: dict[str, MemberView] = {}
    raw_members = d.get("members")
    if isinstance(raw_members, dict):
        for name, value in raw_members.items():
            if isinstance(name, str):
                mv = member_view(name, value)
                if mv is not None:
                    members[name] = mv
    switchover = None
    raw_sw = d.get("switchover")
    if isinstance(raw_sw, dict):
        switchover = Switchover(
            source=_str(raw_sw.get("from")),
            target=_str(raw_sw.get("to")),
            requested_at=_float(raw_sw.get("requested_at")),
            force=_bool(raw_sw.get("force")),
            at=_float(raw_sw.get("at_monotonic")),
        )
    config = d.get("config")
    paused = isinstance(config, dict) and config.get("pause") is True
    sync = None
    raw_sync = d.get("sync")
    if isinstance(raw_sync, dict) and _str(raw_sync.get("leader")):
        names = raw_sync.get("members")
        sync = SyncSet(
            leader=str(raw_sync["leader"]),
            term=_int(raw_sync.get("term")),
            members=frozenset(n for n in names if isinstance(n, str))
            if isinstance(names, list)
            else frozenset(),
        )
    lost_term, lost_at = prev.lost_term, prev.lost_at
    if prev.leader is not None and leader is None:
        lost_term, lost_at = prev.leader.term, s.now
    elif leader is None and lost_term is None:
        lost_term, lost_at = 0, s.now
    last_lsn, last_tl = prev.last_leader_lsn, prev.last_leader_timeline
    if leader is not None and leader.name in members:
        lm = members[leader.name]
        if lm.lsn is not None:
            last_lsn, last_tl = lm.lsn, lm.timeline
    elif leader is None and prev.leader is not None and prev.leader.name in members:
        # the old master published its last position on its way out (switchover, shutdown)
        lm = members[prev.leader.name]
        if lm.lsn is not None:
            last_lsn, last_tl = lm.lsn, lm.timeline
    if s.dcs.paused and not paused and role is Role.MASTER and not s.pg.running:
        # resume with the master's PostgreSQL stopped: it is restarted in place, with the full
        # master_start_timeout from now
        s = replace(s, master_down_since=s.now)
    base = s.extra.get("base_settings")
    settings = _settings(base if isinstance(base, Settings) else s.settings, config)
    dcs = DcsFacts(
        reachable=True,
        leader=leader,
        members=members,
        initialized_by=_str(d.get("initialize")),
        switchover=switchover,
        paused=paused,
        lost_term=lost_term,
        lost_at=lost_at,
        last_leader_lsn=last_lsn,
        last_leader_timeline=last_tl,
        index=_int(d.get("index")) or 0,
        sync=sync,
        standby_promoted=prev.standby_promoted or isinstance(d.get("standby_promoted"), dict),
    )
    return replace(s, dcs=dcs, settings=settings)


EFFECT_NAMES = frozenset(EFFECT.values()) - {Effect.NONE}


def _apply_effect(s: Snapshot, d: dict[str, Any]) -> Snapshot:
    """An effect's outcome. ``ok: false`` means the *call* failed (an error or a timeout: the
    outcome is unknown, e.g. an acquire the DCS may have committed): the effect is retried after
    a bounded back-off. ``ok: true`` with a negative answer (``won: false``) is an answer."""
    name = _str(d.get("name")) or ""
    ok = _bool(d.get("ok"))
    failed = d.get("ok") is False
    changes: dict[str, Any] = {}
    if _bool(d.get("done"), True) and s.busy == name:
        changes["busy"] = None
    if name in EFFECT_NAMES and _bool(d.get("done"), True):
        if failed:
            n = s.effect_failures + 1 if s.failed_effect == name else 1
            changes.update(
                failed_effect=name,
                effect_failures=n,
                retry_at=s.now + retry_delay(n, s.settings.ttl),
            )
        elif s.failed_effect == name or s.failed_effect is None:
            changes.update(failed_effect=None, effect_failures=0, retry_at=None)
    released = _int(d.get("released_term"))
    if released is not None:
        changes["released_term"] = released
    if name == "bootstrap":
        if not failed:
            changes["bootstrap_lost"] = not _bool(d.get("won"))
    elif name == "clone":
        changes["clone_failures"] = 0 if ok else s.clone_failures + 1
    elif name in ("start_standby", "follow"):
        if ok:
            changes["upstream"] = _str(d.get("upstream"))
    elif name == "announce":
        if not failed:
            changes["announced_term"] = _int(d.get("term"))
    elif name == "acquire":
        if not failed and not _bool(d.get("won")):
            changes["race_lost_term"] = s.dcs.lost_term or 0
            changes["race_lost_at"] = s.now
    elif name == "rewind":
        if ok:
            changes["rewind_done"] = True
            changes["needs_rewind"] = False
        else:
            changes["rewind_failures"] = s.rewind_failures + 1
    elif name == "wipe":
        changes.update(rewind_failures=0, rewind_done=False, needs_rewind=False, upstream=None)
        if s.command == "reinit":
            changes["command"] = None
    elif name == "restart_pg":
        changes["command"] = None
    elif name == "diverged":
        changes["needs_rewind"] = True
    return replace(s, **changes) if changes else s


def _apply_pod(s: Snapshot, d: dict[str, Any]) -> Snapshot:
    event, member = _str(d.get("event")), _str(d.get("member"))
    if member is None:
        return s
    gone = event == "DELETED" or _bool(d.get("deleting"))
    if _bool(d.get("own")):
        # our own pod is terminating: the same graceful hand-off as SIGTERM, started as soon as
        # the deletion timestamp appears (before the kubelet sends SIGTERM)
        return replace(s, stop_requested=True) if gone else s
    pods_gone = s.pods_gone | {member} if gone else s.pods_gone - {member}
    return replace(s, pods_gone=pods_gone) if pods_gone != s.pods_gone else s


def apply(role: Role, s: Snapshot, inp: Input) -> Snapshot:
    """Fold one input into the snapshot."""
    s = replace(s, now=inp.now)
    d = inp.data
    if inp.type == "start":
        settings = settings_from(d.get("settings"))
        extra = dict(s.extra)
        extra["base_settings"] = settings
        return replace(s, settings=settings, extra=extra)
    if inp.type == "dcs":
        return _apply_dcs(role, s, d)
    if inp.type == "dcs_down":
        return replace(s, dcs=replace(s.dcs, reachable=False))
    if inp.type == "pg":
        pg = pg_facts(d)
        down_since = s.master_down_since
        if role is Role.MASTER and not pg.running and s.dcs.paused:
            down_since = None  # an operator stopped it during maintenance: no clock runs
        elif role is Role.MASTER and not pg.running:
            down_since = down_since if down_since is not None else s.now
        elif pg.running:
            down_since = None
        return replace(s, pg=pg, master_down_since=down_since)
    if inp.type == "lease":
        return replace(
            s,
            lease=LeaseFacts(
                held=_bool(d.get("held")),
                term=_int(d.get("term")),
                deadline=_float(d.get("deadline")),
            ),
        )
    if inp.type == "effect":
        return _apply_effect(s, d)
    if inp.type == "stop":
        return replace(s, stop_requested=True)
    if inp.type == "pod":
        return _apply_pod(s, d)
    if inp.type == "command":
        name = _str(d.get("name"))
        return replace(s, command=name) if name in ("restart", "reinit") else s
    return s  # timer, peer: advisory / wake-up only


def _after_fire(source: Role, dest: Role, trigger: str, s: Snapshot) -> Snapshot:
    """Bookkeeping every transition implies (deterministic, so replay sees the same)."""
    effect = EFFECT[trigger]
    changes: dict[str, Any] = {"busy": None if effect is Effect.NONE else str(effect)}
    if dest is Role.CANDIDATE and source is not Role.CANDIDATE:
        changes["announced_term"] = None
    if dest is Role.REWINDING and source is not Role.REWINDING:
        changes.update(rewind_failures=0, rewind_done=False, upstream=None)
    if dest is Role.MASTER:
        changes["master_down_since"] = None if s.pg.running else s.now
        changes["upstream"] = None
    if dest is Role.INIT:
        changes.update(bootstrap_lost=False, upstream=None)
    if dest is Role.DEMOTED:
        changes["upstream"] = None
    if dest is Role.STANDBY_LEADER and source is not Role.STANDBY_LEADER:
        changes["upstream"] = None  # re-pointed at the source cluster by the effect
    return replace(s, **changes)


def dest_of(role: Role, trigger: str) -> Role:
    for row in TABLE:
        if row.source is role and row.trigger == trigger:
            return row.dest
    raise KeyError(f"no transition {role.value} --{trigger}-->")


MAX_CHAIN = 4


def step(
    role: Role, s: Snapshot, inp: Input
) -> tuple[Snapshot, list[tuple[Role, Decision, Role]], Decision]:
    """Fold ``inp``, then decide repeatedly (a transition whose effect is "none" may enable the
    next one at once). Returns the new snapshot, the transitions taken as (source, decision, dest)
    and the final non-firing decision (which may carry ``wake_at``)."""
    s = apply(role, s, inp)
    taken: list[tuple[Role, Decision, Role]] = []
    for _ in range(MAX_CHAIN):
        d = decide(role, s)
        if d.trigger is None:
            return s, taken, d
        dest = dest_of(role, d.trigger)
        taken.append((role, d, dest))
        s = _after_fire(role, dest, d.trigger, s)
        role = dest
    return s, taken, Decision(None)
