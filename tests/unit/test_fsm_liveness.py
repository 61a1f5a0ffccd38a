"""Liveness of the pure core: the machine never waits for an input nobody will send.

The bug this guards: after a DCS outage longer than the TTL every member went candidate, their
``announce`` failed (the lease was gone), the failure was folded as "not announced yet", and each
waited for its own announcement forever. The class of bug: an effect whose call failed leaves
the machine waiting, with no wake-up, for something only that effect would have produced.

So: ``decide`` names what every wait without a wake-up waits for (``Decision.awaits``, a key of
``fsm.machine.AWAITS``), and these tests check, on histories drawn by a generator that plays the
world (the DCS, PostgreSQL, effect outcomes that succeed or fail, timers that fire at the asked
time), that each such wait names an input the snapshot shows is really coming, with predicates
written here independently of ``decide``. A failed effect must lead to a retry (a wake-up) or a
transition, never a silent wait: the generator fails effects often.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsm.inputs import Input, step
from fsm.machine import AWAITS, EFFECT, TABLE, Decision, Role, lease_valid
from fsm.snapshot import STANDBY_SOURCE, DataState, Snapshot
from tests.unit.test_fsm_decide import LSN, Node, dcs, member, pg

T = TypeVar("T")
# how the world's choices are drawn: by hypothesis (shrinkable) or by a seeded Random (cheap)
Pick = Callable[[Sequence[Any], str], Any]

ME = "pg1"
PEERS = ("pg2", "pg3")
ROWS = {(r.source, r.trigger): r.dest for r in TABLE}


def awaited_input_is_coming(awaits: str | None, role: Role, s: Snapshot) -> bool:
    """Independent of ``decide``: does the snapshot show that the named input will arrive?"""
    leader = s.dcs.leader
    if awaits == "effect":
        return s.busy is not None  # the runtime posts every started effect's outcome
    if awaits == "stop":
        return s.stop_requested
    if awaits == "operator":
        return s.dcs.paused
    if awaits == "dcs_reachable":
        return not s.dcs.reachable
    if awaits == "leader_change":
        return leader is not None and leader.name != s.name
    if awaits == "lease_watchdog":
        return s.lease.held
    if awaits == "key_released":
        return leader is not None and leader.name == s.name and leader.term == s.released_term
    if awaits == "peers":
        return leader is None
    if awaits == "peer_bootstrap":
        return (
            role is Role.INIT
            and leader is None
            and (s.bootstrap_lost or s.dcs.initialized_by not in (None, s.name))
        )
    if awaits == "pg_probe":
        return s.pg.data is DataState.UNKNOWN or s.pg.lsn is None or s.pg.timeline is None
    return False


@dataclass
class World:
    """One member's machine and the world around it, driven by drawn events."""

    role: Role = Role.INIT
    s: Snapshot = field(default_factory=lambda: Snapshot(name=ME))
    t: float = 0.0
    term: int = 1
    last: Decision = field(default_factory=lambda: Decision(None))
    roles: set[Role] = field(default_factory=set)
    failures: int = 0

    def feed(self, kind: str, data: dict[str, Any], dt: float = 0.05) -> None:
        self.t += dt
        s, taken, final = step(self.role, self.s, Input(kind, self.t, data))
        for src, d, dest in taken:
            assert src is self.role and ROWS.get((src, d.trigger)) is dest, (src, d, dest)
            self.role = dest
            self.roles.add(dest)
        self.s, self.last = s, final
        self.check()

    def check(self) -> None:
        s, d = self.s, self.last
        if self.role is Role.MASTER:
            assert lease_valid(s), "master without a valid lease"
            leader = s.dcs.leader
            # a key of another member at a term below ours is from a view older than our
            # acquisition (the term is the store's index at the write): not a current holder
            assert leader is None or leader.name == ME or leader.term < (s.lease.term or 0)
            # a standby cluster has no writable member until its promotion marker is seen
            assert not s.settings.standby_cluster or s.dcs.standby_promoted
        if d.trigger is None and d.wake_at is None:
            assert d.awaits in AWAITS, f"a wait that names no input: {d} in {self.role}"
            assert awaited_input_is_coming(d.awaits, self.role, s), (
                f"{self.role.value} waits for {d.awaits!r} ({d.reason}) but nothing will send it: "
                f"busy={s.busy} leader={s.dcs.leader} reachable={s.dcs.reachable} "
                f"lease={s.lease} failed={s.failed_effect}"
            )
        if d.wake_at is not None:
            assert d.wake_at >= s.now - 1e-9 or d.trigger is not None


def _positions(pick: Pick) -> int:
    return LSN + pick(range(-(1 << 20), (1 << 20) + 1, 4096), "lsn delta")


def draw_view(pick: Pick, w: World) -> dict[str, Any]:
    who = pick([None, None, ME, *PEERS], "leader")
    if pick((False, True), "new term"):
        w.term += 1
    lost = w.s.dcs.lost_term
    members = {
        p: member(
            p,
            lsn=_positions(pick),
            running=pick((False, True), f"{p} running"),
            role="master" if p == who else "replica",
            election=pick([None, lost, w.term], f"{p} election"),
            nofailover=pick((False, True), f"{p} nofailover"),
        )
        for p in PEERS
        if pick(range(0, 4 + 1), f"{p} present") > 0
    }
    members[ME] = member(ME, lsn=w.s.pg.lsn or LSN)
    v = dcs(who, w.term, **members)
    v["index"] = w.term + pick(range(0, 2 + 1), "index")
    v["initialize"] = pick([ME, "pg2", None], "initialize")
    if pick(range(0, 19 + 1), "pause") == 0:
        v["config"] = {"pause": True}
    if pick(range(0, 19 + 1), "switchover") == 0:
        v["switchover"] = {"from": ME, "to": pick([None, *PEERS], "to")}
    if pick(range(0, 29 + 1), "standby cluster promoted") == 0:
        v["standby_promoted"] = {"at": w.t}
    return v


def draw_pg(pick: Pick, w: World) -> dict[str, Any]:
    running = pick(range(0, 4 + 1), "pg running") > 0
    state = pick(["standby", "standby", "primary_clean", "primary_crashed", "missing"], "data")
    master = w.role is Role.MASTER
    return pg(
        running=running,
        lsn=_positions(pick),
        data=state,
        in_recovery=not master,
        streaming=running and pick((False, True), "streaming"),
        crashed=not running and pick((False, True), "crashed"),
        start_failures=0 if running else pick(range(0, 2 + 1), "start failures"),
    )


def outcome(pick: Pick, w: World) -> None:
    """The busy effect finishes: it succeeds with what a real effect reports, or its call fails."""
    name = w.s.busy
    assert name is not None
    if pick(range(0, 3 + 1), f"{name} fails") == 0:
        w.failures += 1
        w.feed("effect", {"name": name, "ok": False, "error": "injected"})
        return
    leader = w.s.dcs.leader
    if name == "acquire":
        won = pick((False, True), "won")
        if won:
            w.term += 1
            w.feed("lease", {"held": True, "term": w.term, "deadline": w.t + 7.0})
        w.feed("effect", {"name": name, "ok": True, "won": won, "term": w.term if won else None})
    elif name == "announce":
        w.feed("effect", {"name": name, "ok": True, "term": w.s.dcs.lost_term or 0})
    elif name == "bootstrap":
        won = pick((False, True), "bootstrap won")
        if won:
            w.feed("pg", pg(running=False, data="primary_clean", in_recovery=None))
        w.feed("effect", {"name": name, "ok": True, "won": won})
    elif name in ("fence", "handoff", "give_up", "release"):
        released = leader.term if leader is not None and leader.name == ME else None
        if name != "release":
            w.feed("pg", pg(running=False, data="primary_clean", in_recovery=None))
        w.feed("lease", {"held": False, "term": None})
        w.feed("effect", {"name": name, "ok": True, "released_term": released})
    elif name in ("start_standby", "follow"):
        up = leader.name if leader is not None and leader.name != ME else None
        if w.role is Role.STANDBY_LEADER:
            up = STANDBY_SOURCE
        w.feed("pg", pg())
        w.feed("effect", {"name": name, "ok": True, "upstream": up})
    elif name == "clone":
        w.feed("pg", pg(running=False, data="standby"))
        w.feed("effect", {"name": name, "ok": True})
    elif name == "wipe":
        w.feed("pg", pg(running=False, data="missing"))
        w.feed("effect", {"name": name, "ok": True})
    elif name == "promote":
        w.feed("pg", pg(in_recovery=False, data="primary_crashed"))
        w.feed("effect", {"name": name, "ok": True})
    else:
        w.feed("effect", {"name": name, "ok": True, "result": "rewound"})


def play(pick: Pick, steps: int) -> World:
    w = World()
    standby = pick((False, True), "standby cluster")
    w.feed(
        "start",
        {"settings": {"ttl": 10.0, "election_timeout": 1.0, "standby_cluster": standby}},
    )
    w.feed("pg", pg(running=False, data=pick(["standby", "missing"], "data at start")))
    for _ in range(steps):
        kind = pick(
            ["outcome"] * 4 + ["dcs"] * 3 + ["timer"] * 3 + ["pg", "dcs_down", "lease_lost"],
            "event",
        )
        if kind == "outcome" and w.s.busy is not None:
            outcome(pick, w)
        elif kind == "timer" or (kind == "outcome" and w.s.busy is None):
            wake = w.last.wake_at
            w.feed("timer", {}, dt=max(0.0, wake - w.t) if wake is not None else 1.0)
        elif kind == "dcs":
            w.feed("dcs", draw_view(pick, w))
        elif kind == "pg":
            w.feed("pg", draw_pg(pick, w))
        elif kind == "dcs_down":
            w.feed("dcs_down", {})
        else:
            w.feed("lease", {"held": False, "term": None})
    return w


@functools.cache
def sampled(options: tuple[Any, ...]) -> st.SearchStrategy[Any]:
    """One strategy per set of options, made once: a strategy made anew for every pick costs
    hypothesis more (its label and properties computed again) than the whole history's steps."""
    return st.sampled_from(options)


def hypothesis_pick(data: st.DataObject) -> Pick:
    return lambda options, label: data.draw(sampled(tuple(options)), label)


def random_pick(seed: int) -> Pick:
    rng = random.Random(seed)
    return lambda options, label: rng.choice(list(options))


# The unit tier runs a sample of each search; tests/sim/test_deep_searches.py runs the deep
# ones (hypothesis examples and seeds) on the same functions.
UNIT_EXAMPLES = 100
UNIT_SEEDS = 300


def wait_names_a_coming_input(data: st.DataObject) -> None:
    pick = hypothesis_pick(data)
    play(pick, pick(range(5, 61), "steps"))


@settings(max_examples=UNIT_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_every_wait_names_an_input_that_is_coming(data: st.DataObject) -> None:
    wait_names_a_coming_input(data)


def check_waits_over_seeds(seeds: int) -> None:
    """The property over ``seeds`` long seeded histories (cheap, no shrinking), which also shows
    the property is not vacuous: the histories reach every role, fail effects, and come back to
    master after failures (the shares asked for are well below the ones seen: about 36% of
    histories reach master, 35% demoted, 26% rewinding, 20% standby_leader, 99% candidate;
    97% fail an effect). Half the histories are a standby cluster's member, whose views carry
    the promotion marker now and then."""
    reached: dict[Role, int] = dict.fromkeys(Role, 0)
    failed = 0
    for seed in range(seeds):
        w = play(random_pick(seed), 80)
        for r in w.roles:
            reached[r] += 1
        failed += w.failures > 0
    assert reached[Role.MASTER] > seeds / 5, reached
    assert reached[Role.DEMOTED] > seeds / 10 and reached[Role.REWINDING] > seeds / 30, reached
    assert reached[Role.CANDIDATE] > seeds * 2 / 5 and failed > seeds * 2 / 3, (reached, failed)
    assert reached[Role.STANDBY_LEADER] > seeds / 10, reached


def test_every_wait_names_an_input_that_is_coming_over_many_seeds() -> None:
    check_waits_over_seeds(UNIT_SEEDS)


# --- the DCS-outage wedges, one scenario each ------------------------------------------------------


def candidate_after_outage() -> Node:
    """A replica of pg2; the DCS came back after every lease expired: no leader, no members."""
    n = Node(ME)
    n.feed("pg", **pg(running=False, data="standby"))
    n.feed("dcs", **dcs("pg2", 10, pg2=member("pg2", role="master"), pg3=member("pg3")))
    n.feed("pg", **pg())
    assert n.done("start_standby", upstream="pg2") == []
    n.feed("dcs_down")
    assert n.feed("dcs", **{**dcs(None), "index": 40}) == ["leader_lost"]
    assert n.s.busy == "announce"
    return n


def test_a_failed_announce_is_retried_after_a_back_off_the_dcs_outage_wedge() -> None:
    n = candidate_after_outage()
    # the announcement failed: "etcd lease ... no longer exists"
    assert n.done("announce", ok=False, error="lease gone") == []
    assert n.role is Role.CANDIDATE and n.last.wake_at is not None
    assert n.wake() == ["announce"], "the announcement must be retried"
    assert n.done("announce", ok=False) == []
    first = n.last.wake_at
    assert first is not None
    assert n.wake() == ["announce"]
    # published: no peer is left to compare with (their keys lapsed too), so race at once
    assert n.done("announce", term=10) == ["race"]


def test_an_acquire_whose_answer_was_lost_is_confirmed_not_taken_as_a_lost_race() -> None:
    n = candidate_after_outage()
    assert n.done("announce", term=10) == ["race"]
    # the request timed out; the DCS had committed it: the view shows the key under our name
    assert n.done("acquire", ok=False, error="timeout") == []
    n.feed("dcs", **{**dcs(ME, 41, pg1=member(ME)), "index": 41})
    assert n.role is Role.CANDIDATE, "our own key is not someone else's win"
    assert n.wake() == ["race"], "acquire again: it confirms a key our session holds"
    n.feed("lease", held=True, term=41)
    assert n.done("acquire", won=True, term=41) == ["won_lease"]
    assert n.role is Role.MASTER


def test_a_key_of_ours_from_a_lost_session_is_released_not_followed() -> None:
    n = candidate_after_outage()
    assert n.done("announce", term=10) == ["race"]
    n.done("acquire", ok=False, error="timeout")
    n.feed("dcs", **{**dcs(ME, 41, pg1=member(ME)), "index": 41})
    n.wake()
    # the key was created under our *old* session: acquire is refused
    assert n.done("acquire", won=False) == ["lost_race", "release_key"]
    assert n.role is Role.REPLICA and n.s.busy == "release"
    assert n.done("release", released_term=41) == []
    assert n.feed("dcs", **{**dcs(None), "index": 42}) == ["leader_lost"]


def test_a_lost_race_whose_winner_never_shows_races_again_after_a_ttl() -> None:
    n = candidate_after_outage()
    assert n.done("announce", term=10) == ["race"]
    assert n.done("acquire", won=False) == []
    assert n.last.wake_at is not None and n.last.wake_at - n.t == pytest.approx(10.0, abs=0.1)
    assert n.wake() == ["race"]


def elected_alone() -> Node:
    """A lone member elected master at term 5 (the prefix of a real bootstrap), its promotion
    still in flight."""
    n = Node(ME)
    n.feed("pg", **pg(running=False, data="standby"))
    n.feed("dcs", **dcs(None))
    n.feed("pg", **pg())
    n.done("start_standby", upstream=None)
    n.done("announce", term=0)
    n.feed("lease", held=True, term=5)
    assert n.done("acquire", won=True, term=5) == ["won_lease"]
    return n


def test_demoted_with_the_lease_still_held_gives_it_up() -> None:
    """A master that lost its key to a view (deleted by hand) still held its session: before,
    demoted waited for ``not lease.held`` forever and renewals kept re-arming the watchdog."""
    n = elected_alone()
    n.done("promote")
    assert n.role is Role.MASTER
    assert n.feed("dcs", **{**dcs(None), "index": 9}) == ["lease_lost"]
    n.feed("pg", **pg(running=False, data="primary_crashed", in_recovery=None))
    # the fence effect's outcome without its lease input (an older runtime, or a crash in it)
    assert n.done("fence") == ["release_key"]
    n.feed("lease", held=False, term=None)
    assert n.done("release") == ["start_replica"]


def test_a_failed_fence_is_retried_while_postgresql_still_runs() -> None:
    n = elected_alone()
    n.done("promote")
    assert n.feed("lease", held=False, term=None) == ["lease_lost"]
    assert n.done("fence", ok=False, error="pg_ctl timed out") == []
    assert n.wake() == ["fence"], "PostgreSQL still runs: stop it again"


def test_a_failed_promotion_gives_the_lease_up() -> None:
    n = elected_alone()
    assert n.done("promote", ok=False, error="pg_promote timed out") == ["promote_failed"]
    assert n.role is Role.DEMOTED and n.s.busy == "give_up"


def test_a_failed_bootstrap_call_is_retried_not_taken_as_someone_elses() -> None:
    n = Node(ME)
    n.feed("pg", **pg(running=False, data="missing"))
    v = dcs(None)
    v["initialize"] = None
    assert n.feed("dcs", **v) == ["bootstrap"]
    assert n.done("bootstrap", ok=False, error="etcd timeout") == []
    assert not n.s.bootstrap_lost
    assert n.wake() == ["bootstrap"]


def test_back_off_is_bounded() -> None:
    n = candidate_after_outage()
    delays = []
    for _ in range(12):
        n.done("announce", ok=False)
        assert n.last.wake_at is not None
        delays.append(round(n.last.wake_at - n.t, 6))
        assert n.wake() == ["announce"]
    assert delays == sorted(delays) and max(delays) <= 5.0 and delays[0] < 0.5


def test_every_effect_named_by_the_table_is_a_known_effect() -> None:
    from fsm.inputs import EFFECT_NAMES

    assert set(EFFECT.values()) - {"none"} == EFFECT_NAMES


def test_a_member_that_may_never_lead_does_not_bootstrap_the_cluster() -> None:
    """Found by the end-to-end suite: a nofailover member won the initialize key, ran initdb,
    and, being the only member with data and unable to lead, left the cluster without a master
    for good (the others waited for its bootstrap to finish with a master)."""
    for tags in ({"nofailover": True}, {"failover_priority": 0}):
        n = Node(ME, **tags)
        n.feed("pg", **pg(running=False, data="missing"))
        v = dcs(None)
        v["initialize"] = None
        assert n.feed("dcs", **v) == []
        assert n.last.awaits == "peers"
        # once a member that may lead has bootstrapped and leads, it clones as usual
        v = dcs("pg2", 3, pg2=member("pg2", role="master"))
        v["initialize"] = "pg2"
        assert n.feed("dcs", **v) == ["clone"]
