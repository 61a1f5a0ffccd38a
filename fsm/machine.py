"""The role state machine of one pgsidecar member: theory, table, guards. No I/O.

Theory of operation
===================

Each member runs one agent. The agent's *role* is one of seven states:

    init       the agent has just started; it finds out what data it has and what the cluster
               looks like, and gets a usable data directory (initdb if it won the ``initialize``
               key of a new cluster, pg_basebackup from the master otherwise)
    replica    PostgreSQL runs as a standby (read-only), streaming from the master if there is one
    candidate  the leader key is free: the member has published a fresh WAL position and compares it
               with its peers'; the most advanced eligible member races for the key
    master     the member holds the leader key (a lease in the DCS) and its PostgreSQL is writable
    demoted    the member was master and is no longer allowed to be: PostgreSQL is being (or has
               been) stopped; nothing is writable
    rewinding  the member's data may have forked from the master's timeline (a former master): it
               is brought back with pg_rewind, or thrown away and recloned when rewind fails
    standby_leader
               a standby cluster's leader: it holds the leader key as a master does, but its
               PostgreSQL stays a standby of another cluster's master (the ``standby_cluster``
               section of the local config); the other members follow it as they would a master.
               Only the cluster's promotion marker (``pgsidecar promote-cluster``) turns it
               into a master, through the same promotion as a won election

Safety rests on one rule: **only the holder of the leader key may run a writable PostgreSQL.** The
key is taken by an atomic create-if-absent bound to a lease with a TTL, so two members can never
both hold it; ``master`` is entered only by ``won_lease`` (guard: the lease is held), and
``decide`` checks the lease *first* in ``master``, before anything else, even while an effect is in
flight. The agent's watchdog thread fences PostgreSQL on its own clock when the lease cannot be
renewed in time (see pgsidecar/watchdog.py); this machine then records the fact as ``lease_lost``.
PostgreSQL is always started by the agent with the settings of the current role already written,
so a former master cannot come back writable on its own: from ``init`` it can only go to
``replica`` (read-only) or ``rewinding``.

Liveness rests on the second rule: **the most advanced replica wins.** When the key vanishes, every
replica moves to ``candidate`` and republishes its member key with its current (timeline, LSN) and
``election = <the lost term>``. A candidate races only when no eligible peer is ahead of it (ties:
higher ``failover_priority``, then the smaller name), after every peer has published a fresh
position or ``election_timeout`` has passed. A switchover names its target: the target waits until
it has received the WAL position the old master announced on its way out, and the others stand
aside for one TTL.

How the machine is driven
=========================

The runtime (pgsidecar/agent/loop.py) owns one asyncio queue of inputs. For each input it calls
``step(role, snapshot, input)`` (fsm/inputs.py folds the input into the snapshot, then ``decide``
picks at most one trigger), fires the trigger on the ``RoleMachine`` (which checks it against the
table below and produces a Transition record), and runs the effect bound to the trigger
(``EFFECT`` below; one function per Effect in pgsidecar/agent/effects.py). The effect's outcome
comes back as another input. ``busy`` in the snapshot says an effect is in flight; decisions wait
for it, except the master's lease check.

Because ``decide`` is a pure function of (role, snapshot) and the snapshot is a pure fold of the
recorded inputs, replaying a node's recorded inputs into a fresh machine must reproduce its
recorded transitions exactly (``pgsidecar replay``).

The table
=========

One row per transition: (source, trigger, dest, why). Every (state, trigger) pair not in the table
is rejected by the machine (transitions.MachineError); tests/unit/test_fsm_table.py checks every pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

from transitions import Machine

from fsm.records import Transition, format_lsn
from fsm.snapshot import STANDBY_SOURCE, DataState, LeaderView, MemberView, Snapshot


class Role(StrEnum):
    INIT = "init"
    REPLICA = "replica"
    CANDIDATE = "candidate"
    MASTER = "master"
    DEMOTED = "demoted"
    REWINDING = "rewinding"
    STANDBY_LEADER = "standby_leader"


class Row(NamedTuple):
    source: Role
    trigger: str
    dest: Role
    why: str


# fmt: off
I, R, C, M, D, W = Role.INIT, Role.REPLICA, Role.CANDIDATE, Role.MASTER, Role.DEMOTED, Role.REWINDING  # noqa: E741
S = Role.STANDBY_LEADER

TABLE: tuple[Row, ...] = (
    # --- init: get a usable data directory, then start read-only ----------------------------------
    Row(I, "bootstrap",          I, "The cluster has no initialize key and we have no data: race for the key and, if we win, run initdb (in a standby cluster: copy the source cluster's master)."),
    Row(I, "clone",              I, "We have no usable data and a master exists: copy it with pg_basebackup."),
    Row(I, "start_replica",      R, "Our data is a standby's (or there is no master): start PostgreSQL read-only; a writable start needs the lease."),
    Row(I, "rewind",             W, "Our data last ran as a primary while another member leads: its timeline may have forked, check before starting."),
    Row(I, "release_key",        I, "The leader key names us, left by an earlier run of this agent: delete it (compare-and-delete on its term) so the election starts now."),
    # --- replica: follow the master, stand for election when there is none ------------------------
    Row(R, "follow",             R, "The master changed: point primary_conninfo at the new one (a reload, no restart)."),
    Row(R, "restart",            R, "PostgreSQL is not running on a replica: start it again as a standby."),
    Row(R, "leader_lost",        C, "No member holds the leader key: publish our fresh position and stand for election."),
    Row(R, "rewind",             W, "Our WAL receiver cannot follow the master's timeline: our history forked, rewind it."),
    Row(R, "reclone",            I, "Our data directory is gone or unreadable: go back to init, which clones from the master."),
    Row(R, "restart_pg",         R, "An operator asked for a restart: stop PostgreSQL cleanly and start it again as a standby."),
    Row(R, "reinit",             I, "An operator asked to throw our data away: wipe it and go back to init, which clones from the master."),
    Row(R, "release_key",        R, "The leader key names us but we hold no lease (a lost race against our own old key, an etcd restart that renewed it): delete it, or everyone follows a master that is not there."),
    # --- candidate: the most advanced eligible member races ---------------------------------------
    Row(C, "announce",           C, "Our fresh position is not published for this election (the last attempt failed, or a newer election began): publish it again."),
    Row(C, "race",               C, "Every eligible peer has published a fresh position and none is ahead of us: try to take the leader key."),
    Row(C, "won_lease",          M, "We hold the leader key: promote PostgreSQL (or start it as primary)."),
    Row(C, "won_standby_lease",  S, "We hold the leader key of a standby cluster: stay a standby and follow the source cluster's master; promoting would fork the cluster away from its source."),
    Row(C, "lost_race",          R, "Another member took the leader key: follow it."),
    Row(C, "stand_down",         R, "We may not become master now (DCS unreachable, paused, tagged nofailover, or too far behind)."),
    # --- master: writable only while the lease is held --------------------------------------------
    Row(M, "restart_in_place",   M, "PostgreSQL stopped while we hold the lease: restart it as primary on the same timeline."),
    Row(M, "lease_lost",         D, "We no longer hold the lease (renewal failed past our deadline, or the key is gone or someone else's): stop writes now."),
    Row(M, "shutdown",           D, "We are asked to stop (SIGTERM, pod deletion): stop PostgreSQL cleanly, then release the lease at once."),
    Row(M, "switchover",         D, "A switchover to another member was requested: stop cleanly so it receives all our WAL, then release the lease."),
    Row(M, "start_timeout",      D, "PostgreSQL did not come back within master_start_timeout: give the lease up so a replica can take over."),
    Row(M, "restart_pg",         M, "An operator asked for a restart of the master: restart PostgreSQL in place, keeping the lease and the timeline."),
    Row(M, "promote_failed",     D, "Promotion failed (an error, not a lost race): give the lease up so that a member that can promote takes over."),
    # --- standby_leader: holds the lease, follows the source cluster, never writable -------------
    Row(S, "follow_source",      S, "Our primary_conninfo does not point at the source cluster (the last re-pointing failed): point it there (a reload)."),
    Row(S, "restart_standby_leader", S, "PostgreSQL is not running on the standby leader: start it again as a standby of the source cluster."),
    Row(S, "standby_lease_lost", R, "We no longer hold the lease: another member may lead now; our PostgreSQL was never writable, so there is nothing to fence: give the key up and follow whoever leads."),
    Row(S, "promote_cluster",    M, "The cluster's promotion marker is set (promote-cluster) and we hold the lease: promote through the normal path and become the master."),
    # --- demoted: a former master, PostgreSQL stopped ---------------------------------------------
    Row(D, "rejoin",             W, "Another member is master: check our timeline against it (rewind if forked) before starting as its replica."),
    Row(D, "start_replica",      R, "No member holds the lease: start read-only (our data is the latest we know) and stand for election."),
    Row(D, "reinit",             I, "An operator asked to throw our data away: wipe it and go back to init, which clones from the master."),
    Row(D, "fence",              D, "PostgreSQL still runs although we are no longer master (the stop failed or was interrupted): stop it again."),
    Row(D, "release_key",        D, "We are no longer master but still hold the lease, or the key still names us (its release failed): give it up so another member can take over."),
    # --- rewinding: a forked former master comes back ---------------------------------------------
    Row(W, "retry_rewind",       W, "The last pg_rewind attempt failed and attempts remain: try again."),
    Row(W, "rewound",            R, "Our data now follows the master's timeline (rewound, or no rewind was needed): start as its standby."),
    Row(W, "reclone",            I, "pg_rewind failed rewind_attempts times: throw the data away and clone afresh."),
    Row(W, "release_key",        W, "The leader key still names us, a former master (its release failed): delete it, there is nothing to rewind against while it stands."),
    Row(W, "reinit",             I, "An operator asked to throw our data away instead of rewinding: wipe it and clone afresh."),
    Row(W, "start_replica",      R, "No member holds the leader key, so there is nothing to rewind against, and the synchronous set may let only us lead: start read-only, as a demoted master does, and stand for election; a fork is found and rewound once a master appears."),
)
# fmt: on

TRIGGERS: tuple[str, ...] = tuple(sorted({row.trigger for row in TABLE}))


class Effect(StrEnum):
    """What the runtime does for a trigger (pgsidecar/agent/effects.py). ``busy``
    is set to it while it runs, and its outcome comes back as an ``effect`` input with this name:
    ``ok: true`` (with its answer, e.g. ``won``) or ``ok: false`` (the call failed)."""

    NONE = "none"
    BOOTSTRAP = "bootstrap"
    CLONE = "clone"
    START_STANDBY = "start_standby"
    REWIND = "rewind"
    FOLLOW = "follow"
    ANNOUNCE = "announce"
    WIPE = "wipe"
    ACQUIRE = "acquire"
    PROMOTE = "promote"
    START_PRIMARY = "start_primary"
    FENCE = "fence"
    HANDOFF = "handoff"
    GIVE_UP = "give_up"
    RESTART_PG = "restart_pg"
    RELEASE = "release"


_E = Effect
# The effect the runtime runs for each trigger; ``busy`` is set to it.
EFFECT: dict[str, Effect] = {
    "bootstrap": _E.BOOTSTRAP,
    "clone": _E.CLONE,
    "start_replica": _E.START_STANDBY,
    "rewind": _E.REWIND,
    "follow": _E.FOLLOW,
    "restart": _E.START_STANDBY,
    "leader_lost": _E.ANNOUNCE,
    "reclone": _E.WIPE,
    "race": _E.ACQUIRE,
    "won_lease": _E.PROMOTE,
    "won_standby_lease": _E.FOLLOW,
    "follow_source": _E.FOLLOW,
    "restart_standby_leader": _E.START_STANDBY,
    "standby_lease_lost": _E.RELEASE,
    "promote_cluster": _E.PROMOTE,
    "lost_race": _E.NONE,
    "stand_down": _E.NONE,
    "restart_in_place": _E.START_PRIMARY,
    "lease_lost": _E.FENCE,
    "shutdown": _E.HANDOFF,
    "switchover": _E.HANDOFF,
    "start_timeout": _E.GIVE_UP,
    "rejoin": _E.REWIND,
    "retry_rewind": _E.REWIND,
    "rewound": _E.START_STANDBY,
    "restart_pg": _E.RESTART_PG,
    "reinit": _E.WIPE,
    "release_key": _E.RELEASE,
    "announce": _E.ANNOUNCE,
    "promote_failed": _E.GIVE_UP,
    "fence": _E.FENCE,
}

# What a wait without a wake-up time is waiting for. ``decide`` never returns such a wait without
# naming one of these; each names an input that some component other than a finished effect of
# our own is bound to deliver (tests/unit/test_fsm_liveness.py checks every wait against this list on
# generated histories). A wait for "our own effect that is no longer running" is the wedge this
# list exists to rule out: failed effects are retried (RETRY_*) or lead to a transition instead.
AWAITS: dict[str, str] = {
    "effect": "an effect is in flight (``busy``): the runtime posts its outcome, ok or failed, whatever happens",
    "stop": "a stop is being carried out: the runtime stops PostgreSQL and exits",
    "operator": "the cluster is paused: an operator's resume arrives as a DCS view",
    "dcs_reachable": "the DCS does not answer: the renewal loop posts a fresh view as soon as it does",
    "leader_change": "another member holds the leader key and we follow it: its loss or change arrives from the DCS (the key lapses with its holder's lease)",
    "lease_watchdog": "we are master holding the lease: renewal, the fencing watchdog and the fence process post a lease loss on their own clock",
    "key_released": "we deleted the leader key that named us (or found it already gone): the DCS reports the deletion",
    "peers": "no leader and we may not take the key now (ineligible, or rewinding with unusable data): another member's election or a change of our eligibility arrives from the DCS or a probe",
    "peer_bootstrap": "another member won the initialize key: it takes the leader key when its initdb is done, or deletes the initialize key if it fails",
    "pg_probe": "our PostgreSQL's state is not known yet: the probe loop posts it (every second, on any change)",
}

# Bounded back-off for an effect whose call failed: the same effect is not fired again before
# ``retry_at`` (RETRY_BASE * 2^(n-1), at most RETRY_CAP and at most half a TTL).
RETRY_BASE = 0.2
RETRY_CAP = 5.0


def retry_delay(failures: int, ttl: float) -> float:
    if failures <= 0:
        return 0.0
    return float(min(RETRY_CAP, ttl / 2, RETRY_BASE * 2.0 ** min(failures - 1, 16)))


@dataclass(frozen=True)
class Decision:
    """What ``decide`` returns: a trigger with its reason, or nothing (trigger None) with an
    optional time (our clock) at which to decide again if no input arrives before."""

    trigger: str | None
    reason: str = ""
    wake_at: float | None = None
    # a wait without wake_at names the input it waits for: a key of AWAITS
    awaits: str | None = None


def _wait(awaits: str, reason: str = "") -> Decision:
    assert awaits in AWAITS, awaits
    return Decision(None, reason or AWAITS[awaits], awaits=awaits)


def _wait_until(t: float, reason: str = "") -> Decision:
    return Decision(None, reason, wake_at=t)


# --- guards: pure functions of a snapshot ----------------------------------------------------------


# a data directory PostgreSQL can start from (as a standby, whatever it last ran as)
_USABLE_DATA = (DataState.STANDBY, DataState.PRIMARY_CLEAN, DataState.PRIMARY_CRASHED)


def lease_valid(s: Snapshot) -> bool:
    """We hold the lease and, on our own clock, its fencing deadline has not passed."""
    return s.lease.held and (s.lease.deadline is None or s.now < s.lease.deadline)


def standby_mode(s: Snapshot) -> bool:
    """Is this a standby cluster still following its source? The local config says it is one;
    the DCS's promotion marker can only end that, never start it."""
    return s.settings.standby_cluster and not s.dcs.standby_promoted


def eligible(s: Snapshot) -> tuple[bool, str]:
    """May this member become master at all right now?"""
    if s.settings.nofailover:
        return False, "tagged nofailover"
    if s.settings.failover_priority <= 0:
        return False, "failover_priority is 0"
    if s.dcs.paused:
        return False, "the cluster is paused"
    if not s.dcs.reachable:
        return False, "the DCS is unreachable"
    if not s.pg.running or s.pg.lsn is None or s.pg.timeline is None:
        return False, "our PostgreSQL is not running or its position is unknown"
    sw = s.dcs.switchover
    if sw is not None and sw.force and sw.target == s.name and s.dcs.leader is None:
        return True, ""  # the operator forced a failover to us and accepted the loss
    if not sync_allows(s, s.name):
        return False, "not in the synchronous set the last master recorded"
    ref = s.dcs.last_leader_lsn
    if ref is not None and s.pg.timeline == s.dcs.last_leader_timeline:
        lag = ref - s.pg.lsn
        if lag > s.settings.maximum_lag_on_failover:
            return (
                False,
                f"{lag} bytes behind the last master position, above maximum_lag_on_failover",
            )
    return True, ""


def _predates_our_term(leader: LeaderView, s: Snapshot) -> bool:
    """A view naming another holder of the leader key at a term below the one we acquired
    predates our acquisition: the term is the store's index when the key was written, our
    create-if-absent at our term found no key, so a key written before it was gone by then.
    Such views do arrive after newer ones: a fresh read after an outage is posted at once,
    while the watch still delivers the changes it queued during the outage, in order. Acting
    on one fenced a master that had just won the key, which then rejoined a master that was
    not there (found by the simulator, seed 3003)."""
    return s.lease.term is not None and leader.term < s.lease.term


def _upstream_stepped_down(s: Snapshot) -> bool:
    """Our WAL receiver streams from a member that has itself published that it is no longer
    master: a switchover's old master, restarted as a standby, serves WAL to cascading standbys
    (a standby with a restore_command reconnects to it within a second). That stream is not a
    master still writing. A master cut off from the DCS cannot publish such a change, so its
    stream still holds us back."""
    upstream = s.pg.receiver_upstream
    if upstream is None:
        return False
    for m in s.dcs.members.values():
        if (
            m.name != s.name
            and m.conn_host is not None
            and m.conn_port is not None
            and f"{m.conn_host}:{m.conn_port}" == upstream
        ):
            return m.role in ("demoted", "replica", "candidate")
    return False


def sync_allows(s: Snapshot, name: str) -> bool:
    """Synchronous mode: after the master that recorded a synchronous set is gone, only a member
    of that set may become master (only they are known to have every acknowledged commit), or
    that master itself: every commit it acknowledged is in its own WAL, and nobody has been
    master since (a new master records its own set before its first write). Without the last
    rule a master that lost its lease while its set was empty (no standby in sync) left a
    cluster nobody could ever lead again (found by the simulator, seed 218).

    The record binds whoever wrote it, whether or not we saw its writer lead: every member must
    reach the same answer from the same DCS contents. It once bound only when its writer was
    the last leader this member had seen, so a member that had not seen that term (its agent
    restarted since, or it was cut off from the DCS meanwhile) took the record for a stale one
    and raced from outside the set, losing acknowledged commits; and a restarted old master,
    taking its own record for a stale one, waited for a peer that, seeing the record bind,
    never raced: no master at all (seeds 2013, 3001, 3005 and 3002). The price: a record left
    by a master of an earlier spell of synchronous mode binds until the current master writes
    its own (at its next tick after the mode is turned on); with no master meanwhile, only that
    record's members may race, or a forced failover."""
    if s.settings.synchronous_mode == "off":
        return True
    sync = s.dcs.sync
    if sync is None:
        return True
    return name in sync.members or name == sync.leader


def _peer_eligible(m: MemberView) -> bool:
    return m.running and not m.nofailover and m.failover_priority > 0


def _ahead(peer: MemberView, s: Snapshot) -> bool:
    """Is ``peer`` a better candidate than we are?"""
    mine = (s.pg.timeline or 0, s.pg.lsn or 0)
    if peer.position != mine:
        return peer.position > mine
    if peer.failover_priority != s.settings.failover_priority:
        return peer.failover_priority > s.settings.failover_priority
    return peer.name < s.name


def _fmt_pos(tl: int | None, lsn: int | None) -> str:
    if lsn is None:
        return f"TL{tl}/?"
    return f"TL{tl}/{format_lsn(lsn)}"


def decide(role: Role, s: Snapshot) -> Decision:
    """The whole decision core: which trigger (if any) to fire now. A trigger whose effect's
    last call failed waits for its back-off first (never ``lease_lost``: stopping writes is not
    delayed)."""
    d = _decide(role, s)
    if (
        d.trigger is not None
        and d.trigger != "lease_lost"
        and s.failed_effect is not None
        and EFFECT[d.trigger] == s.failed_effect
        and s.retry_at is not None
        and s.now < s.retry_at
    ):
        return _wait_until(
            s.retry_at,
            f"{s.failed_effect} failed {s.effect_failures} time(s): retrying at the end of its back-off ({d.trigger})",
        )
    return d


def _lease_problem(s: Snapshot) -> str | None:
    """Why we may not go on leading the cluster (None: we may): the lease lapsed, the key names
    another member at our term or later, or a view newer than our acquisition has no key. A
    master and a standby leader ask the same; what each does then differs."""
    leader = s.dcs.leader
    if not lease_valid(s):
        return "we no longer hold the leader lease"
    if leader is not None and leader.name != s.name and not _predates_our_term(leader, s):
        return f"the leader key names {leader.name} (term {leader.term})"
    if leader is None and s.lease.term is not None and s.dcs.index > s.lease.term:
        # a view newer than our acquisition shows no key: it expired or was deleted
        return "the leader key is gone from the DCS"
    return None


def _decide(role: Role, s: Snapshot) -> Decision:
    leader = s.dcs.leader
    other_leader = leader is not None and leader.name != s.name

    if role is Role.MASTER:
        # The lease check comes first, before ``busy``: nothing may keep a master writable
        # without the lease, not even an effect in flight (the runtime cancels it).
        problem = _lease_problem(s)
        if problem is not None:
            return Decision("lease_lost", f"{problem}: stop accepting writes")
        if s.busy:
            return _wait("effect")
        if s.failed_effect == "promote":
            return Decision(
                "promote_failed",
                "promotion failed: give the lease up so that another member can take over",
            )
        if s.stop_requested:
            return Decision(
                "shutdown", "asked to stop: stop PostgreSQL cleanly and release the lease"
            )
        sw = s.dcs.switchover
        if (
            sw is not None
            and sw.target != s.name
            and sw.source in (None, s.name)
            and not s.dcs.paused
        ):
            target = s.dcs.members.get(sw.target) if sw.target else None
            if sw.at is not None and s.now < sw.at:
                return _wait_until(sw.at, "a switchover is scheduled")
            if sw.target is None or (target is not None and target.running):
                to = sw.target or "the most advanced replica"
                return Decision(
                    "switchover",
                    f"switchover to {to} requested: stop cleanly, then release the lease",
                )
        if s.command == "restart" and s.pg.running:
            return Decision(
                "restart_pg", "an operator asked for a restart: restart in place, keeping the lease"
            )
        if not s.pg.running:
            if s.dcs.paused:
                return _wait("operator")
            down = s.master_down_since if s.master_down_since is not None else s.now
            limit = down + s.settings.master_start_timeout
            if s.now >= limit:
                return Decision(
                    "start_timeout",
                    f"PostgreSQL did not come back within {s.settings.master_start_timeout:g} s: give up the lease",
                )
            if s.pg.start_failures == 0 or s.pg.crashed:
                return Decision(
                    "restart_in_place",
                    "PostgreSQL stopped while we hold the lease: restart it as primary, same timeline",
                    wake_at=limit,
                )
            return _wait_until(limit)
        return _wait("lease_watchdog")

    if role is Role.STANDBY_LEADER:
        return _decide_standby_leader(s)
    if s.busy:
        return _wait("effect")
    if s.stop_requested:
        return _wait("stop")

    if (
        s.command == "reinit"
        and role in (Role.REPLICA, Role.DEMOTED, Role.REWINDING)
        and s.dcs.leader is not None
    ):
        return Decision(
            "reinit",
            "an operator asked to reinitialize this member: wipe the data and clone it again",
        )
    if s.command == "restart" and role is Role.REPLICA and s.pg.running:
        return Decision(
            "restart_pg",
            "an operator asked for a restart: stop cleanly and start again as a standby",
        )

    if role is Role.INIT:
        return _decide_init(s)
    if role is Role.REPLICA:
        return _decide_replica(s)
    if role is Role.CANDIDATE:
        return _decide_candidate(s)
    if role is Role.DEMOTED:
        if s.dcs.paused:
            return _wait("operator")
        if s.pg.running:
            return Decision(
                "fence", "PostgreSQL still runs although we are no longer master: stop it"
            )
        if s.lease.held or (
            leader is not None and leader.name == s.name and leader.term != s.released_term
        ):
            return Decision(
                "release_key",
                "we are no longer master but still hold the lease or the key: give it up",
            )
        if other_leader:
            assert leader is not None
            return Decision(
                "rejoin",
                f"{leader.name} is master at term {leader.term}: check our timeline and rejoin",
            )
        if leader is None and s.dcs.reachable and not s.lease.held:
            return Decision(
                "start_replica", "no member holds the lease: start read-only and stand for election"
            )
        if not s.dcs.reachable:
            return _wait("dcs_reachable")
        return _wait("key_released")
    if role is Role.REWINDING:
        if s.dcs.paused:
            return _wait("operator")
        if leader is not None and leader.name == s.name:
            if leader.term != s.released_term:
                return Decision(
                    "release_key",
                    f"the leader key (term {leader.term}) still names us, a former master: release it",
                )
            return _wait("key_released")
        if s.rewind_done and other_leader:
            assert leader is not None
            return Decision(
                "rewound", f"our data follows {leader.name}'s timeline: start as its standby"
            )
        if leader is None and s.pg.data in _USABLE_DATA:
            # The master we came to rewind against is gone before we could (or it was never
            # there: a view older than our own term). Waiting here for someone else to be
            # elected can wait forever: the synchronous record may allow only us. Our data is
            # the latest we know, as a demoted master's is; a fork is checked when one leads.
            if not s.dcs.reachable:
                return _wait("dcs_reachable")
            return Decision(
                "start_replica",
                "no member holds the leader key, nothing to rewind against: start read-only and stand for election",
            )
        if s.rewind_failures >= s.settings.rewind_attempts:
            return Decision(
                "reclone", f"pg_rewind failed {s.rewind_failures} times: reclone from the master"
            )
        if s.rewind_failures > 0 and other_leader:
            return Decision(
                "retry_rewind",
                f"pg_rewind attempt {s.rewind_failures + 1} of {s.settings.rewind_attempts}",
            )
        # no other master to rewind against (or follow) yet: someone else must be elected
        return _wait("peers")
    raise AssertionError(f"unknown role {role}")


def _decide_standby_leader(s: Snapshot) -> Decision:
    """The lease is checked as a master checks it, but losing it fences nothing: our PostgreSQL
    is a standby. Whoever leads next (a standby leader again, or after the promotion marker a
    master) is elected as usual."""
    if s.busy:
        # unlike a master's, nothing here is writable: the lease check can wait for the effect
        return _wait("effect")
    problem = _lease_problem(s)
    if problem is not None:
        return Decision("standby_lease_lost", f"{problem}: step down to replica")
    if s.stop_requested:
        return _wait("stop")
    if not standby_mode(s):
        return Decision(
            "promote_cluster",
            "the cluster's promotion marker is set: promote, this cluster follows no other now",
        )
    if not s.pg.running:
        return Decision(
            "restart_standby_leader",
            "PostgreSQL is not running: start it again as a standby of the source cluster",
        )
    if s.upstream != STANDBY_SOURCE:
        return Decision("follow_source", "point primary_conninfo at the source cluster")
    return _wait("lease_watchdog")


def _decide_init(s: Snapshot) -> Decision:
    leader = s.dcs.leader
    if s.pg.data is DataState.UNKNOWN:
        return _wait("pg_probe")
    if not s.dcs.reachable:
        return _wait("dcs_reachable")
    if leader is not None and leader.name == s.name:
        # A key of our previous incarnation (its PostgreSQL died with it): nothing of ours is
        # writable; delete the key so that the election starts now rather than after the TTL.
        return Decision(
            "release_key",
            f"the leader key (term {leader.term}) is from an earlier run of this agent: release it",
        )
    if s.pg.data in (DataState.MISSING, DataState.INVALID):
        if leader is not None:
            return Decision("clone", f"no usable data directory: clone it from {leader.name}")
        if s.dcs.initialized_by is None and not s.bootstrap_lost:
            if s.settings.nofailover or s.settings.failover_priority <= 0:
                # the member that runs initdb is the only one with data until it leads: one that
                # may never lead would leave the cluster without a master for good
                return _wait(
                    "peers", "we may never lead (nofailover): a member that may bootstraps"
                )
            return Decision(
                "bootstrap", "the cluster is not initialized: race for the initialize key"
            )
        if s.dcs.initialized_by == s.name and not s.bootstrap_lost:
            # An earlier run of ours won the initialize key and our data is gone: a second initdb
            # would make a different database than any replica's. A member with data must lead
            # (we clone from it), or an operator removes the key of a cluster that never was.
            return _wait(
                "peers", "the initialize key names us but we have no data: waiting for a master"
            )
        return _wait("peer_bootstrap")  # someone else is bootstrapping: clone from it once it leads
    if leader is not None:
        if s.pg.data in (DataState.PRIMARY_CLEAN, DataState.PRIMARY_CRASHED) and not s.rewind_done:
            return Decision(
                "rewind",
                f"our data last ran as a primary while {leader.name} leads: check for a forked timeline first",
            )
        return Decision("start_replica", f"start read-only as a standby of {leader.name}")
    return Decision("start_replica", "no master: start read-only and stand for election")


def _decide_replica(s: Snapshot) -> Decision:
    leader = s.dcs.leader
    if (
        leader is not None
        and leader.name == s.name
        and not s.lease.held
        and leader.term != s.released_term
    ):
        return Decision(
            "release_key",
            f"the leader key (term {leader.term}) names us but we hold no lease: release it",
        )
    if s.dcs.paused and not (s.pg.running and leader is not None and s.upstream != leader.name):
        # maintenance: no restart, rewind, reclone or election on our own; an operator may stop
        # and start PostgreSQL by hand. Following a new master (a reload) is still done.
        return _wait("operator")
    if not s.pg.running and s.pg.data in (DataState.MISSING, DataState.INVALID):
        return Decision("reclone", f"our data directory is {s.pg.data.value}: reclone it")
    if s.needs_rewind and leader is not None and leader.name != s.name:
        return Decision(
            "rewind", f"our WAL receiver cannot follow {leader.name}'s timeline: rewind"
        )
    if not s.pg.running:
        return Decision("restart", "PostgreSQL is not running: start it again as a standby")
    if leader is not None and leader.name != s.name:
        if s.upstream != leader.name:
            return Decision("follow", f"{leader.name} is master at term {leader.term}: follow it")
        return _wait("leader_change")
    if leader is None:
        ok, why = eligible(s)
        if not ok:
            if not s.dcs.reachable:
                return _wait("dcs_reachable")
            if s.pg.lsn is None or s.pg.timeline is None:
                return _wait("pg_probe")
            return _wait("peers", f"we may not stand for election: {why}")
        return Decision(
            "leader_lost",
            "no member holds the leader key: publish our position and stand for election",
        )
    if s.lease.held:
        # the key names us while we hold the lease: only a master does (a transient fold order)
        return _wait("lease_watchdog")
    return _wait("key_released")


def _decide_candidate(s: Snapshot) -> Decision:
    leader = s.dcs.leader
    if lease_valid(s) and standby_mode(s):
        # a standby cluster's leader follows the source cluster: nothing here is ever writable
        # until the cluster's promotion marker is set
        return Decision(
            "won_standby_lease",
            f"we hold the leader key at term {s.lease.term} of a standby cluster: follow the source cluster",
        )
    if lease_valid(s) and leader is not None and leader.name == s.name:
        return Decision("won_lease", f"we hold the leader key at term {leader.term}: promote")
    if lease_valid(s):
        # acquired, the watch has not shown the key yet: the acquire result is authoritative
        return Decision("won_lease", f"we hold the leader key at term {s.lease.term}: promote")
    if (
        leader is not None
        and leader.name == s.name
        and s.race_lost_term != s.dcs.lost_term
        and s.dcs.reachable
    ):
        # The key names us but we have no answer saying so (an acquire whose answer was lost):
        # acquire again. It is create-if-absent *or already ours under this session*, so it
        # confirms the key if our session holds it and is refused if an older one of ours does.
        return Decision(
            "race",
            f"the leader key (term {leader.term}) names us without an acquire answer: acquire again to confirm",
        )
    if leader is not None:
        return Decision(
            "lost_race", f"{leader.name} took the leader key at term {leader.term}: follow it"
        )
    ok, why = eligible(s)
    if not ok:
        return Decision("stand_down", f"we may not become master: {why}")
    lost = s.dcs.lost_term
    lost_at = s.dcs.lost_at if s.dcs.lost_at is not None else s.now
    if s.announced_term != lost:
        return Decision(
            "announce", f"our fresh position is not published for the election after term {lost}"
        )
    if s.race_lost_term is not None and s.race_lost_term == lost:
        # we raced for this term and lost: the winner's key is on its way. If it never shows
        # (it lapsed between two views), race again after a TTL: the acquire is create-if-absent.
        since = s.race_lost_at if s.race_lost_at is not None else s.now
        if s.now < since + s.settings.ttl:
            return _wait_until(
                since + s.settings.ttl, "we lost the race: waiting for the winner's key"
            )
    if (
        s.pg.receiver_streaming
        and s.now < lost_at + s.settings.ttl
        and not _upstream_stepped_down(s)
    ):
        # The key is gone but the old master's WAL still streams to us: it is alive (the key
        # went with a DCS-side event, e.g. a Consul agent restart) and fences itself on its own
        # clock. Racing now could make two writable masters; wait for the stream to stop.
        return _wait_until(lost_at + s.settings.ttl, "the old master's WAL still streams to us")
    peers = {n: m for n, m in s.dcs.members.items() if n != s.name}
    sw = s.dcs.switchover
    if sw is not None and sw.source == s.name and s.now < lost_at + s.settings.ttl:
        # we are the master being switched away from: another member must take over; we
        # stand aside for one TTL (if nobody does, we may race again)
        return _wait_until(lost_at + s.settings.ttl, "we are the switchover source: standing aside")
    if sw is not None and sw.target is not None:
        if sw.target == s.name:
            need = s.dcs.last_leader_lsn
            if (
                not sw.force
                and need is not None
                and (s.pg.lsn or 0) < need
                and s.now < lost_at + s.settings.ttl
            ):
                return _wait_until(
                    lost_at + s.settings.ttl,
                    "switchover target: waiting for the old master's last WAL",
                )
            return Decision(
                "race",
                "we are the switchover target and have the old master's last WAL: take the key",
            )
        target = peers.get(sw.target)
        if target is not None and target.running and s.now < lost_at + s.settings.ttl:
            return _wait_until(
                lost_at + s.settings.ttl, f"switchover to {sw.target}: standing aside"
            )
    # a peer whose pod is gone (Kubernetes) will not publish: do not wait on it
    contenders = [
        m
        for m in peers.values()
        if _peer_eligible(m) and m.name not in s.pods_gone and sync_allows(s, m.name)
    ]
    stale = [m.name for m in contenders if m.election != lost]
    deadline = lost_at + s.settings.election_timeout
    if stale and s.now < deadline:
        return _wait_until(deadline, "waiting for fresh positions from " + ", ".join(sorted(stale)))
    better = sorted(m.name for m in contenders if _ahead(m, s))
    if better:
        # Stay candidate: if the better member cannot take the key, its member key lapses with
        # its session and it drops out of the comparison.
        return _wait_until(
            s.now + s.settings.ttl, "a better candidate exists: " + ", ".join(better)
        )
    return Decision(
        "race",
        f"no eligible member is ahead of our {_fmt_pos(s.pg.timeline, s.pg.lsn)}: take the leader key",
    )


# --- the machine ---------------------------------------------------------------------------------


class _Model:
    state: str


_ROLE_OF_STATE: dict[str, Role] = {role.value: role for role in Role}


class RoleMachine:
    """A ``transitions`` machine built from TABLE. It checks a trigger against the table and
    returns the Transition record; it runs no effects (the runtime does)."""

    def __init__(self, cluster: str, node: str, initial: Role = Role.INIT) -> None:
        self.cluster = cluster
        self.node = node
        self._model = _Model()
        self._machine = Machine(
            model=self._model,
            states=[r.value for r in Role],
            transitions=[
                {"trigger": row.trigger, "source": row.source.value, "dest": row.dest.value}
                for row in TABLE
            ],
            initial=initial.value,
            auto_transitions=False,
            ignore_invalid_triggers=False,
        )

    @property
    def role(self) -> Role:
        # a dict lookup, not Role(...): the runtime asks for the role several times per input
        return _ROLE_OF_STATE[self._model.state]

    def can(self, trigger: str) -> bool:
        return any(row.source is self.role and row.trigger == trigger for row in TABLE)

    def fire(self, decision: Decision, s: Snapshot, seq: int, wall_time: float) -> Transition:
        """Fire ``decision.trigger``; raises transitions.MachineError if the table has no such
        row for the current role."""
        assert decision.trigger is not None
        source = self.role
        trigger: Any = getattr(self._model, decision.trigger, None)
        if trigger is None:
            from transitions import MachineError

            raise MachineError(f'"{decision.trigger}" is not a trigger of this machine')
        trigger()
        term = s.lease.term if self.role is Role.MASTER and s.lease.term is not None else None
        if term is None and s.dcs.leader is not None:
            term = s.dcs.leader.term
        return Transition(
            cluster=self.cluster,
            node=self.node,
            seq=seq,
            time=wall_time,
            source=source.value,
            dest=self.role.value,
            trigger=decision.trigger,
            reason=decision.reason,
            term=term,
            timeline=s.pg.timeline,
            lsn=s.pg.lsn,
        )
