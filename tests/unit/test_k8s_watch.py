"""PodWatcher against the fake API server: list + watch, exactly-once delivery across dropped
connections, 410 Gone and bookmarks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from events.k8s import KubeApi, PodEvent, PodWatcher, stop_task
from tests.support.k8s_fake import CLUSTER_LABELS, CapturingLog, FakeKubeApi, settings_for, until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def fake() -> AsyncIterator[FakeKubeApi]:
    f = FakeKubeApi()
    await f.start()
    yield f
    await f.close()


class Harness:
    def __init__(self, fake: FakeKubeApi, tmp_path: Path, **settings: object) -> None:
        self.fake = fake
        self.log = CapturingLog()
        self.events: list[PodEvent] = []
        cfg = settings_for(fake, tmp_path, **settings)
        self.api = KubeApi(cfg, environ={})
        self.watcher = PodWatcher(
            cfg, self.events.append, self.log, api=self.api, backoff_min=0.05, backoff_max=0.2
        )

    def seen(self) -> list[tuple[str, str]]:
        return [(e.type, e.pod) for e in self.events]

    async def settle(self) -> None:
        """Wait until the watcher is connected and has caught up with the fake's history."""
        await until(lambda: self.fake.open_watches >= 1, what="an open watch")
        await until(
            lambda: (
                self.watcher.resource_version is not None
                and int(self.watcher.resource_version) >= self._last_relevant_rv()
            ),
            what="watcher caught up",
        )

    def _last_relevant_rv(self) -> int:
        return max((c.rv for c in self.fake.history), default=0)

    async def close(self) -> None:
        await self.watcher.close()
        await self.api.close()


@pytest.fixture
async def harness(fake: FakeKubeApi, tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(fake, tmp_path)
    yield h
    await h.close()


def assert_no_repeats(events: list[PodEvent]) -> None:
    keys = [(e.pod, e.resource_version, e.type) for e in events]
    assert len(keys) == len(set(keys)), f"repeated events: {keys}"


async def test_list_then_watch_delivers_each_change(fake: FakeKubeApi, harness: Harness) -> None:
    fake.add_pod("pg-0", CLUSTER_LABELS, ready=True)
    fake.add_pod("pg-1", {**CLUSTER_LABELS, "pgsidecar.io/member": "alpha"})
    fake.add_pod("other", {"app": "unrelated"})
    harness.watcher.start()
    await until(lambda: len(harness.events) == 2, what="initial list")
    assert harness.watcher.available and harness.watcher.problem is None
    first = {e.pod: e for e in harness.events}
    assert first["pg-0"].own and first["pg-0"].ready and first["pg-0"].member == "pg-0"
    assert first["pg-1"].member == "alpha" and not first["pg-1"].own and not first["pg-1"].ready
    assert {e.type for e in harness.events} == {"ADDED"}

    await harness.settle()
    fake.modify_pod("pg-1", ready=True)
    fake.modify_pod("pg-1", annotations={"noise": "1"})  # nothing the machine sees: suppressed
    fake.modify_pod("pg-0", labels={"role": "master"})
    fake.delete_pod("pg-0")  # graceful: deletionTimestamp first
    fake.finish_deletion("pg-0")
    fake.add_pod("pg-2", CLUSTER_LABELS)
    await until(lambda: len(harness.events) == 7, what="watched changes")
    assert harness.seen()[2:] == [
        ("MODIFIED", "pg-1"),
        ("MODIFIED", "pg-0"),
        ("MODIFIED", "pg-0"),
        ("DELETED", "pg-0"),
        ("ADDED", "pg-2"),
    ]
    role_ev, deleting_ev, deleted_ev = harness.events[3:6]
    assert role_ev.role == "master" and not role_ev.deleting
    assert deleting_ev.deleting and deleting_ev.own
    assert deleted_ev.deleting and deleted_ev.type == "DELETED"
    assert harness.watcher.suppressed == 1
    assert set(harness.watcher.pods) == {"pg-1", "pg-2"}
    # records carry plain JSON
    body = harness.events[4].to_input()
    assert body["type"] == "pod" and body["data"]["event"] == "MODIFIED"
    assert json.loads(json.dumps(body)) == body
    # the watch asks for bookmarks and bounds itself
    (_, _, query, _) = fake.calls("watch")[0]
    assert query["allowWatchBookmarks"] in ("True", "true")
    assert query["timeoutSeconds"] == "60"
    assert harness.watcher.lists == 1


async def test_dropped_connection_loses_and_repeats_nothing(
    fake: FakeKubeApi, harness: Harness
) -> None:
    fake.add_pod("pg-0", CLUSTER_LABELS)
    fake.add_pod("pg-1", CLUSTER_LABELS)
    harness.watcher.start()
    await harness.settle()
    before = len(harness.events)

    # changes made while the connection is down reach the watcher when it resumes
    assert fake.drop_watches() == 1
    fake.modify_pod("pg-1", ready=True)
    fake.modify_pod("pg-1", phase="Failed")
    fake.add_pod("pg-2", CLUSTER_LABELS)
    fake.delete_pod("pg-0", graceful=False)
    await until(lambda: len(harness.events) == before + 4, what="changes after the drop")
    await harness.settle()
    fake.modify_pod("pg-2", ready=True)
    await until(lambda: len(harness.events) == before + 5, what="live change after resume")

    assert harness.seen()[before:] == [
        ("MODIFIED", "pg-1"),
        ("MODIFIED", "pg-1"),
        ("ADDED", "pg-2"),
        ("DELETED", "pg-0"),
        ("MODIFIED", "pg-2"),
    ]
    assert_no_repeats(harness.events)
    assert harness.watcher.lists == 1, "a resume from the last version needs no relist"
    assert fake.watch_connects >= 2
    assert harness.log.events("k8s_watch_dropped")
    assert not harness.log.events("k8s_pod_events_unavailable")


async def test_410_gone_relists_without_loss_or_repeat(fake: FakeKubeApi, harness: Harness) -> None:
    fake.add_pod("pg-0", CLUSTER_LABELS)
    fake.add_pod("pg-1", CLUSTER_LABELS)
    fake.add_pod("pg-2", CLUSTER_LABELS)
    fake.add_pod("pg-3", CLUSTER_LABELS)
    harness.watcher.start()
    await harness.settle()
    old_uid_3 = harness.watcher.pods["pg-3"].uid
    before = len(harness.events)

    fake.drop_watches()
    fake.delete_pod("pg-0", graceful=False)  # its DELETED event will be compacted away
    fake.modify_pod("pg-1", ready=True)
    fake.add_pod("pg-4", CLUSTER_LABELS)
    fake.delete_pod("pg-3", graceful=False)  # and recreated under the same name
    fake.add_pod("pg-3", CLUSTER_LABELS)
    fake.compact()

    await until(lambda: harness.watcher.gone == 1 and harness.watcher.lists == 2, what="relist")
    await harness.settle()
    got = sorted(harness.seen()[before:])
    assert got == sorted(
        [
            ("DELETED", "pg-0"),  # synthesized: the relist no longer has it
            ("MODIFIED", "pg-1"),
            ("DELETED", "pg-3"),  # the old incarnation...
            ("ADDED", "pg-3"),  # ...and the new one
            ("ADDED", "pg-4"),
        ]
    )
    deleted_3 = next(e for e in harness.events[before:] if e.pod == "pg-3" and e.type == "DELETED")
    assert deleted_3.uid == old_uid_3
    assert harness.watcher.pods["pg-3"].uid != old_uid_3
    assert "pg-2" not in {e.pod for e in harness.events[before:]}, "unchanged pods are not repeated"
    assert_no_repeats(harness.events)

    # and the watch goes on after the relist
    fake.modify_pod("pg-2", ready=True)
    await until(lambda: harness.seen()[-1] == ("MODIFIED", "pg-2"), what="live change after relist")


async def test_bookmarks_advance_the_resource_version(fake: FakeKubeApi, harness: Harness) -> None:
    fake.add_pod("pg-0", CLUSTER_LABELS)
    harness.watcher.start()
    await harness.settle()
    # changes outside our selector move the store's version but send us nothing...
    for i in range(5):
        fake.add_pod(f"web-{i}", {"app": "web"})
    assert int(harness.watcher.resource_version or 0) < fake.rv
    # ...until a bookmark says "nothing for you up to here"
    fake.send_bookmarks()
    await until(lambda: harness.watcher.resource_version == str(fake.rv), what="bookmark")
    assert harness.watcher.bookmarks == 1
    # so after a compaction of those foreign changes, a reconnect resumes without a relist
    fake.compact()
    fake.drop_watches()
    fake.modify_pod("pg-0", ready=True)
    await until(lambda: harness.seen()[-1] == ("MODIFIED", "pg-0"), what="change after resume")
    assert harness.watcher.gone == 0 and harness.watcher.lists == 1
    assert [e.type for e in harness.events] == ["ADDED", "MODIFIED"]


async def test_periodic_bookmarks_from_the_server(tmp_path: Path) -> None:
    fake = FakeKubeApi(bookmark_interval=0.05)
    await fake.start()
    h = Harness(fake, tmp_path)
    try:
        fake.add_pod("pg-0", CLUSTER_LABELS)
        h.watcher.start()
        await h.settle()
        fake.add_pod("web-0", {"app": "web"})
        await until(lambda: h.watcher.resource_version == str(fake.rv), what="periodic bookmark")
        assert h.watcher.bookmarks >= 1
    finally:
        await h.close()
        await fake.close()


async def test_repeated_event_from_the_server_is_dropped(
    fake: FakeKubeApi, harness: Harness
) -> None:
    fake.add_pod("pg-0", CLUSTER_LABELS)
    harness.watcher.start()
    await harness.settle()
    fake.modify_pod("pg-0", ready=True)
    rv_ready = fake.rv
    fake.modify_pod("pg-0", ready=False)
    await until(lambda: len(harness.events) == 3, what="two modifications")
    fake.resend(rv_ready)  # a misbehaving server sends an old event again
    fake.modify_pod("pg-0", phase="Succeeded")
    await until(lambda: len(harness.events) == 4, what="the next real change")
    await harness.settle()
    assert [(e.ready, e.phase) for e in harness.events] == [
        (False, "Running"),
        (True, "Running"),
        (False, "Running"),
        (False, "Succeeded"),
    ]
    assert harness.watcher.suppressed >= 1


async def test_server_side_timeout_rewatches_from_last_version(
    fake: FakeKubeApi, tmp_path: Path
) -> None:
    h = Harness(fake, tmp_path, watch_timeout=1.0)
    try:
        fake.add_pod("pg-0", CLUSTER_LABELS)
        h.watcher.start()
        await h.settle()
        await until(lambda: fake.watch_connects >= 2, within=5, what="a second watch after timeout")
        fake.modify_pod("pg-0", ready=True)
        await until(lambda: len(h.events) == 2, what="change on the new watch")
        assert h.watcher.lists == 1 and h.watcher.available
    finally:
        await h.close()


async def test_selector_changes_turn_into_added_and_deleted(
    fake: FakeKubeApi, harness: Harness
) -> None:
    fake.add_pod("pg-0", CLUSTER_LABELS)
    fake.add_pod("stray", {"app": "x"})
    harness.watcher.start()
    await harness.settle()
    fake.modify_pod("stray", labels=CLUSTER_LABELS)  # starts matching
    fake.modify_pod("pg-0", labels={"app.kubernetes.io/instance": "other"})  # stops matching
    await until(lambda: len(harness.events) == 3, what="selector moves")
    assert harness.seen() == [("ADDED", "pg-0"), ("ADDED", "stray"), ("DELETED", "pg-0")]


async def test_a_failing_callback_does_not_stop_the_watch(
    fake: FakeKubeApi, tmp_path: Path
) -> None:
    cfg = settings_for(fake, tmp_path)
    log = CapturingLog()
    got: list[str] = []

    def on_event(ev: PodEvent) -> None:
        got.append(ev.pod)
        if ev.pod == "pg-0":
            raise RuntimeError("boom")

    api = KubeApi(cfg, environ={})
    watcher = PodWatcher(cfg, on_event, log, api=api)
    fake.add_pod("pg-0", CLUSTER_LABELS)
    watcher.start()
    try:
        await until(lambda: fake.open_watches == 1, what="watch")
        fake.add_pod("pg-1", CLUSTER_LABELS)
        await until(lambda: got == ["pg-0", "pg-1"], what="both events")
        assert log.events("k8s_on_event_failed")
        assert not log.events("k8s_watch_error")
    finally:
        await watcher.close()
        await api.close()


async def test_error_event_other_than_410_reconnects(fake: FakeKubeApi, harness: Harness) -> None:
    fake.add_pod("pg-0", CLUSTER_LABELS)
    harness.watcher.start()
    await harness.settle()
    fake.fail_next("watch", 500)
    fake.drop_watches()
    fake.modify_pod("pg-0", ready=True)
    await until(lambda: len(harness.events) == 2, what="event after a failed reconnect")
    assert harness.watcher.available
    # the one failed reconnect was logged as an outage, and its end too
    assert len(harness.log.events("k8s_pod_events_unavailable")) == 1
    assert len(harness.log.events("k8s_pod_events_available")) == 2
    assert_no_repeats(harness.events)


async def test_stop_task_outlasts_a_swallowed_cancellation() -> None:
    # asyncio.wait_for on Python 3.11 can swallow a cancellation; close() must still end
    async def stubborn() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass
        await asyncio.sleep(30)

    task = asyncio.get_running_loop().create_task(stubborn())
    await asyncio.sleep(0)
    started = asyncio.get_running_loop().time()
    await stop_task(task)
    assert task.cancelled()
    assert asyncio.get_running_loop().time() - started < 5
