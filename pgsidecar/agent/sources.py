"""The agent's input sources. Each only *posts* inputs to the queue; none decides.

DCS watch         every change of the cluster's keys (event-driven: etcd watch / Consul
                  blocking query), as a ``dcs`` input; a fresh read when the DCS answers again
lease renewal     a timer at ttl/4 while we may lead, ttl/3 otherwise; success re-arms the fence,
                  a failure posts ``dcs_down``,
                  SessionLost fences and posts ``lease`` {held: false}
the fence         the watchdog fired (from its own thread): ``lease`` {held: false}
PostgreSQL        a health probe every second (only changes are posted) and the postmaster's
                  exit (awaited, so a crash is seen at once); a replica's fork check
Kafka peers       a peer's transition record, as an advisory ``peer`` input
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Histogram

from events.dcs import DCS, ClusterView, DCSError, SessionLost
from events.settings import KafkaSettings
from events.tasks import bounded
from fsm.inputs import pg_facts_to_dict
from fsm.machine import Role
from fsm.records import Record
from fsm.snapshot import PgFacts
from pgsidecar.agent.membership import Membership
from pgsidecar.agent.pgconfig import leader_conninfo
from pgsidecar.agent.ports import Clock, FencePort, PostgresPort
from pgsidecar.agent.recorder import Recorder
from pgsidecar.agent.state import ActionLog, NodeState, Post, TaskSet
from pgsidecar.postgres.control import PostgresError

log = structlog.get_logger("pgsidecar.agent")

# a replica that has not streamed from the master for this long checks whether its timeline forked
FORK_CHECK_AFTER = 5.0
PROBE_INTERVAL = 1.0


def view_to_input(view: ClusterView, clock: Clock) -> dict[str, Any]:
    sw = view.switchover
    if (
        isinstance(sw, dict)
        and isinstance(sw.get("at"), (int, float))
        and not isinstance(sw.get("at"), bool)
    ):
        # a scheduled switchover: the wall-clock time becomes our monotonic clock here, in the
        # recorded input, so the machine (and its replay) only ever compares monotonic times
        sw = {**sw, "at_monotonic": clock.monotonic() + (float(sw["at"]) - clock.wall())}
    return {
        "leader": {"name": view.leader.name, "term": view.leader.term} if view.leader else None,
        "members": view.members,
        "initialize": view.initialize,
        "config": view.config,
        "switchover": sw,
        "sync": view.sync,
        "standby_promoted": view.standby_promoted,
        "index": view.index,
    }


class DcsViews:
    """Views of the DCS for the machine: every view the watch yields, and a fresh read after an
    outage (the watch reports only *changes*; without the read, a member that saw the DCS go
    away would wait for one when nothing changed during the outage)."""

    def __init__(
        self, dcs: DCS, state: NodeState, post: Post, recorder: Recorder, clock: Clock
    ) -> None:
        self.dcs = dcs
        self.state = state
        self.post = post
        self.recorder = recorder
        self.clock = clock
        self._index = -1  # the store index of the newest view posted to the machine

    async def watch(self) -> None:
        async for view in self.dcs.watch():
            self.post_view(view, from_watch=True)

    def post_view(self, view: ClusterView, from_watch: bool) -> None:
        """A read never posts a view older than one the watch already posted (the two race);
        the watch's own views always go (its index may restart, e.g. Consul's index reset)."""
        if not from_watch and view.index < self._index:
            return
        self._index = view.index
        self.state.dcs_view = view
        if view.malformed:
            self.recorder.count("malformed_dcs_values", len(view.malformed))
            for key, reason in view.malformed:
                log.warning("dcs_value_skipped", key=key, reason=reason)
        self.post("dcs", **view_to_input(view, self.clock))

    async def post_fresh(self, within: float) -> None:
        """The DCS answers again (or our session was reopened): read the cluster and post it."""
        try:
            view = await bounded(self.dcs.read_cluster(), within)
        except (DCSError, TimeoutError) as exc:
            log.info("fresh_view_failed", error=str(exc) or type(exc).__name__)
            return
        self.post_view(view, from_watch=False)


def fence_deadline(sent: float, session_ttl: float, clock_drift: float) -> float:
    """When the fence must act, on our monotonic clock, for a session renewed (request sent) at
    ``sent``: the session lives ``session_ttl`` after that on the DCS's clock; ours may run up to
    ``clock_drift`` slower, and we keep a margin of clamp(0.15 ttl, 0.5 s, 2 s) before it."""
    margin = max(0.5, min(2.0, session_ttl * 0.15))
    return sent + session_ttl * (1 - clock_drift) - margin


# seconds; at the smallest sane TTL (2 s) the slack before fencing is about 0.5 s, at 5 s about 3 s
RENEWAL_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)


def renewal_latency_histogram(registry: CollectorRegistry | None) -> Callable[[float], None]:
    """``pgsidecar_lease_renewal_latency_seconds`` on the agent's registry, as the observer a
    LeaseRenewal takes (a no-op without a registry)."""
    if registry is None:
        return lambda seconds: None
    histogram = Histogram(
        "pgsidecar_lease_renewal_latency_seconds",
        "seconds from when a renewal of the DCS session was due to its successful answer: the "
        "round trip plus any lateness of the agent's event loop (a busy machine)",
        buckets=RENEWAL_LATENCY_BUCKETS,
        registry=registry,
    )
    return histogram.observe


class LeaseRenewal:
    """Renews our DCS session every ttl/4 and moves the fence's deadline with each success."""

    def __init__(
        self,
        *,
        dcs: DCS,
        pg: PostgresPort,
        fence: FencePort,
        state: NodeState,
        post: Post,
        clock: Clock,
        views: DcsViews,
        members: Membership,
        ttl: float,
        clock_drift: float,
        count: Callable[[str], None] = lambda name: None,
        observe_latency: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        self.dcs = dcs
        self.pg = pg
        self.fence = fence
        # counters for /metrics: lease_renewals, lease_renewal_failures, sessions_lost
        self.count = count
        # each successful renewal's latency, from when it was due to its answer (/metrics)
        self.observe_latency = observe_latency
        self.state = state
        self.post = post
        self.clock = clock
        self.views = views
        self.members = members
        self.ttl = ttl
        self.clock_drift = clock_drift
        self._wake = asyncio.Event()

    def session_ttl(self) -> float:
        # the granted session TTL, not the configured ttl: Consul is given ttl/2 (it may take up
        # to twice the session TTL to invalidate), etcd the ttl itself
        return self.dcs.session_ttl or self.ttl

    def fence_deadline(self, sent: float) -> float:
        return fence_deadline(sent, self.session_ttl(), self.clock_drift)

    async def open_session(self) -> None:
        sent = self.clock.monotonic()
        await self.dcs.open_session(self.ttl)
        self.state.lease_sent = sent

    def interval(self, down: bool) -> float:
        """How often to renew now. Whoever holds the lease or may take it (master, candidate, a
        member with the lease in hand) renews every ttl/4: the fence deadline is
        ttl(1 - drift) - margin after a renewal, so a renewal that times out still leaves one
        more attempt before it. Every other member renews every ttl/3: its session only keeps
        its member key alive, and one failed renewal still leaves another before the key
        lapses. While the DCS is unreachable everyone tries every ttl/4, so that its return
        is seen as soon as before."""
        ttl = self.session_ttl()
        s = self.state.snapshot
        leading = s.lease.held or self.state.role in (Role.MASTER, Role.CANDIDATE)
        return max(0.25, ttl / 4 if leading or down else ttl / 3)

    async def fresh_for_race(self) -> None:
        """Before an acquire. A win's first fence deadline counts from our last renewal (the
        key's creation does not extend the session); if that renewal is so old that the
        deadline comes within one renewal cycle (the DCS answered no renewal of ours until just
        now, e.g. after a stall), a win would fence at once and waste the election: renew
        first. A renewal that fails raises, and the acquire is retried after a back-off."""
        cycle = self.interval(False)
        now = self.clock.monotonic()
        if self.fence_deadline(self.state.lease_sent) - now > cycle:
            return
        await bounded(self.dcs.renew_session(), cycle)
        # an earlier-sent renewal of the loop's may land after this: it can only make the
        # deadline earlier, never later than the session really lives
        self.state.lease_sent = max(self.state.lease_sent, now)
        self.count("lease_renewals")

    def cadence_changed(self) -> None:
        """Our role changed: the next renewal is due sooner if we may now lead (a candidate
        that wins counts its first fence deadline from its last renewal)."""
        self._wake.set()

    async def run(self) -> None:
        down = False
        last = self.clock.monotonic()
        woken_at: float | None = None
        while True:
            interval = self.interval(down)
            due = last + interval
            if woken_at is not None:
                # a change of role made the renewal due at once: it is late from then, not from
                # the time the old cadence would have given
                due = max(due, woken_at)
            wait = due - self.clock.monotonic()
            if wait > 0:
                self._wake.clear()
                try:
                    await bounded(self._wake.wait(), wait)
                except TimeoutError:
                    pass  # the time is up: renew now, whatever float rounding left of the wait
                else:
                    woken_at = self.clock.monotonic()
                    continue  # woken by a change of role: recompute the cadence
            woken_at = None
            last = self.clock.monotonic()
            down = await self.renew_once(interval, down, due=due)

    async def renew_once(self, interval: float, down: bool, due: float | None = None) -> bool:
        """One renewal; returns whether the DCS is now known to be unreachable. ``due``: when
        the renewal was scheduled (default: now); its latency is measured from then, so a late
        wake-up of a busy event loop counts as much as a slow answer: the fencing deadline
        does not care which it was."""
        sent = self.clock.monotonic()
        try:
            await bounded(self.dcs.renew_session(), interval)
            self.count("lease_renewals")
            self.observe_latency(max(0.0, self.clock.monotonic() - (sent if due is None else due)))
            self.state.lease_sent = sent
            if self.state.snapshot.lease.held:
                self.fence.arm(self.fence_deadline(sent))
            if down:
                log.info("dcs_reachable_again")
                await self.views.post_fresh(within=interval)
            return False
        except SessionLost:
            self.count("sessions_lost")
            log.warning("session_lost")
            if self.state.snapshot.lease.held:
                self.pg.fence()
                self.fence.disarm()
                self.post("lease", held=False, term=None)
            if await self.reopen_session():
                await self.views.post_fresh(within=interval)
                return False
            return down
        except (TimeoutError, DCSError) as exc:
            self.count("lease_renewal_failures")
            if not down:
                log.warning("lease_renew_failed", error=str(exc) or type(exc).__name__)
                self.post("dcs_down")
            return True

    async def reopen_session(self) -> bool:
        """A new session after ours was lost; our member key goes with it (bound to the session).
        False if the store did not answer: the next renewal finds the old session lost again
        and comes back here, so this is retried every renewal interval."""
        self.members.forget_published()  # the key went with the session: publish it again
        try:
            sent = self.clock.monotonic()
            await bounded(self.dcs.open_session(self.ttl), self.ttl / 2)
            self.state.lease_sent = sent
            data = self.members.member_data()
            await bounded(self.dcs.put_member(self.state.name, data), self.ttl / 2)
            self.members.published(data)
        except (DCSError, TimeoutError) as exc:
            log.warning("session_reopen_failed", error=str(exc) or type(exc).__name__)
            return False
        log.info("session_reopened")
        return True


def watchdog_fired(post_threadsafe: Post) -> None:
    """The fence's deadline passed (called on the watchdog's thread): the lease is lost."""
    log.error("fencing_deadline_passed")
    post_threadsafe("lease", held=False, term=None)


class PgWatch:
    """Our PostgreSQL as inputs: the probe posts what changed, the exit watch posts a crash."""

    def __init__(
        self, pg: PostgresPort, post: Post, tasks: TaskSet, publish: Callable[[], None]
    ) -> None:
        self.pg = pg
        self.post = post
        self.tasks = tasks
        self.publish = publish
        self._last: dict[str, Any] | None = None
        self._exit_waiter: asyncio.Task[Any] | None = None
        self._expected_exit = False

    async def probe_now(self) -> PgFacts:
        facts = await self.pg.probe()
        if self._exit_waiter is None and facts.running and self.pg.running:
            self.watch_exit()
        data = pg_facts_to_dict(facts)
        if data != self._last:
            # the loop publishes the member key once it has applied this (Agent.handle)
            self._last = data
            self.post("pg", **data)
        else:
            self.publish()  # nothing new: rewrites the key only if the last write failed
        return facts

    def post_facts(self, facts: PgFacts, **extra: Any) -> None:
        """Post facts with what the probe cannot see (a crash, failed starts), whatever changed."""
        data = {**pg_facts_to_dict(facts), **extra}
        self._last = data
        self.post("pg", **data)

    def expect_exit(self) -> None:
        """We are stopping it: its exit is not a crash."""
        self._expected_exit = True

    def watch_exit(self) -> None:
        if self._exit_waiter is not None and not self._exit_waiter.done():
            return
        self._expected_exit = False
        self._exit_waiter = self.tasks.spawn(self._await_exit(), "postgres_exit_watch")

    async def _await_exit(self) -> None:
        code = await self.pg.wait_exit()
        self._exit_waiter = None
        if not self._expected_exit:
            log.warning("postgres_exited", code=code)
            self.post_facts(await self.pg.probe(), crashed=True)


class ForkCheck:
    """A replica that has not streamed from the master for a while: has our timeline forked
    from the master's (we have WAL past the point where the master's history left our
    timeline)? Then PostgreSQL can never follow it: report it, the machine rewinds."""

    def __init__(
        self, state: NodeState, pg: PostgresPort, post: Post, record: ActionLog, clock: Clock
    ) -> None:
        self.state = state
        self.pg = pg
        self.post = post
        self.record = record
        self.clock = clock
        self._not_streaming_since: float | None = None
        self._last_check = 0.0

    async def check(self) -> None:
        s = self.state.snapshot
        leader = s.dcs.leader
        if (
            s.busy
            or s.needs_rewind
            or leader is None
            or not s.pg.running
            or s.pg.receiver_streaming
        ):
            self._not_streaming_since = None
            return
        now = self.clock.monotonic()
        if self._not_streaming_since is None:
            self._not_streaming_since = now
            return
        if (
            now - self._not_streaming_since < FORK_CHECK_AFTER
            or now - self._last_check < FORK_CHECK_AFTER
        ):
            return
        self._last_check = now
        src = leader_conninfo(self.state, self.pg, replication=False)
        mine_tl, mine_lsn = s.pg.timeline, s.pg.lsn
        if src is None or mine_tl is None:
            return
        if mine_lsn is None:
            # a standby that does not answer queries yet (not consistent: it may be waiting for
            # WAL of a timeline the master never had): where it has got to, from pg_control
            mine_lsn = await self._control_lsn()
            if mine_lsn is None:
                return
        try:
            history = await bounded(self.pg.timeline_history(src[1]), 10)
        except (PostgresError, TimeoutError) as exc:
            log.info("fork_check_failed", error=str(exc))
            return
        leader_tl = (s.dcs.members.get(leader.name) and s.dcs.members[leader.name].timeline) or None
        switch = next((lsn for parent, lsn in history if parent == mine_tl), None)
        forked = (switch is not None and mine_lsn > switch) or (
            switch is None and leader_tl is not None and mine_tl != leader_tl
        )
        if not forked and switch is None and mine_tl == leader_tl and mine_tl > 1:
            # the same timeline number is not the same timeline: two members that promoted from
            # the same parent (one of them a promotion whose lease was lost at once) both call
            # theirs N. They are one timeline only if they left the parent at the same point.
            forked = await self._same_number_other_history(mine_tl, history)
        self.record(
            "fork_check", "forked" if forked else "not_forked", now, timeline=mine_tl, lsn=mine_lsn
        )
        if forked:
            self.post("effect", name="diverged", done=False)

    async def _control_lsn(self) -> int | None:
        try:
            cd = await bounded(self.pg.controldata(), 10)
        except (PostgresError, TimeoutError, OSError) as exc:
            log.info("fork_check_failed", error=str(exc) or type(exc).__name__)
            return None
        known = [x for x in (cd.checkpoint_lsn, cd.min_recovery_end_lsn) if x is not None]
        return max(known) if known else None

    async def _same_number_other_history(
        self, tl: int, master_history: list[tuple[int, int]]
    ) -> bool:
        """Our timeline ``tl`` left its parent at another point than the master's ``tl`` did."""
        theirs = dict(master_history).get(tl - 1)
        try:
            ours_list = await bounded(self.pg.timeline_history(self.pg.superuser_conninfo()), 10)
        except (PostgresError, TimeoutError) as exc:
            log.info("fork_check_failed", error=str(exc))
            return False
        ours = dict(ours_list).get(tl - 1)
        return theirs is not None and ours is not None and ours != theirs


async def probe_loop(
    state: NodeState,
    pg: PostgresPort,
    watch: PgWatch,
    fork: ForkCheck,
    sync_tick: Callable[[], Awaitable[None]],
) -> None:
    """Probe every second; a replica checks for a fork, the master keeps its synchronous set."""
    while True:
        await watch.probe_now()
        s = state.snapshot
        if state.role is Role.REPLICA:
            await fork.check()
        if state.role is Role.MASTER and s.lease.held and not s.busy and pg.running:
            try:
                await bounded(sync_tick(), 5)
            except Exception as exc:
                log.warning("sync_tick_failed", error=str(exc) or type(exc).__name__)
        await asyncio.sleep(PROBE_INTERVAL)


class PeerFeed:
    """Peers' transitions from the Kafka topic, fed to the machine as advisory ``peer`` inputs
    (recorded like any input). They never decide leadership: only the DCS does. Only
    transitions are fed, so our own input records of peers do not echo back."""

    def __init__(self, settings: KafkaSettings, cluster: str, name: str, post: Post) -> None:
        # the whole settings: the topic, TLS/SASL, and the keys that verify peers' records
        self.settings = settings
        self.cluster = cluster
        self.name = name
        self.post = post
        self._consumer: Any = None

    def on_record(self, rec: Record) -> None:
        if rec.kind != "transition" or rec.node == self.name or rec.cluster != self.cluster:
            return
        b = rec.body
        self.post(
            "peer",
            node=rec.node,
            seq=rec.seq,
            term=rec.term,
            source=b.get("from"),
            dest=b.get("to"),
            trigger=b.get("trigger"),
            lsn=b.get("lsn"),
            timeline=b.get("timeline"),
        )

    async def start(self) -> None:
        from events.kafka import KafkaPeerConsumer

        self._consumer = KafkaPeerConsumer.from_settings(
            self.settings, self.cluster, self.name, self.on_record
        )
        await self._consumer.start()

    async def close(self) -> None:
        if self._consumer is not None:
            await bounded(self._consumer.close(), 2)
