"""The contract every DCS backend meets, stated only against events.dcs.base.DCS.

Runs once per backend through the ``dcs_backend`` fixture (tests/conftest.py): a real etcd, the
Consul emulator, and the simulator's store (pgsidecar/lab/sim/dcs.py, on the test's ordinary loop,
so its clock is real time here). What a backend fixture provides, besides ``make_dcs(cluster) -> DCS`` (not yet connected):

* ``make_dcs.min_ttl`` (optional, default 2): the smallest session TTL the store accepts; the
  expiry tests use it (etcd: 2 s; Consul: 10 s).
* Test hooks on each DCS instance (not part of the production interface):
  ``await d._drop_watch_connection()`` breaks the connection of every running ``watch()`` as a
  network failure would; ``await d._put_raw(full_key, value: bytes)`` writes a value verbatim,
  without a session, under a full store key as returned by ``d.key(...)``.
* Isolation: DCS instances made by one test with the same cluster name share keys; nothing leaks
  between tests or between two runs of the suite.

Bounds: a watch delivers a change in under 1 s; a session that is not renewed is gone (and its
keys with it) within 2 * ttl + 2 s (Consul may keep a session up to twice its TTL).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from events.dcs.base import DCS, ClusterView, DuplicateMember, SessionLost, TimelineCounter

WATCH_LATENCY_BOUND = 1.0


def ttl_of(make_dcs: Any) -> float:
    return float(getattr(make_dcs, "min_ttl", 2.0))


def expiry_bound(ttl: float) -> float:
    return 2 * ttl + 2.0


async def new_dcs(make_dcs: Any, cluster: str = "c1", *, session: bool = True) -> DCS:
    d: DCS = make_dcs(cluster)
    await d.connect()
    if session:
        await d.open_session(ttl_of(make_dcs))
    return d


# -- leader --------------------------------------------------------------------------------------


async def test_empty_cluster_reads_as_empty(dcs_backend: Any) -> None:
    d = await new_dcs(dcs_backend, session=False)
    view = await d.read_cluster()
    assert view.leader is None
    assert view.members == {}
    assert view.initialize is None and view.config is None and view.switchover is None
    assert view.malformed == ()
    assert d.session_ttl == 0


async def test_session_ttl_is_what_was_granted(dcs_backend: Any) -> None:
    ttl = ttl_of(dcs_backend)
    d = await new_dcs(dcs_backend)
    assert ttl <= d.session_ttl <= ttl + 1


async def test_exactly_one_of_concurrent_acquirers_wins(dcs_backend: Any) -> None:
    contenders = [await new_dcs(dcs_backend) for _ in range(5)]
    results = await asyncio.gather(*(d.acquire_leader(f"m{i}") for i, d in enumerate(contenders)))
    winners = [(i, r) for i, r in enumerate(results) if r is not None]
    assert len(winners) == 1, results
    i, leader = winners[0]
    assert leader.name == f"m{i}" and leader.term > 0

    view = await contenders[0].read_cluster()
    assert view.leader == leader
    # the holder asking again keeps the same term (acquire is idempotent for the holder)
    assert await contenders[i].acquire_leader(f"m{i}") == leader
    # another session using the holder's name does not hold the key
    impostor = await new_dcs(dcs_backend)
    assert await impostor.acquire_leader(f"m{i}") is None
    assert (await impostor.read_cluster()).leader == leader


async def test_a_reopened_session_does_not_inherit_the_old_sessions_key(dcs_backend: Any) -> None:
    """The agent reopens its session after a DCS outage: the old session's keys go
    at once (not at its TTL), so a key of ours from before is never left standing in the way of
    the election; a *different* old session's key under our name (an earlier run of the agent)
    is refused to us, and the compare-and-delete on (name, term) that the machine's
    ``release_key`` runs deletes it."""
    a = await new_dcs(dcs_backend)
    old = await a.acquire_leader("a")
    assert old is not None
    await a.open_session(ttl_of(dcs_backend))
    assert (await a.read_cluster()).leader is None
    new = await a.acquire_leader("a")
    assert new is not None and new.term > old.term
    # the retry of an acquire whose answer was lost confirms the key of *this* session
    assert await a.acquire_leader("a") == new
    # an earlier run of the same member (another session) finds the key refused, releases it
    again = await new_dcs(dcs_backend)
    assert await again.acquire_leader("a") is None
    assert await again.release_leader("a", new.term) is True
    assert (await again.acquire_leader("a")) is not None


async def test_release_frees_the_key_at_once(dcs_backend: Any) -> None:
    a = await new_dcs(dcs_backend)
    b = await new_dcs(dcs_backend)
    la = await a.acquire_leader("a")
    assert la is not None
    assert await b.acquire_leader("b") is None

    assert await a.release_leader("a", la.term) is True
    # no lock-delay: the other contender takes it on its very next attempt
    lb = await b.acquire_leader("b")
    assert lb is not None and lb.name == "b"
    assert lb.term > la.term
    assert (await a.read_cluster()).leader == lb


async def test_a_leader_key_written_without_a_session_is_no_leader_and_can_be_taken(
    dcs_backend: Any,
) -> None:
    """A value put under the leader key by anyone but an agent (no session, no lease) is not a
    lock: it names no leader and would never expire, so an agent's acquire takes it over."""
    a = await new_dcs(dcs_backend)
    await a._put_raw(a.key("leader"), b"\xff garbage")  # type: ignore[attr-defined]
    assert (await a.read_cluster()).leader is None
    la = await a.acquire_leader("a")
    assert la is not None and la.name == "a"
    assert (await a.read_cluster()).leader == la


async def test_release_with_wrong_term_or_name_does_nothing(dcs_backend: Any) -> None:
    a = await new_dcs(dcs_backend)
    b = await new_dcs(dcs_backend)
    la = await a.acquire_leader("a")
    assert la is not None
    assert await a.release_leader("a", la.term - 1) is False
    assert await a.release_leader("a", la.term + 1) is False
    assert await a.release_leader("b", la.term) is False
    assert await b.release_leader("b", la.term) is False
    assert (await b.read_cluster()).leader == la
    # and after a real release, releasing again is a no-op
    assert await a.release_leader("a", la.term) is True
    assert await a.release_leader("a", la.term) is False


async def test_term_strictly_increases_on_every_change_of_leader(dcs_backend: Any) -> None:
    a = await new_dcs(dcs_backend)
    b = await new_dcs(dcs_backend)
    terms: list[int] = []

    la = await a.acquire_leader("a")
    assert la is not None
    terms.append(la.term)
    await a.put_config({"unrelated": "write"})  # other writes between terms change nothing
    assert await a.release_leader("a", la.term)

    lb = await b.acquire_leader("b")
    assert lb is not None
    terms.append(lb.term)
    await b.close_session()  # the holder's session ends: key gone

    la2 = await a.acquire_leader("a")
    assert la2 is not None
    terms.append(la2.term)
    assert await a.release_leader("a", la2.term)

    la3 = await a.acquire_leader("a")  # even the same member again gets a new term
    assert la3 is not None
    terms.append(la3.term)
    assert terms == sorted(set(terms)), terms


# -- sessions ------------------------------------------------------------------------------------


async def test_session_expiry_deletes_leader_and_member_and_watchers_see_it(
    dcs_backend: Any, watchers: Any
) -> None:
    ttl = ttl_of(dcs_backend)
    observer = await new_dcs(dcs_backend, session=False)
    w = watchers(observer)
    a = await new_dcs(dcs_backend)
    t0 = time.monotonic()  # the session was granted (or last renewed) before this moment
    await a.put_member("a", {"instance_id": "ia", "role": "master"})
    leader = await a.acquire_leader("a")
    assert leader is not None
    await w.wait_for(lambda v: v.leader == leader and "a" in v.members, WATCH_LATENCY_BOUND)
    after = len(w.views)

    # nobody renews: the store must drop the session and both keys bound to it
    at, view = await w.wait_for(
        lambda v: v.leader is None and "a" not in v.members, expiry_bound(ttl), after=after
    )
    lived = at - t0
    assert lived >= 0.5 * ttl, f"session gone after {lived:.2f} s with ttl {ttl}"
    assert (await observer.read_cluster()).leader is None

    with pytest.raises(SessionLost):
        await a.renew_session()


async def test_renewal_keeps_the_session_and_its_keys(dcs_backend: Any) -> None:
    ttl = ttl_of(dcs_backend)
    a = await new_dcs(dcs_backend)
    leader = await a.acquire_leader("a")
    assert leader is not None
    await a.put_member("a", {"instance_id": "ia"})
    deadline = time.monotonic() + 1.5 * ttl
    while time.monotonic() < deadline:
        await a.renew_session()
        await asyncio.sleep(ttl / 4)
    view = await a.read_cluster()
    assert view.leader == leader
    assert "a" in view.members


async def test_close_session_deletes_bound_keys_at_once(dcs_backend: Any, watchers: Any) -> None:
    observer = await new_dcs(dcs_backend, session=False)
    w = watchers(observer)
    a = await new_dcs(dcs_backend)
    await a.put_member("a", {"instance_id": "ia"})
    assert await a.acquire_leader("a") is not None
    assert await a.try_initialize("a")
    await a.put_config({"ttl": 30})
    await w.wait_for(lambda v: v.leader is not None and "a" in v.members, WATCH_LATENCY_BOUND)
    after = len(w.views)

    t0 = time.monotonic()
    await a.close_session()
    at, view = await w.wait_for(
        lambda v: v.leader is None and "a" not in v.members, WATCH_LATENCY_BOUND, after=after
    )
    assert at - t0 < WATCH_LATENCY_BOUND
    # keys that are not bound to a session survive it
    assert view.initialize == "a" and view.config == {"ttl": 30}
    assert a.session_ttl == 0
    with pytest.raises(SessionLost):
        await a.renew_session()


# -- members -------------------------------------------------------------------------------------


async def test_member_keys_are_written_and_read_back(dcs_backend: Any) -> None:
    a = await new_dcs(dcs_backend)
    b = await new_dcs(dcs_backend)
    await a.register_member("a", {"instance_id": "ia", "lsn": 1})
    await b.register_member("b", {"instance_id": "ib", "lsn": 2})
    await a.put_member("a", {"instance_id": "ia", "lsn": 10, "tags": {"nofailover": True}})
    view = await b.read_cluster()
    assert view.members == {
        "a": {"instance_id": "ia", "lsn": 10, "tags": {"nofailover": True}},
        "b": {"instance_id": "ib", "lsn": 2},
    }


async def test_register_member_refuses_another_live_instance(dcs_backend: Any) -> None:
    first = await new_dcs(dcs_backend)
    await first.register_member("pg-1", {"instance_id": "i-1", "role": "replica"})

    other = await new_dcs(dcs_backend)
    with pytest.raises(DuplicateMember, match="pg-1"):
        await other.register_member("pg-1", {"instance_id": "i-2", "role": "replica"})
    # the refused registration changed nothing
    view = await other.read_cluster()
    assert view.members["pg-1"] == {"instance_id": "i-1", "role": "replica"}


async def test_register_member_takes_over_its_own_previous_incarnation(dcs_backend: Any) -> None:
    old = await new_dcs(dcs_backend)
    await old.register_member("pg-1", {"instance_id": "i-1", "boot": 1})

    # the same agent (same instance_id) restarted with a new session before the old one expired
    new = await new_dcs(dcs_backend)
    await new.register_member("pg-1", {"instance_id": "i-1", "boot": 2})
    assert (await new.read_cluster()).members["pg-1"] == {"instance_id": "i-1", "boot": 2}

    # the key is bound to the new session now: the old one ending does not delete it ...
    await old.close_session()
    assert "pg-1" in (await new.read_cluster()).members
    # ... and the new one ending does
    await new.close_session()
    assert "pg-1" not in (await new.read_cluster()).members


async def test_malformed_values_are_reported_not_raised(dcs_backend: Any, watchers: Any) -> None:
    d = await new_dcs(dcs_backend)
    await d.put_member("good", {"instance_id": "ig"})
    bad_json = d.key("members", "bad-json")
    not_object = d.key("members", "not-object")
    bad_config = d.key("config")
    await d._put_raw(bad_json, b"{not json")  # type: ignore[attr-defined]
    await d._put_raw(not_object, b"[1, 2, 3]")  # type: ignore[attr-defined]
    await d._put_raw(bad_config, b"\xff\xfe")  # type: ignore[attr-defined]

    view = await d.read_cluster()
    assert set(view.members) == {"good"}
    assert view.config is None
    bad_keys = {k for k, _reason in view.malformed}
    assert {bad_json, not_object, bad_config} <= bad_keys
    assert all(reason for _k, reason in view.malformed)

    # the watch survives them too, and reports a later fix
    w = watchers(d)
    _, first = await w.wait_for(lambda v: True, WATCH_LATENCY_BOUND)
    assert set(first.members) == {"good"} and bad_json in {k for k, _ in first.malformed}
    await d._put_raw(bad_json, b'{"instance_id": "fixed"}')  # type: ignore[attr-defined]
    _, fixed = await w.wait_for(lambda v: "bad-json" in v.members, WATCH_LATENCY_BOUND)
    assert fixed.members["bad-json"] == {"instance_id": "fixed"}
    assert bad_json not in {k for k, _ in fixed.malformed}


# -- initialize / config / switchover -----------------------------------------------------------


async def test_initialize_is_compare_and_set(dcs_backend: Any) -> None:
    nodes = [await new_dcs(dcs_backend) for _ in range(5)]
    won = await asyncio.gather(*(d.try_initialize(f"m{i}") for i, d in enumerate(nodes)))
    assert won.count(True) == 1, won
    winner = won.index(True)
    assert (await nodes[0].read_cluster()).initialize == f"m{winner}"
    assert await nodes[winner].try_initialize(f"m{winner}") is False  # already set

    loser = (winner + 1) % len(nodes)
    assert await nodes[loser].cancel_initialize(f"m{loser}") is False
    assert (await nodes[0].read_cluster()).initialize == f"m{winner}"

    # the key is not bound to the winner's session
    await nodes[winner].close_session()
    assert (await nodes[0].read_cluster()).initialize == f"m{winner}"

    assert await nodes[winner].cancel_initialize(f"m{winner}") is True
    assert (await nodes[0].read_cluster()).initialize is None
    assert await nodes[loser].try_initialize(f"m{loser}") is True
    assert (await nodes[0].read_cluster()).initialize == f"m{loser}"


async def test_backup_slot_is_compare_and_set_on_its_modify_index(dcs_backend: Any) -> None:
    nodes = [await new_dcs(dcs_backend) for _ in range(4)]
    assert await nodes[0].read_backup_slot("full") == (None, 0)
    # create-if-absent: of concurrent writers exactly one wins
    won = await asyncio.gather(
        *(
            d.swap_backup_slot("full", {"slot": "s1", "member": f"m{i}"}, 0)
            for i, d in enumerate(nodes)
        )
    )
    assert won.count(True) == 1, won
    winner = won.index(True)
    value, index = await nodes[1].read_backup_slot("full")
    assert value == {"slot": "s1", "member": f"m{winner}"} and index > 0
    # replacing it: only the writers that read the current index, exactly one of them
    won = await asyncio.gather(
        *(
            d.swap_backup_slot("full", {"slot": "s2", "member": f"m{i}"}, index)
            for i, d in enumerate(nodes)
        )
    )
    assert won.count(True) == 1, won
    assert await nodes[0].swap_backup_slot("full", {"slot": "stale"}, index) is False
    assert await nodes[0].swap_backup_slot("full", {"slot": "stale"}, 0) is False
    value, newer = await nodes[2].read_backup_slot("full")
    assert value is not None and value["slot"] == "s2" and newer > index
    # the record outlives its writer's session, stays out of the cluster view, and each type
    # has its own key
    await nodes[won.index(True)].close_session()
    assert (await nodes[3].read_backup_slot("full"))[0] == value
    assert await nodes[3].read_backup_slot("diff") == (None, 0)
    view = await nodes[3].read_cluster()
    assert view.malformed == () and view.config is None


async def test_sync_swap_is_compare_and_set_and_the_view_shows_it(dcs_backend: Any) -> None:
    """The synchronous set's writes: a swap from the index read wins once; a write made from an
    index the key has moved on from (a late write whose answer was lost) never lands."""
    a, b = await new_dcs(dcs_backend), await new_dcs(dcs_backend)
    assert await a.read_sync() == (None, 0)
    first = {"leader": "m1", "term": 3, "members": []}
    won = await asyncio.gather(a.swap_sync(first, 0), b.swap_sync(first, 0))
    assert sorted(won) == [False, True], won
    value, index = await b.read_sync()
    assert value == first and index > 0
    grown = {"leader": "m1", "term": 3, "members": ["m2"]}
    shrunk = {"leader": "m1", "term": 3, "members": []}
    assert await a.swap_sync(shrunk, index) is True
    assert await b.swap_sync(grown, index) is False, "made from an index the key moved on from"
    value, newer = await a.read_sync()
    assert value == shrunk and newer > index
    view = await b.read_cluster()
    assert view.sync is not None and view.sync.get("members") == []


async def test_config_and_switchover_round_trip(dcs_backend: Any) -> None:
    d = await new_dcs(dcs_backend, session=False)
    config = {"ttl": 20, "loop_wait": 5, "synchronous_mode": True, "nested": {"a": [1, 2]}}
    command = {"from": "pg-1", "to": "pg-2", "scheduled_at": None}
    await d.put_config(config)
    await d.put_switchover(command)
    view = await d.read_cluster()
    assert view.config == config and view.switchover == command

    await d.put_config({"ttl": 30})
    await d.delete_switchover()
    view = await d.read_cluster()
    assert view.config == {"ttl": 30} and view.switchover is None
    await d.delete_switchover()  # deleting an absent command is not an error


async def test_sync_state_round_trip_and_watch(dcs_backend: Any) -> None:
    d = await new_dcs(dcs_backend, session=False)
    state = {"leader": "pg-1", "term": 7, "members": ["pg-2"]}
    await d.put_sync(state)
    assert (await d.read_cluster()).sync == state
    await d.put_sync({"leader": "pg-1", "term": 7, "members": []})
    assert (await d.read_cluster()).sync == {"leader": "pg-1", "term": 7, "members": []}


# -- the cluster's timeline counter ------------------------------------------------------------


async def test_timeline_counter_is_create_if_absent_then_compare_and_set(dcs_backend: Any) -> None:
    a = await new_dcs(dcs_backend)
    b = await new_dcs(dcs_backend)
    assert await a.read_timeline() == TimelineCounter(0, 0)  # absent
    assert await a.put_timeline(3, 0) is True
    first = await b.read_timeline()
    assert first.value == 3 and first.index > 0
    assert await b.put_timeline(4, 0) is False, "create-if-absent refuses an existing key"
    assert await a.put_timeline(4, first.index) is True
    assert await b.put_timeline(9, first.index) is False, "a stale index is refused"
    second = await b.read_timeline()
    assert second.value == 4 and second.index > first.index

    # never bound to a session: it outlives every member
    await a.close_session()
    await b.close_session()
    assert (await (await new_dcs(dcs_backend, session=False)).read_timeline()).value == 4


async def test_concurrent_timeline_claims_all_differ_and_only_rise(dcs_backend: Any) -> None:
    nodes = [await new_dcs(dcs_backend, session=False) for _ in range(5)]
    claimed = await asyncio.gather(*(d.claim_timeline(2, attempts=20) for d in nodes))
    assert sorted(claimed) == [2, 3, 4, 5, 6], claimed
    assert (await nodes[0].read_timeline()).value == 6
    # above every earlier claim, and at least what the caller asked for
    assert await nodes[1].claim_timeline(3) == 7
    assert await nodes[2].claim_timeline(12) == 12
    assert (await nodes[3].read_timeline()).value == 12


async def test_timeline_counter_is_outside_the_view_and_survives_garbage(dcs_backend: Any) -> None:
    d = await new_dcs(dcs_backend, session=False)
    await d._put_raw(d.key("timeline"), b"not a timeline")  # type: ignore[attr-defined]
    garbage = await d.read_timeline()
    assert garbage.value == 0 and garbage.index > 0
    view = await d.read_cluster()
    assert view.malformed == () and view.leader is None  # not a key the view decodes
    assert await d.claim_timeline(5) == 5, "an unreadable counter is overwritten, not fatal"
    assert (await d.read_timeline()).value == 5


async def test_clusters_do_not_see_each_other(dcs_backend: Any) -> None:
    # "c1" must not see "c10" (a naive prefix match would)
    c1 = await new_dcs(dcs_backend, "c1")
    c10 = await new_dcs(dcs_backend, "c10")
    assert await c10.acquire_leader("x") is not None
    await c10.put_member("x", {"instance_id": "ix"})
    await c10.put_config({"c": 10})
    assert await c1.acquire_leader("y") is not None  # a different cluster's key
    view = await c1.read_cluster()
    assert view.leader is not None and view.leader.name == "y"
    assert view.members == {} and view.config is None


# -- watch ---------------------------------------------------------------------------------------


async def test_watch_starts_with_the_current_view(dcs_backend: Any, watchers: Any) -> None:
    d = await new_dcs(dcs_backend)
    await d.put_member("a", {"instance_id": "ia"})
    leader = await d.acquire_leader("a")
    await d.put_config({"k": 1})
    w = watchers(d)
    _, first = await w.wait_for(lambda v: True, WATCH_LATENCY_BOUND)
    current = await d.read_cluster()
    assert first.leader == leader == current.leader
    assert first.members == current.members and first.config == current.config
    assert 0 < first.index <= current.index


async def test_watch_delivers_every_kind_of_change_within_a_second(
    dcs_backend: Any, watchers: Any
) -> None:
    d = await new_dcs(dcs_backend)
    other = await new_dcs(dcs_backend)
    w = watchers(other)
    await w.wait_for(lambda v: True, WATCH_LATENCY_BOUND)
    latencies: dict[str, float] = {}

    async def change(label: str, action: Any, pred: Callable[[ClusterView], bool]) -> None:
        """Time from just before the write to the view that shows it."""
        after = len(w.views)
        t0 = time.monotonic()
        await action
        at, _ = await w.wait_for(pred, WATCH_LATENCY_BOUND, after=after)
        latencies[label] = at - t0

    await change(
        "member", d.put_member("a", {"instance_id": "ia", "lsn": 1}), lambda v: "a" in v.members
    )
    after = len(w.views)
    t0 = time.monotonic()
    leader = await d.acquire_leader("a")
    assert leader is not None
    at, _ = await w.wait_for(lambda v: v.leader == leader, WATCH_LATENCY_BOUND, after=after)
    latencies["acquire"] = at - t0
    await change("config", d.put_config({"k": 2}), lambda v: v.config == {"k": 2})
    await change("switchover", d.put_switchover({"to": "b"}), lambda v: v.switchover == {"to": "b"})
    await change("switchover-delete", d.delete_switchover(), lambda v: v.switchover is None)
    await change("release", d.release_leader("a", leader.term), lambda v: v.leader is None)
    await change("initialize", d.try_initialize("a"), lambda v: v.initialize == "a")
    await change(
        "member-update",
        d.put_member("a", {"instance_id": "ia", "lsn": 2}),
        lambda v: v.members.get("a", {}).get("lsn") == 2,
    )
    assert max(latencies.values()) < WATCH_LATENCY_BOUND, latencies
    # views come in index order
    indexes = [v.index for _, v in w.views]
    assert indexes == sorted(indexes)


async def test_watch_resumes_without_loss_after_a_dropped_connection(
    dcs_backend: Any, watchers: Any
) -> None:
    d = await new_dcs(dcs_backend)
    writer = await new_dcs(dcs_backend)
    w = watchers(d)
    await w.wait_for(lambda v: True, WATCH_LATENCY_BOUND)
    # a change seen after the first view proves the watch connection is up (not just the read)
    await writer.put_switchover({"to": "x"})
    await w.wait_for(lambda v: v.switchover == {"to": "x"}, WATCH_LATENCY_BOUND)

    for round_ in range(3):
        await d._drop_watch_connection()  # type: ignore[attr-defined]
        # changes made while the watch reconnects must all arrive
        await writer.put_config({"round": round_})
        await writer.put_member(f"m{round_}", {"instance_id": f"i{round_}"})
        await writer.delete_switchover()
        await writer.put_switchover({"to": f"r{round_}"})
        await w.wait_for(
            lambda v, r=round_: (
                v.config == {"round": r}
                and f"m{r}" in v.members
                and v.switchover == {"to": f"r{r}"}
            ),
            WATCH_LATENCY_BOUND + 2.0,  # reconnect backoff is at most 2 s
        )
    final = w.last
    assert final is not None
    assert set(final.members) == {"m0", "m1", "m2"}
    # the view after the reconnects equals a fresh read
    fresh = await d.read_cluster()
    assert (final.members, final.config, final.switchover, final.leader) == (
        fresh.members,
        fresh.config,
        fresh.switchover,
        fresh.leader,
    )
    indexes = [v.index for _, v in w.views]
    assert indexes == sorted(indexes)


async def test_watch_sees_a_delete_made_while_disconnected(dcs_backend: Any, watchers: Any) -> None:
    d = await new_dcs(dcs_backend)
    holder = await new_dcs(dcs_backend)
    leader = await holder.acquire_leader("h")
    assert leader is not None
    w = watchers(d)
    await w.wait_for(lambda v: v.leader == leader, WATCH_LATENCY_BOUND)
    await holder.put_config({"connected": True})  # seen => the watch connection is up
    await w.wait_for(lambda v: v.config == {"connected": True}, WATCH_LATENCY_BOUND)
    after = len(w.views)
    await d._drop_watch_connection()  # type: ignore[attr-defined]
    assert await holder.release_leader("h", leader.term)
    await w.wait_for(lambda v: v.leader is None, WATCH_LATENCY_BOUND + 2.0, after=after)


async def test_renew_after_close_raises_session_lost(dcs_backend: Any) -> None:
    d = await new_dcs(dcs_backend)
    await d.renew_session()
    await d.close_session()
    with pytest.raises(SessionLost):
        await d.renew_session()
