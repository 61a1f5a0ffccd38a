"""A simulated consensus store behind the agent's DCS interface (events.dcs.base.DCS).

One :class:`SimStore` is the server, shared by every member of a simulated cluster; each member
talks to it through its own :class:`SimDCS` client. The store keeps etcd's model, the stricter of
the two real backends: one store-wide index that every write raises (the leader key's modify
index is the *term*), sessions that are leases expiring ``ttl`` after the store last heard a
renewal, keys bound to a session deleted with it, and a history of every change from which a
watch resumes after a lost connection. Time is the running loop's ``loop.time()``: virtual on
:class:`~pgsidecar.lab.sim.clock.VirtualEventLoop`, real on an ordinary loop (the DCS contract
suite runs it there, beside etcd and the Consul emulator).

What a request goes through (``SimDCS._call``), in order: the client is closed or cut off (a cut
request is never answered: the caller waits its timeout); a drawn fault (an error answer, or a
request lost on the way: the caller waits its timeout); the way there (a drawn latency); a stalled
store queues the request until the stall ends, while the caller gives up at its timeout (the
request is still applied later, as on a real server); the operation is applied atomically at the
store; a write's answer may be lost (applied, but the caller gets a DCSError); the way back.

Faults are off unless a :class:`FaultPlan` switches them on. Every fault and every change is
appended to ``SimStore.trace`` with its virtual time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from events.dcs.base import (
    DCS,
    ClusterView,
    DCSError,
    DuplicateMember,
    Leader,
    SessionLost,
    TimelineCounter,
    build_view,
    decode_json_object,
    decode_timeline,
)
from events.tasks import bounded
from pgsidecar.lab.sim.clock import derive_rng

T = TypeVar("T")

# the bound of one request, as the real adapters have (etcd: a third of the TTL, at most 2 s)
MAX_REQUEST_TIMEOUT = 2.0
WATCH_BACKOFF_START = 0.1
WATCH_BACKOFF_CAP = 2.0
# the cluster's keys (besides members/) whose values are JSON objects in a ClusterView
JSON_OBJECT_KEYS = ("config", "switchover", "sync", "standby_promoted")


@dataclass(frozen=True)
class Latency:
    """Delays drawn uniformly from each (low, high) range, in seconds."""

    request: tuple[float, float] = (0.0005, 0.003)  # one way
    watch: tuple[float, float] = (0.001, 0.02)  # from a commit to its delivery on a stream


@dataclass(frozen=True)
class FaultPlan:
    """Which faults the store and its clients inject, and how often. All off by default.

    Per-request probabilities are drawn once per request; episodes (stalls, cuts) arrive at the
    given rate per virtual second, each lasting a duration drawn from its range."""

    request_error: float = 0.0  # answered with an error, not applied
    request_timeout: float = 0.0  # lost on the way: never applied, the caller waits its timeout
    lost_answer: float = 0.0  # a write applied whose answer is lost: the caller gets an error
    watch_drop: float = 0.0  # per change delivered: the stream breaks before delivering it
    session_invalidated: float = 0.0  # per renewal: the store drops the session first
    stall_rate: float = 0.0  # the whole store stops answering (requests queue, expiry waits)
    stall_duration: tuple[float, float] = (0.5, 5.0)
    cut_rate: float = 0.0  # one member (drawn) cannot reach the store
    cut_duration: tuple[float, float] = (1.0, 30.0)

    @property
    def any(self) -> bool:
        return any(
            (
                self.request_error,
                self.request_timeout,
                self.lost_answer,
                self.watch_drop,
                self.session_invalidated,
                self.stall_rate,
                self.cut_rate,
            )
        )


NO_FAULTS = FaultPlan()


@dataclass
class _Entry:
    value: bytes
    mod_index: int
    session: int | None  # the session the key is bound to (deleted with it)


@dataclass(frozen=True)
class Change:
    """One write to the store: ``value`` None is a delete."""

    index: int
    key: str
    value: bytes | None
    mod_index: int


@dataclass
class _Session:
    sid: int
    owner: str
    ttl: float
    expires_at: float
    timer: asyncio.TimerHandle | None = None


class _Stream:
    """One open watch stream of one client: changes are delivered in order, each after a drawn
    delay; ``broken`` ends it (the client reconnects and resumes from the last index it saw)."""

    def __init__(self, client: SimDCS) -> None:
        self.client = client
        self.queue: asyncio.Queue[Change | None] = asyncio.Queue()
        self.pending: deque[tuple[float, Change]] = deque()
        self.last_due = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.broken = False

    def offer(self, change: Change, now: float, delay: float) -> None:
        due = max(self.last_due, now + delay)  # never overtakes an earlier change
        self.last_due = due
        self.pending.append((due, change))
        if self.timer is None:
            self._arm()

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self.timer = loop.call_at(self.pending[0][0], self._deliver)

    def _deliver(self) -> None:
        self.timer = None
        if self.broken:
            return
        now = asyncio.get_running_loop().time()
        while self.pending and self.pending[0][0] <= now:
            _, change = self.pending.popleft()
            if self.client.store.draw(self.client.rng, "watch_drop"):
                self.client.store.record("fault", "watch_drop", self.client.member)
                self.break_()
                return
            self.queue.put_nowait(change)
        if self.pending:
            self._arm()

    def break_(self) -> None:
        if self.broken:
            return
        self.broken = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pending.clear()
        self.queue.put_nowait(None)


class SimStore:
    """The simulated server. ``rng`` seeds every client's own generator; ``trace`` records
    (virtual time, kind, detail) of every change and fault."""

    def __init__(
        self,
        rng: random.Random | None = None,
        *,
        faults: FaultPlan = NO_FAULTS,
        latency: Latency | None = None,
        min_ttl: float = 1.0,
    ) -> None:
        self.rng = rng if rng is not None else random.Random(0)
        self.faults = faults
        self.latency = latency or Latency()
        self.min_ttl = min_ttl
        self.index = 1  # etcd's first revision
        self.data: dict[str, _Entry] = {}
        self.history: list[Change] = []
        self.sessions: dict[int, _Session] = {}
        self._next_sid = 1
        self._streams: list[_Stream] = []
        self.cut_off: set[str] = set()
        self._stalled_until = 0.0
        self._stall_queue: list[Callable[[], None]] = []
        self._stall_timer: asyncio.TimerHandle | None = None
        self.clients: list[SimDCS] = []
        self.trace: list[tuple[float, str, str]] = []
        self._episodes: asyncio.Task[None] | None = None
        # member key -> (raw value, decoded, reason), shared by every client's views: each
        # value is decoded once, however many members read it
        self.decoded: dict[str, tuple[bytes, dict[str, Any] | None, str | None]] = {}

    # -- plumbing ------------------------------------------------------------------------------
    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    def record(self, kind: str, what: str, detail: str = "") -> None:
        self.trace.append((round(self.now(), 6), kind, f"{what} {detail}".strip()))

    def draw(self, rng: random.Random, fault: str) -> bool:
        p = float(getattr(self.faults, fault))
        return p > 0 and rng.random() < p

    def client(
        self, cluster: str, member: str | None = None, prefix: str = "pgsidecar", **kwargs: Any
    ) -> SimDCS:
        """A new client (one member's connection), not yet connected."""
        name = member or f"client-{len(self.clients) + 1}"
        dcs = SimDCS(self, cluster, name, prefix=prefix, **kwargs)
        self.clients.append(dcs)
        return dcs

    # -- stalls and cuts -----------------------------------------------------------------------
    @property
    def stalled(self) -> bool:
        return self.now() < self._stalled_until

    def stall(self, seconds: float) -> None:
        """The whole store stops answering for ``seconds``: requests queue (their callers time
        out), no session expires; at the end the queue is applied in arrival order and every
        session whose time passed meanwhile expires."""
        until = self.now() + seconds
        if until <= self._stalled_until:
            return
        self._stalled_until = until
        self.record("fault", "stall", f"{seconds:.3f}s")
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        self._stall_timer = asyncio.get_running_loop().call_at(until, self._end_stall)

    def _end_stall(self) -> None:
        self._stall_timer = None
        self.record("heal", "stall")
        # leases whose time passed during the stall expire first: a renewal stuck in the queue
        # was sent too late (its caller has long given up and must have fenced)
        for session in sorted(self.sessions.values(), key=lambda s: s.sid):
            if session.expires_at <= self.now():
                self._expire(session.sid)
        queued, self._stall_queue = self._stall_queue, []
        for apply in queued:
            apply()

    def cut(self, member: str) -> None:
        """``member`` can no longer reach the store: its requests go unanswered, its watch
        streams break. Its session lapses unless healed within its TTL."""
        if member in self.cut_off:
            return
        self.cut_off.add(member)
        self.record("fault", "cut", member)
        for stream in list(self._streams):
            if stream.client.member == member:
                self._close_stream(stream)

    def heal(self, member: str) -> None:
        if member in self.cut_off:
            self.cut_off.discard(member)
            self.record("heal", "cut", member)

    def invalidate_session(self, member: str) -> bool:
        """Drop ``member``'s sessions now, as an operator or a server restart would: its keys go,
        its next renewal raises SessionLost."""
        found = False
        for session in sorted(self.sessions.values(), key=lambda s: s.sid):
            if session.owner == member:
                self.record("fault", "session_invalidated", member)
                self._drop_session(session.sid)
                found = True
        return found

    def start_episodes(self, members: list[str]) -> None:
        """Draw stalls and cuts over virtual time (FaultPlan's rates) until stop_episodes()."""
        if self._episodes is None and (self.faults.stall_rate or self.faults.cut_rate):
            rng = derive_rng(self.rng)
            self._episodes = asyncio.create_task(self._run_episodes(rng, sorted(members)))

    async def stop_episodes(self) -> None:
        task, self._episodes = self._episodes, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for member in sorted(self.cut_off):
            self.heal(member)

    async def _run_episodes(self, rng: random.Random, members: list[str]) -> None:
        plan = self.faults
        rate = plan.stall_rate + plan.cut_rate
        while True:
            await asyncio.sleep(rng.expovariate(rate))
            if rng.random() * rate < plan.stall_rate:
                self.stall(rng.uniform(*plan.stall_duration))
            elif members:
                member = rng.choice(members)
                self.cut(member)
                asyncio.get_running_loop().call_later(
                    rng.uniform(*plan.cut_duration), self.heal, member
                )

    # -- applying requests ---------------------------------------------------------------------
    def submit(self, apply: Callable[[], None]) -> None:
        """Apply ``apply`` now, or when the current stall ends (in arrival order)."""
        if self.stalled:
            self._stall_queue.append(apply)
        else:
            apply()

    def _commit(self, key: str, value: bytes | None, session: int | None = None) -> Change:
        self.index += 1
        if value is None:
            self.data.pop(key, None)
        else:
            self.data[key] = _Entry(value, self.index, session)
        change = Change(self.index, key, value, self.index)
        self.history.append(change)
        now = self.now()
        for stream in list(self._streams):
            if key.startswith(stream.client.base):
                stream.offer(change, now, stream.client.rng.uniform(*self.latency.watch))
        return change

    def get(self, key: str) -> _Entry | None:
        return self.data.get(key)

    def put(self, key: str, value: bytes, session: int | None = None) -> int:
        return self._commit(key, value, session).index

    def delete(self, key: str) -> bool:
        if key not in self.data:
            return False
        self._commit(key, None)
        return True

    def entries(self, base: str) -> list[tuple[str, bytes, int, bool]]:
        return [
            (key, e.value, e.mod_index, True)
            for key, e in sorted(self.data.items())
            if key.startswith(base)
        ]

    def changes_after(self, index: int, base: str) -> list[Change]:
        # the history is in index order: bisect by hand to stay cheap on long runs
        lo, hi = 0, len(self.history)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.history[mid].index <= index:
                lo = mid + 1
            else:
                hi = mid
        return [c for c in self.history[lo:] if c.key.startswith(base)]

    # -- sessions ------------------------------------------------------------------------------
    def create_session(self, owner: str, ttl: float) -> _Session:
        sid = self._next_sid
        self._next_sid += 1
        granted = max(self.min_ttl, ttl)
        session = _Session(sid, owner, granted, self.now() + granted)
        self.sessions[sid] = session
        self._arm_expiry(session)
        self.record("session", "open", f"{owner} #{sid} ttl={granted:g}")
        return session

    def _arm_expiry(self, session: _Session) -> None:
        if session.timer is not None:
            session.timer.cancel()
        loop = asyncio.get_running_loop()
        session.timer = loop.call_at(session.expires_at, self._expire, session.sid)

    def _expire(self, sid: int) -> None:
        session = self.sessions.get(sid)
        if session is None:
            return
        session.timer = None
        if self.stalled:
            # the stall's end expires it if its time passed by then; else its own time does
            if session.expires_at > self._stalled_until:
                self._arm_expiry(session)
            return
        if session.expires_at > self.now():
            self._arm_expiry(session)  # renewed since this timer was set
            return
        self.record("session", "expired", f"{session.owner} #{sid}")
        self._drop_session(sid)

    def renew(self, sid: int) -> float:
        session = self.sessions.get(sid)
        if session is None:
            raise SessionLost(f"simulated session #{sid} no longer exists")
        session.expires_at = self.now() + session.ttl
        # the timer set at the previous expiry stays: when it fires it finds the new time and
        # moves on to it (one timer per TTL rather than one per renewal)
        if session.timer is None:
            self._arm_expiry(session)
        return session.ttl

    def _drop_session(self, sid: int) -> bool:
        session = self.sessions.pop(sid, None)
        if session is None:
            return False
        if session.timer is not None:
            session.timer.cancel()
        for key in sorted(k for k, e in self.data.items() if e.session == sid):
            self._commit(key, None)
        return True

    def require_session(self, sid: int) -> None:
        if sid not in self.sessions:
            raise SessionLost(f"simulated session #{sid} no longer exists")

    # -- watch streams -------------------------------------------------------------------------
    def open_stream(self, client: SimDCS, after: int) -> tuple[_Stream, list[Change]]:
        """A new stream for ``client`` and the changes it missed since ``after`` (atomically:
        nothing falls between the two)."""
        stream = _Stream(client)
        self._streams.append(stream)
        return stream, self.changes_after(after, client.base)

    def _close_stream(self, stream: _Stream) -> None:
        stream.break_()
        if stream in self._streams:
            self._streams.remove(stream)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")


class SimDCS(DCS):
    """One member's client of a :class:`SimStore`, with etcd's semantics (see the module
    docstring). ``member`` names it for the store's cuts and trace."""

    def __init__(
        self,
        store: SimStore,
        cluster: str,
        member: str,
        prefix: str = "pgsidecar",
        *,
        request_timeout: float | None = None,
    ) -> None:
        super().__init__(cluster, prefix)
        self.store = store
        self.member = member
        self.rng = derive_rng(store.rng)
        self._request_timeout = request_timeout
        self._sid: int | None = None
        self._ttl = 0.0
        self._closed = False
        self._streams: list[_Stream] = []
        self.requests = 0

    def __repr__(self) -> str:
        return f"SimDCS(cluster={self.cluster!r}, member={self.member!r})"

    @property
    def timeout(self) -> float:
        if self._request_timeout is not None:
            return self._request_timeout
        if not self._ttl:
            return MAX_REQUEST_TIMEOUT
        return min(self._ttl / 3.0, MAX_REQUEST_TIMEOUT)

    async def _call(
        self,
        what: str,
        op: Callable[[], T],
        *,
        write: bool,
        undo: Callable[[T], None] | None = None,
    ) -> T:
        """One request: see the module docstring for what it goes through. ``undo`` is called
        with the result of a request that was applied but whose answer never reached us."""
        if self._closed:
            raise DCSError(f"simulated DCS client of {self.member} is closed")
        self.requests += 1
        store = self.store
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        if self.member in store.cut_off:
            await asyncio.sleep(self.timeout)
            raise DCSError(f"{what}: no answer within {self.timeout:g}s (cut off from the DCS)")
        if store.draw(self.rng, "request_error"):
            store.record("fault", "request_error", f"{self.member} {what}")
            await asyncio.sleep(self.rng.uniform(*store.latency.request) * 2)
            raise DCSError(f"{what}: the simulated DCS answered with an error")
        if store.draw(self.rng, "request_timeout"):
            store.record("fault", "request_timeout", f"{self.member} {what}")
            await asyncio.sleep(self.timeout)
            raise DCSError(f"{what}: no answer within {self.timeout:g}s")
        lose_answer = write and store.draw(self.rng, "lost_answer")
        if not lose_answer:
            outcome, answer = await self._round_trip(op)
            if outcome == "ok":
                return answer  # type: ignore[no-any-return]
            if outcome == "cut":
                if undo is not None:
                    undo(answer)
                await asyncio.sleep(max(0.0, deadline - loop.time()))
                raise DCSError(f"{what}: no answer within {self.timeout:g}s (cut off from the DCS)")
        else:
            await asyncio.sleep(self.rng.uniform(*store.latency.request))
        # the request reached a stalled store, or someone was cut meanwhile, or the answer will
        # be lost: the general path
        if self.member in store.cut_off:  # cut while the request travelled: lost
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            raise DCSError(f"{what}: no answer within {self.timeout:g}s (cut off from the DCS)")
        if store.stalled:
            result = await self._wait_stalled(what, op, undo, deadline)
        else:
            # the usual case: the store applies the request on arrival (an answer such as
            # SessionLost raises from here), with no future and no timer for our timeout
            result = op()
        if lose_answer:
            store.record("fault", "lost_answer", f"{self.member} {what}")
            if undo is not None:
                undo(result)
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            raise DCSError(f"{what}: connection lost before the answer")
        await asyncio.sleep(self.rng.uniform(*store.latency.request))
        if self.member in store.cut_off:
            if undo is not None:
                undo(result)
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            raise DCSError(f"{what}: no answer within {self.timeout:g}s (cut off from the DCS)")
        return result

    async def _round_trip(self, op: Callable[[], T]) -> tuple[str, Any]:
        """The usual request: applied on arrival, answered after the way back, with one wake-up
        of the caller (timers carry the request there and the answer back). Returns ("ok",
        result); ("cut", result) when we were cut off while the answer travelled; or ("slow",
        None) at the arrival time when the store is stalled or we are cut off, for the general
        path to go on from there. An answer such as SessionLost raises."""
        store = self.store
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[tuple[str, Any]] = loop.create_future()

        def arrive() -> None:
            if reply.done():
                return  # the caller went away before the request left
            if self.member in store.cut_off or store.stalled:
                reply.set_result(("slow", None))
                return
            try:
                result = op()
            except Exception as exc:  # an answer (SessionLost, DuplicateMember, ...)
                reply.set_exception(exc)
                return
            back = self.rng.uniform(*store.latency.request)
            loop.call_at(loop.time() + back, answer_back, result)

        def answer_back(result: Any) -> None:
            if not reply.done():
                reply.set_result(("cut" if self.member in store.cut_off else "ok", result))

        loop.call_at(loop.time() + self.rng.uniform(*store.latency.request), arrive)
        return await reply

    async def _wait_stalled(
        self,
        what: str,
        op: Callable[[], T],
        undo: Callable[[T], None] | None,
        deadline: float,
    ) -> T:
        """A request that reached a stalled store: queued until the stall ends; we wait until
        our deadline at most (the request is applied anyway when the stall ends)."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[T] = loop.create_future()
        # an answer may come after its caller is gone (killed, paused past its timeout): it is
        # then nobody's to read, which is no error
        answer.add_done_callback(_retrieved)

        def apply() -> None:
            # runs even when the caller gave up meanwhile: the request reached the store
            try:
                result = op()
            except Exception as exc:  # an answer (SessionLost, DuplicateMember, ...)
                if not answer.done():
                    answer.set_exception(exc)
                return
            if not answer.done():
                answer.set_result(result)

        self.store.submit(apply)
        try:
            return await bounded(asyncio.shield(answer), max(0.0, deadline - loop.time()))
        except TimeoutError:
            answer.add_done_callback(lambda fut: _abandon(fut, undo))
            raise DCSError(f"{what}: no answer within {self.timeout:g}s") from None

    def _require_sid(self) -> int:
        if self._sid is None:
            raise SessionLost("no simulated session: open_session was not called or it was closed")
        return self._sid

    # -- lifecycle -----------------------------------------------------------------------------
    async def connect(self) -> None:
        self._closed = False
        await self._call("connect", lambda: None, write=False)

    async def close(self) -> None:
        self._closed = True
        for stream in list(self._streams):
            self.store._close_stream(stream)
        self._streams.clear()

    # -- session -------------------------------------------------------------------------------
    @property
    def session_ttl(self) -> float:
        return self._ttl if self._sid is not None else 0.0

    async def open_session(self, ttl: float) -> None:
        if self._sid is not None:
            # one session per agent: the old one's keys go now, not at its TTL
            try:
                await self.close_session()
            except DCSError:
                pass
        session = await self._call(
            "open_session", lambda: self.store.create_session(self.member, ttl), write=True
        )
        self._sid = session.sid
        self._ttl = session.ttl

    async def renew_session(self) -> None:
        sid = self._require_sid()

        def renew() -> float:
            if self.store.draw(self.rng, "session_invalidated"):
                self.store.record("fault", "session_invalidated", self.member)
                self.store._drop_session(sid)
            return self.store.renew(sid)

        self._ttl = await self._call("renew_session", renew, write=False)

    async def close_session(self) -> None:
        sid = self._sid
        if sid is None:
            return

        def destroy() -> None:
            if self.store._drop_session(sid):
                self.store.record("session", "closed", f"{self.member} #{sid}")

        await self._call("close_session", destroy, write=True)
        self._sid = None
        self._ttl = 0.0

    # -- leader --------------------------------------------------------------------------------
    async def acquire_leader(self, name: str) -> Leader | None:
        sid = self._require_sid()
        key = self.key("leader")

        def acquire() -> Leader | None:
            entry = self.store.get(key)
            # a key bound to no session is no lock (written by something other than an agent)
            if entry is None or entry.session is None:
                self.store.require_session(sid)
                index = self.store.put(key, name.encode(), sid)
                self.store.record("leader", "acquired", f"{name} term={index}")
                return Leader(name, index)
            if entry.value == name.encode() and entry.session == sid:
                return Leader(name, entry.mod_index)  # ours already (a retried acquire)
            return None

        return await self._call("acquire_leader", acquire, write=True)

    async def release_leader(self, name: str, term: int) -> bool:
        key = self.key("leader")

        def release() -> bool:
            entry = self.store.get(key)
            if entry is None or entry.value != name.encode() or entry.mod_index != term:
                return False
            self.store.delete(key)
            self.store.record("leader", "released", f"{name} term={term}")
            return True

        return await self._call("release_leader", release, write=True)

    # -- members -------------------------------------------------------------------------------
    async def register_member(self, name: str, data: dict[str, Any]) -> None:
        sid = self._require_sid()
        key = self.key("members", name)
        value = _dumps(data)

        def register() -> None:
            self.store.require_session(sid)
            entry = self.store.get(key)
            if entry is not None and entry.session != sid:
                existing, _reason = decode_json_object(key, entry.value)
                theirs = existing.get("instance_id") if existing else None
                ours = data.get("instance_id")
                if ours is None or theirs != ours:
                    raise DuplicateMember(
                        f"member name {name!r} is already registered by another live agent "
                        f"(instance_id {theirs!r}, ours {ours!r})"
                    )
            self.store.put(key, value, sid)

        await self._call("register_member", register, write=True)

    async def put_member(self, name: str, data: dict[str, Any]) -> None:
        sid = self._require_sid()
        key = self.key("members", name)
        value = _dumps(data)

        def put() -> None:
            self.store.require_session(sid)
            self.store.put(key, value, sid)

        await self._call("put_member", put, write=True)

    # -- initialize / config / commands --------------------------------------------------------
    async def try_initialize(self, name: str) -> bool:
        key = self.key("initialize")

        def initialize() -> bool:
            if self.store.get(key) is not None:
                return False
            self.store.put(key, name.encode())
            return True

        return await self._call("try_initialize", initialize, write=True)

    async def cancel_initialize(self, name: str) -> bool:
        key = self.key("initialize")

        def cancel() -> bool:
            entry = self.store.get(key)
            if entry is None or entry.value != name.encode():
                return False
            return self.store.delete(key)

        return await self._call("cancel_initialize", cancel, write=True)

    async def _put_unbound(self, what: str, key: str, value: bytes) -> None:
        await self._call(what, lambda: self.store.put(key, value), write=True)

    async def put_config(self, config: dict[str, Any]) -> None:
        await self._put_unbound("put_config", self.key("config"), _dumps(config))

    async def put_switchover(self, command: dict[str, Any]) -> None:
        await self._put_unbound("put_switchover", self.key("switchover"), _dumps(command))

    async def put_standby_promoted(self, record: dict[str, Any]) -> None:
        await self._put_unbound(
            "put_standby_promoted", self.key("standby_promoted"), _dumps(record)
        )

    async def delete_switchover(self) -> None:
        key = self.key("switchover")
        await self._call("delete_switchover", lambda: self.store.delete(key), write=True)

    async def put_sync(self, state: dict[str, Any]) -> None:
        await self._put_unbound("put_sync", self.key("sync"), _dumps(state))

    async def read_sync(self) -> tuple[dict[str, Any] | None, int]:
        return await self._read_object("read_sync", self.key("sync"))

    async def swap_sync(self, state: dict[str, Any], index: int) -> bool:
        return await self._swap("swap_sync", self.key("sync"), state, index)

    # -- scheduled backups ---------------------------------------------------------------------
    async def read_backup_slot(self, kind: str) -> tuple[dict[str, Any] | None, int]:
        return await self._read_object("read_backup_slot", self.key("backup", kind))

    async def swap_backup_slot(self, kind: str, value: dict[str, Any], index: int) -> bool:
        return await self._swap("swap_backup_slot", self.key("backup", kind), value, index)

    async def _read_object(self, what: str, key: str) -> tuple[dict[str, Any] | None, int]:
        """(the JSON object at ``key``, its modify index); (None, 0) when absent."""

        def read() -> tuple[dict[str, Any] | None, int]:
            entry = self.store.get(key)
            if entry is None:
                return None, 0
            value, _reason = decode_json_object(key, entry.value)
            return value, entry.mod_index

        return await self._call(what, read, write=False)

    async def _swap(self, what: str, key: str, value: dict[str, Any], index: int) -> bool:
        """Write ``key`` = value if its modify index is still ``index`` (0: only if absent)."""

        def swap() -> bool:
            entry = self.store.get(key)
            if (entry.mod_index if entry is not None else 0) != index:
                return False
            self.store.put(key, _dumps(value))
            return True

        return await self._call(what, swap, write=True)

    # -- the cluster's timeline counter ---------------------------------------------------------
    async def read_timeline(self) -> TimelineCounter:
        key = self.key("timeline")

        def read() -> TimelineCounter:
            entry = self.store.get(key)
            if entry is None:
                return TimelineCounter()
            return TimelineCounter(decode_timeline(entry.value) or 0, entry.mod_index)

        return await self._call("read_timeline", read, write=False)

    async def put_timeline(self, value: int, index: int) -> bool:
        key = self.key("timeline")

        def put() -> bool:
            entry = self.store.get(key)
            if (entry.mod_index if entry is not None else 0) != index:
                return False
            self.store.put(key, str(value).encode())
            self.store.record("timeline", "claimed", f"{self.member} tli={value}")
            return True

        return await self._call("put_timeline", put, write=True)

    # -- reading -------------------------------------------------------------------------------
    def _snapshot(self) -> tuple[dict[str, tuple[bytes, int]], int]:
        cache = {key: (value, mod) for key, value, mod, _held in self.store.entries(self.base)}
        return cache, self.store.index

    def _view(self, cache: dict[str, tuple[bytes, int]], index: int) -> ClusterView:
        """build_view's result, with the JSON values (members, config, switchover, sync)
        decoded once per distinct value (for all clients of the store): every change delivered
        to every watcher yields a view of all of them, and decoding them all each time was most
        of a simulated cluster's cost. Each view still gets its own dicts (shallow copies), as
        from a real adapter."""
        prefix = self.base + "members/"
        rows: list[tuple[str, bytes, int, bool]] = []
        members: dict[str, dict[str, Any]] = {}
        objects: dict[str, Any] = {}  # config, switchover, sync: a dict or None
        malformed: list[tuple[str, str]] = []
        decoded = self.store.decoded
        for key, (value, mod) in sorted(cache.items()):
            member = key.startswith(prefix)
            rel = key[len(self.base) :]
            if not member and rel not in JSON_OBJECT_KEYS:
                rows.append((key, value, mod, True))
                continue
            memo = decoded.get(key)
            if memo is None or memo[0] != value:
                memo = (value, *decode_json_object(key, value))
                decoded[key] = memo
            _value, obj, reason = memo
            if reason is not None:
                malformed.append((key, reason))
            elif not member:
                objects[rel] = dict(obj) if obj is not None else None
            else:
                name = key[len(prefix) :]
                if name and "/" not in name and obj is not None:
                    members[name] = dict(obj)
        view = build_view(self.base, rows, index)
        if not members and not objects and not malformed:
            return view
        return dataclasses.replace(
            view,
            members=members,
            malformed=tuple(sorted((*view.malformed, *malformed))),
            **objects,
        )

    async def read_cluster(self) -> ClusterView:
        cache, index = await self._call("read_cluster", self._snapshot, write=False)
        return self._view(cache, index)

    async def watch(self) -> AsyncIterator[ClusterView]:
        """See DCS.watch: the current view, then one after each delivered batch of changes; after
        a broken stream, reconnects (backoff 0.1 s doubling to 2 s) and resumes from the last
        index seen, the missed changes arriving as one batch. Ends once close() was called."""
        cache: dict[str, tuple[bytes, int]] = {}
        read = False
        index = 0
        backoff = WATCH_BACKOFF_START
        while not self._closed:
            stream: _Stream | None = None
            try:
                if not read:
                    cache, index = await self._call("watch read", self._snapshot, write=False)
                    read = True
                    yield self._view(cache, index)
                after = index

                def open_stream() -> tuple[_Stream, list[Change]]:
                    return self.store.open_stream(self, after)  # noqa: B023 (called at once)

                opened, missed = await self._call(
                    "watch",
                    open_stream,
                    write=False,
                    undo=lambda result: self.store._close_stream(result[0]),
                )
                stream = opened
                self._streams.append(opened)
                backoff = WATCH_BACKOFF_START
                if missed:
                    index = _apply(cache, missed, index)
                    yield self._view(cache, index)
                while True:
                    change = await opened.queue.get()
                    batch: list[Change] = []
                    while change is not None:
                        batch.append(change)
                        if opened.queue.empty():
                            break
                        change = opened.queue.get_nowait()
                    if batch:
                        index = _apply(cache, batch, index)
                        yield self._view(cache, index)
                    if change is None:
                        break  # the stream broke: reconnect
            except DCSError:
                pass
            finally:
                if stream is not None:
                    self.store._close_stream(stream)
                    if stream in self._streams:
                        self._streams.remove(stream)
            if self._closed:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, WATCH_BACKOFF_CAP)

    # -- test hooks (the DCS contract suite's; every backend implements them) ------------------
    async def _drop_watch_connection(self) -> None:
        """Break every running watch stream of this client, as a network failure would."""
        for stream in list(self._streams):
            self.store._close_stream(stream)

    async def _put_raw(self, key: str, value: bytes) -> None:
        await self._put_unbound("put_raw", key, value)

    async def _delete_prefix(self) -> None:
        def delete_all() -> None:
            for key in sorted(k for k in self.store.data if k.startswith(self.base)):
                self.store.delete(key)

        await self._call("delete_prefix", delete_all, write=True)


def _apply(cache: dict[str, tuple[bytes, int]], changes: list[Change], index: int) -> int:
    for change in changes:
        if change.value is None:
            cache.pop(change.key, None)
        else:
            cache[change.key] = (change.value, change.mod_index)
        index = max(index, change.index)
    return index


def _retrieved(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _abandon(fut: asyncio.Future[T], undo: Callable[[T], None] | None) -> None:
    """An answer nobody waits for any more: retrieved (no "never retrieved" noise), and what it
    opened on the store undone."""
    if fut.cancelled() or fut.exception() is not None:
        return
    if undo is not None:
        undo(fut.result())
