"""etcd-specific behaviour of EtcdDCS, against a real etcd (see tests/support/fixtures_etcd.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from events.dcs.base import AuthError, DCSError, SessionLost
from events.dcs.etcd import EtcdDCS
from events.dcs.factory import create_dcs
from pgsidecar.config import DcsSettings, EtcdSettings
from pgsidecar.procutil import free_port
from tests.support.fixtures_etcd import EtcdCluster, EtcdServer, running_etcd, running_etcd_cluster

PASSWORD = "s3cr3t-Pa55"


@pytest.fixture
async def blackhole() -> AsyncIterator[str]:
    """An endpoint that accepts connections and never answers (a hung server)."""
    conns: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(writer)
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    for w in conns:
        w.close()
    server.close()
    await server.wait_closed()


def test_factory_builds_the_etcd_backend() -> None:
    d = create_dcs(DcsSettings(type="etcd", prefix="/custom/"), cluster="main")
    assert isinstance(d, EtcdDCS)
    assert d.key("leader") == "custom/main/leader"


async def test_lease_ttl_is_rounded_up_to_whole_seconds_and_at_least_two(
    etcd_dcs_factory: Any,
) -> None:
    d = etcd_dcs_factory()
    await d.open_session(0.5)
    assert d.session_ttl == 2
    e = etcd_dcs_factory()
    await e.open_session(2.2)
    assert e.session_ttl == 3
    # the request bound follows the TTL: a third of it, at most 2 s
    assert d.timeout == pytest.approx(2 / 3)
    await e.renew_session()
    assert e.session_ttl == 3


async def test_writes_with_a_lost_lease_raise_session_lost(etcd_dcs_factory: Any) -> None:
    d = etcd_dcs_factory("c1")
    await d.open_session(2)
    lease_keeper = etcd_dcs_factory("c1")  # revokes d's lease behind its back
    lease_keeper._lease = d._lease
    await lease_keeper.close_session()
    with pytest.raises(SessionLost):
        await d.acquire_leader("a")
    with pytest.raises(SessionLost):
        await d.put_member("a", {"instance_id": "x"})
    with pytest.raises(SessionLost):
        await d.register_member("a", {"instance_id": "x"})
    with pytest.raises(SessionLost):
        await d.renew_session()


async def test_acquire_without_a_session_is_refused(etcd_dcs_factory: Any) -> None:
    d = etcd_dcs_factory()
    with pytest.raises(SessionLost):
        await d.acquire_leader("a")


async def test_watch_resumes_across_an_etcd_restart(
    etcd_dcs_factory: Any, etcd_server: EtcdServer, watchers: Any
) -> None:
    d = etcd_dcs_factory("c1")
    writer = etcd_dcs_factory("c1")
    await writer.open_session(10)
    leader = await writer.acquire_leader("w")
    assert leader is not None
    w = watchers(d)
    await w.wait_for(lambda v: v.leader == leader, 1.0)

    etcd_server.stop()
    # while etcd is down every request fails within its bound, and the watch yields nothing
    views_before = len(w.views)
    t0 = time.monotonic()
    with pytest.raises(DCSError):
        await writer.read_cluster()
    assert time.monotonic() - t0 < 2 * writer.timeout + 0.5
    await asyncio.sleep(0.5)
    assert len(w.views) == views_before

    etcd_server.start()
    # the lease survived the restart (etcd persists leases) and the client reconnects by itself
    await writer.renew_session()
    await writer.put_config({"after": "restart"})
    await w.wait_for(lambda v: v.config == {"after": "restart"} and v.leader == leader, 3.0)
    # the watch resumed from its revision: no second full read was needed
    assert d.watch_stats["full_reads"] == 1
    assert d.watch_stats["streams"] >= 2


async def test_dropped_watch_resumes_from_its_revision(
    etcd_dcs_factory: Any, watchers: Any
) -> None:
    d = etcd_dcs_factory("c1")
    writer = etcd_dcs_factory("c1")
    w = watchers(d)
    await w.wait_for(lambda v: True, 1.0)
    await writer.put_config({"i": -1})  # seen after the first view: the stream is open now
    await w.wait_for(lambda v: v.config == {"i": -1}, 1.0)
    for i in range(3):
        await d._drop_watch_connection()
        await writer.put_config({"i": i})
        await w.wait_for(lambda v, i=i: v.config == {"i": i}, 3.0)
    # every drop re-opened a stream from the last revision; none needed a full re-read
    assert d.watch_stats["streams"] >= 4
    assert d.watch_stats["full_reads"] == 1


async def test_watch_after_compaction_rereads_everything(etcd_dcs_factory: Any) -> None:
    d = etcd_dcs_factory("c1")
    writer = etcd_dcs_factory("c1")
    gen = d.watch()
    try:
        first = await asyncio.wait_for(anext(gen), 2)
        assert first.config is None
        # the generator is parked before it opens its stream; meanwhile the history it would
        # resume from is compacted away
        for i in range(5):
            await writer.put_config({"i": i})
        await writer.open_session(5)
        await writer.put_member("m", {"instance_id": "im"})
        head = (await writer.read_cluster()).index
        await writer._post("/v3/kv/compaction", {"revision": str(head)}, idempotent=False)

        view = await asyncio.wait_for(anext(gen), 3)
        assert view.config == {"i": 4} and "m" in view.members
        assert d.watch_stats["full_reads"] == 2
    finally:
        await gen.aclose()


async def test_idle_watch_is_reopened_without_spurious_views(
    etcd_dcs_factory: Any, etcd_server: EtcdServer, watchers: Any
) -> None:
    d = etcd_dcs_factory("c1", watch_idle_timeout=0.3)
    writer = etcd_dcs_factory("c1")
    baseline = etcd_server.metric("etcd_debugging_mvcc_watcher_total")
    w = watchers(d)
    await w.wait_for(lambda v: True, 1.0)
    await asyncio.sleep(1.5)
    assert len(w.views) == 1  # re-opening an idle watch is not a change
    assert d.watch_stats["streams"] >= 3
    assert d.watch_stats["full_reads"] == 1
    await writer.put_config({"k": 1})
    await w.wait_for(lambda v: v.config == {"k": 1}, 1.0)
    # re-opened watches do not pile up on the server
    if baseline is not None:
        now = etcd_server.metric("etcd_debugging_mvcc_watcher_total")
        assert now is not None and now <= baseline + 1


async def test_a_silent_watch_stays_open_while_its_endpoint_answers(
    etcd_dcs_factory: Any, watchers: Any
) -> None:
    # re-opening costs etcd a call per member and idle period: while the member the watch is on
    # answers our other requests (the session renewals), the watch is alive; after
    # WATCH_SILENCE_CAP idle timeouts it is re-opened whatever (a connection a middlebox dropped)
    d = etcd_dcs_factory("c1", watch_idle_timeout=0.4)
    await d.open_session(5)
    w = watchers(d)
    await w.wait_for(lambda v: True, 1.0)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.2:  # three idle timeouts, below the cap of four
        await d.renew_session()
        await asyncio.sleep(0.1)
    assert d.watch_stats["streams"] == 1, "not re-opened while its endpoint answers"
    while time.monotonic() - t0 < 2.0:  # past the cap
        await d.renew_session()
        await asyncio.sleep(0.1)
    assert d.watch_stats["streams"] >= 2, "re-opened after WATCH_SILENCE_CAP idle timeouts"
    streams = d.watch_stats["streams"]
    await asyncio.sleep(0.4 + 0.3)  # no request answered: one idle timeout, one slice
    assert d.watch_stats["streams"] > streams, "silent and nothing answered: re-opened"
    assert len(w.views) == 1, "re-opening is not a change"


async def test_requests_fail_over_to_the_next_endpoint(
    etcd_server: EtcdServer, watchers: Any
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    d = EtcdDCS(
        EtcdSettings(endpoints=[dead, etcd_server.endpoint]), cluster="failover", prefix="t-fo"
    )
    other = EtcdDCS(
        EtcdSettings(endpoints=[etcd_server.endpoint]), cluster="failover", prefix="t-fo"
    )
    try:
        await d.connect()
        await d.open_session(2)
        leader = await d.acquire_leader("a")
        assert leader is not None
        w = watchers(d)
        await w.wait_for(lambda v: v.leader == leader, 1.0)
        await other.put_config({"seen": True})
        await w.wait_for(lambda v: v.config == {"seen": True}, 1.0)
        assert await d.release_leader("a", leader.term)
    finally:
        await d.close_session()
        await other._delete_prefix()
        await d.close()
        await other.close()


async def test_every_request_is_bounded_in_time(blackhole: str, watchers: Any) -> None:
    d = EtcdDCS(EtcdSettings(endpoints=[blackhole]), cluster="c", request_timeout=0.3)
    try:
        for call in (d.connect(), d.read_cluster(), d.open_session(2), d.put_config({"a": 1})):
            t0 = time.monotonic()
            with pytest.raises(DCSError):
                await call
            # idempotent calls get a second try on the only endpoint
            assert time.monotonic() - t0 < 2 * 0.3 + 0.4
        # the watch neither raises nor yields while the store does not answer
        w = watchers(d)
        await asyncio.sleep(1.0)
        assert w.views == [] and not w.task.done()
    finally:
        await d.close()


async def test_all_endpoints_down_is_a_dcs_error() -> None:
    d = EtcdDCS(
        EtcdSettings(
            endpoints=[f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
        ),
        cluster="c",
    )
    try:
        with pytest.raises(DCSError, match="no endpoint answered"):
            await d.read_cluster()
    finally:
        await d.close()


async def test_close_ends_a_running_watch(etcd_dcs_factory: Any) -> None:
    d = etcd_dcs_factory()
    gen = d.watch()
    await asyncio.wait_for(anext(gen), 2)
    nxt = asyncio.ensure_future(anext(gen))
    await asyncio.sleep(0.1)
    await d.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(nxt, 3)


# -- authentication -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def etcd_with_auth() -> Iterator[EtcdServer]:
    """A second etcd with auth enabled: user 'agent' may read/write the 'pgauth/' prefix only."""
    with running_etcd() as server:
        server.etcdctl("user", "add", "root:rootpw", "--interactive=false")
        server.etcdctl("user", "add", f"agent:{PASSWORD}", "--interactive=false")
        server.etcdctl("role", "add", "pgs")
        server.etcdctl("role", "grant-permission", "pgs", "readwrite", "--prefix=true", "pgauth/")
        server.etcdctl("user", "grant-role", "agent", "pgs")
        server.etcdctl("auth", "enable")
        yield server


def _auth_dcs(server: EtcdServer, password: str | None, prefix: str = "pgauth") -> EtcdDCS:
    settings = EtcdSettings(
        endpoints=[server.endpoint],
        username="agent" if password is not None else None,
        password=SecretStr(password) if password is not None else None,
        # this etcd listens on http:// (TLS with auth: tests/contract/test_etcd_tls.py)
        allow_plaintext_credentials=True,
    )
    return EtcdDCS(settings, cluster="c1", prefix=prefix)


async def test_auth_with_the_right_password_works(
    etcd_with_auth: EtcdServer, watchers: Any
) -> None:
    d = _auth_dcs(etcd_with_auth, PASSWORD)
    e = _auth_dcs(etcd_with_auth, PASSWORD)
    w = watchers(e)
    try:
        await d.connect()
        await d.open_session(2)
        await d.register_member("a", {"instance_id": "ia"})
        await w.wait_for(lambda v: "a" in v.members, 1.0)
        leader = await d.acquire_leader("a")
        await w.wait_for(lambda v: v.leader == leader, 1.0)
        # an expired/invalidated token is replaced transparently
        d._token = "bogus.1"
        await d.renew_session()
        assert (await d.read_cluster()).leader == leader
    finally:
        await w.stop()
        await d.close_session()
        await d._delete_prefix()
        await d.close()
        await e.close()


@pytest.mark.parametrize(
    ("password", "prefix", "what"),
    [("wrong-" + PASSWORD, "pgauth", "wrong password"), (PASSWORD, "other", "no permission")],
)
async def test_auth_failures_raise_auth_error_without_the_password(
    etcd_with_auth: EtcdServer, password: str, prefix: str, what: str
) -> None:
    d = _auth_dcs(etcd_with_auth, password, prefix)
    try:
        with pytest.raises(AuthError) as info:
            await d.connect()
        message = str(info.value)
        assert PASSWORD not in message and "username" in message, (what, message)
        assert PASSWORD not in repr(d)
    finally:
        await d.close()


async def test_no_credentials_against_an_auth_enabled_etcd(etcd_with_auth: EtcdServer) -> None:
    d = _auth_dcs(etcd_with_auth, None)
    try:
        with pytest.raises(AuthError):
            await d.connect()
    finally:
        await d.close()


# -- a three-member cluster -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def etcd_cluster() -> Iterator[EtcdCluster]:
    with running_etcd_cluster(3) as cluster:
        yield cluster


@pytest.fixture
async def cluster_dcs(etcd_cluster: EtcdCluster) -> AsyncIterator[Any]:
    """``make(endpoints, **kwargs) -> EtcdDCS`` on the three-member cluster; cleaned up after."""
    made: list[EtcdDCS] = []
    prefix = f"t-cl-{time.monotonic_ns()}"

    def make(endpoints: list[str], **kwargs: Any) -> EtcdDCS:
        d = EtcdDCS(EtcdSettings(endpoints=endpoints), cluster="c1", prefix=prefix, **kwargs)
        made.append(d)
        return d

    yield make
    for m in etcd_cluster.members:  # a test that failed half-way leaves members down/paused
        if m.proc is None:
            m.start()
        else:
            m.resume()
    for d in made:
        with contextlib.suppress(Exception):
            await d.close_session()
    cleaner = make(etcd_cluster.endpoints)
    with contextlib.suppress(Exception):
        await cleaner._delete_prefix()
    for d in made:
        await d.close()


async def test_member_that_lost_its_leader_fails_fast_and_ends_the_watch(
    etcd_cluster: EtcdCluster, cluster_dcs: Any, watchers: Any
) -> None:
    a, b, c = etcd_cluster.members
    d = cluster_dcs([a.endpoint])  # only the member that will be cut off
    writer = cluster_dcs([b.endpoint])
    w = watchers(d)
    await w.wait_for(lambda v: True, 2.0)
    await writer.put_config({"phase": 1})
    await w.wait_for(lambda v: v.config == {"phase": 1}, 1.0)
    streams = d.watch_stats["streams"]

    b.stop()
    c.stop()
    # "a" is alone: etcd ends our watch stream (we asked for hasleader) instead of leaving it
    # open and silent, and refuses requests with "no leader" at once rather than after a timeout
    deadline = time.monotonic() + 10
    # a counter has no event to wait on: poll it, bounded
    while d.watch_stats["streams"] == streams and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    assert d.watch_stats["streams"] > streams, "the watch on a leaderless member stayed open"
    t0 = time.monotonic()
    with pytest.raises(DCSError, match="no leader"):
        await d.read_cluster()
    assert time.monotonic() - t0 < 1.0

    b.start()  # quorum again (a, b)
    await writer.put_config({"phase": 2})
    await w.wait_for(lambda v: v.config == {"phase": 2}, 3.0)
    c.start()


async def test_requests_and_watch_move_away_from_a_hung_member(
    etcd_cluster: EtcdCluster, cluster_dcs: Any, watchers: Any
) -> None:
    # the member to hang is a follower: the others keep their leader and answer at once
    a = etcd_cluster.followers()[0]
    b, c = (m for m in etcd_cluster.members if m is not a)
    d = cluster_dcs([a.endpoint, b.endpoint, c.endpoint], watch_idle_timeout=1.0)
    writer = cluster_dcs([b.endpoint])
    await d.open_session(3)
    w = watchers(d)
    await w.wait_for(lambda v: True, 2.0)
    await writer.put_config({"phase": 1})
    await w.wait_for(lambda v: v.config == {"phase": 1}, 1.0)

    a.pause()  # d talks to "a" first; it now accepts connections and answers nothing
    try:
        t0 = time.monotonic()
        await d.renew_session()  # idempotent: retried on "b" after one timeout
        assert time.monotonic() - t0 < 2 * d.timeout + 0.5
        assert await d.acquire_leader("x") is not None  # now sent to "b" first
        await writer.put_config({"phase": 2})
        # the silent watch on "a" is noticed after watch_idle_timeout and re-opened on "b"
        await w.wait_for(lambda v: v.config == {"phase": 2}, 1.0 + 3.0)
    finally:
        a.resume()


async def test_a_request_that_leaves_a_hung_member_takes_the_watch_with_it(
    etcd_cluster: EtcdCluster, cluster_dcs: Any, watchers: Any
) -> None:
    """With the default idle timeout (15 s), a watch on a member that hangs is not left there
    until the timeout notices the silence: once a request gives up on that member and moves to
    another, the watch is re-opened on the other from its last revision (nothing missed). A
    switchover command would otherwise reach a master 15 s late."""
    a = etcd_cluster.followers()[0]
    b, c = (m for m in etcd_cluster.members if m is not a)
    d = cluster_dcs([a.endpoint, b.endpoint, c.endpoint])
    writer = cluster_dcs([b.endpoint])
    await d.open_session(3)
    w = watchers(d)
    await w.wait_for(lambda v: True, 2.0)
    await writer.put_config({"phase": 1})
    await w.wait_for(lambda v: v.config == {"phase": 1}, 1.0)
    streams = d.watch_stats["streams"]

    a.pause()
    try:
        await writer.put_config({"phase": 2})  # while the watch still hangs on "a"
        await d.renew_session()  # times out on "a", answered by "b"
        t0 = time.monotonic()
        await w.wait_for(lambda v: v.config == {"phase": 2}, 3.0)
        assert time.monotonic() - t0 < 3.0
        assert d.watch_stats["streams"] > streams
        assert d.watch_stats["full_reads"] == 1  # resumed from its revision, not re-read
    finally:
        a.resume()


async def test_a_renewal_given_up_by_its_caller_moves_the_next_one_off_a_hung_member(
    etcd_cluster: EtcdCluster, cluster_dcs: Any
) -> None:
    """The master renews every ttl/4 and bounds each renewal by that cadence, shorter than
    the client's per-try timeout (ttl/3): the caller's own timeout cancels the request before
    the client moves to the next endpoint by itself. Found by the partition-dcs-member fault
    (TTL 5, one of three etcd members frozen): every renewal went back to the frozen member
    until the master fenced. The next request must start on another member."""
    a = etcd_cluster.followers()[0]
    b, c = (m for m in etcd_cluster.members if m is not a)
    d = cluster_dcs([a.endpoint, b.endpoint, c.endpoint])
    await d.open_session(5)
    assert d.timeout > 1.0  # ttl/3: longer than the caller's bound below
    a.pause()
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(d.renew_session(), timeout=0.5)
        t0 = time.monotonic()
        await asyncio.wait_for(d.renew_session(), timeout=0.9)
        assert time.monotonic() - t0 < 0.9, "the second renewal queued on the frozen member"
    finally:
        a.resume()
