"""PodKiller: every limit of the pure decision, the health tracking, and the deletion against the
fake API (uid precondition, 403 when the Role does not allow delete)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from events.k8s import KubeApi, MemberHealth, PodEvent, PodKiller, PodWatcher, decide_pod_kill
from tests.support.k8s_fake import (
    BASE,
    CLUSTER_LABELS,
    POD_KILLING,
    CapturingLog,
    FakeKubeApi,
    deploy_role,
    settings_for,
    until,
)

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 300.0
INTERVAL = 600.0


def m(name: str, healthy: bool, since: float | None = None, **kw: Any) -> MemberHealth:
    return MemberHealth(
        member=name, healthy=healthy, unhealthy_since=since, pod=kw.pop("pod", name), **kw
    )


def decide(members: list[MemberHealth], **kw: Any) -> Any:
    args: dict[str, Any] = {
        "enabled": True,
        "is_master": True,
        "own_member": "pg-0",
        "own_pod": "pg-0",
        "members": members,
        "unhealthy_timeout": TIMEOUT,
        "interval": INTERVAL,
        "last_kill_at": None,
        "now": 1000.0,
    }
    args.update(kw)
    return decide_pod_kill(**args)


THREE = [m("pg-0", True), m("pg-1", True), m("pg-2", False, since=100.0)]


def test_kills_a_member_unhealthy_longer_than_the_limit() -> None:
    d = decide(THREE)
    assert d.victim is not None and d.victim.pod == "pg-2"
    assert "unhealthy for 900s" in d.reason and "2 of 3" in d.reason


def test_off_by_default_and_only_on_the_master() -> None:
    assert decide(THREE, enabled=False).victim is None
    assert "off" in decide(THREE, enabled=False).reason
    assert decide(THREE, is_master=False).victim is None
    assert "only the master" in decide(THREE, is_master=False).reason


def test_not_before_the_unhealthy_timeout() -> None:
    assert decide(THREE, now=100.0 + TIMEOUT - 1).victim is None
    assert decide(THREE, now=100.0 + TIMEOUT).victim is not None
    # unhealthy but never timed (since unknown) is not a candidate
    assert decide([m("pg-0", True), m("pg-1", True), m("pg-2", False)]).victim is None


def test_at_most_one_deletion_per_interval() -> None:
    d = decide(THREE, last_kill_at=1000.0 - INTERVAL + 1)
    assert d.victim is None and "rate limit" in d.reason
    assert decide(THREE, last_kill_at=1000.0 - INTERVAL).victim is not None


def test_never_below_a_quorum_of_healthy_members() -> None:
    two_sick = [m("pg-0", True), m("pg-1", False, since=1.0), m("pg-2", False, since=1.0)]
    d = decide(two_sick)
    assert d.victim is None and "below a quorum of 2" in d.reason
    five = [
        m("pg-0", True),
        m("pg-1", True),
        m("pg-2", True),
        m("pg-3", False, since=1.0),
        m("pg-4", False, since=2.0),
    ]
    d5 = decide(five)
    assert d5.victim is not None and d5.victim.member == "pg-3", "the longest unhealthy goes first"
    assert decide(five[:1] + five[3:] + [m("pg-1", False, since=5.0)]).victim is None  # 1 of 4


def test_never_its_own_pod() -> None:
    # the master itself unhealthy (as others see it) is not its own victim, by member or pod
    self_sick = [m("pg-0", False, since=1.0), m("pg-1", True), m("pg-2", True)]
    assert decide(self_sick).victim is None
    renamed = [m("alpha", False, since=1.0, pod="pg-0"), m("pg-1", True), m("pg-2", True)]
    assert decide(renamed, own_member="beta").victim is None


def test_skips_pods_already_terminating_and_members_without_pods() -> None:
    assert (
        decide(
            [m("pg-0", True), m("pg-1", True), m("pg-2", False, since=1.0, deleting=True)]
        ).victim
        is None
    )
    assert (
        decide([m("pg-0", True), m("pg-1", True), m("pg-2", False, since=1.0, pod=None)]).victim
        is None
    )


def ev(pod: str, uid: str, type_: str = "ADDED", **kw: Any) -> PodEvent:
    return PodEvent(
        type=type_,  # type: ignore[arg-type]
        pod=pod,
        member=kw.pop("member", pod),
        ready=kw.pop("ready", True),
        deleting=kw.pop("deleting", False),
        phase="Running",
        resource_version="1",
        uid=uid,
        **kw,
    )


def tracker(**settings: Any) -> PodKiller:
    from pgsidecar.config import KubernetesSettings

    cfg = KubernetesSettings(
        enabled=True,
        kill_unhealthy_pods=True,
        unhealthy_pod_timeout=TIMEOUT,
        pod_kill_interval=INTERVAL,
        pod_name="pg-0",
        namespace="x",
        api_url="http://127.0.0.1:9",
        **settings,
    )
    return PodKiller(cfg, CapturingLog(), own_member="pg-0", api=KubeApi(cfg, environ={}))


def test_tracker_times_unhealthiness_and_forgives_recovery() -> None:
    k = tracker()
    for name in ("pg-0", "pg-1", "pg-2"):
        k.observe_pod(ev(name, f"u-{name}"), now=0.0)
    k.observe_health({"pg-0": True, "pg-1": True, "pg-2": False}, now=10.0)
    snap = {h.member: h for h in k.snapshot()}
    assert snap["pg-2"].unhealthy_since == 0.0, "unhealthy since its pod was seen without health"
    assert k.decide(is_master=True, now=TIMEOUT - 1).victim is None
    assert k.decide(is_master=True, now=TIMEOUT).victim is not None
    # recovery resets the clock
    k.observe_health({"pg-0": True, "pg-1": True, "pg-2": True}, now=TIMEOUT)
    k.observe_health({"pg-0": True, "pg-1": True, "pg-2": False}, now=TIMEOUT + 5)
    assert k.decide(is_master=True, now=TIMEOUT + 6).victim is None
    assert k.decide(is_master=True, now=2 * TIMEOUT + 5).victim is not None


def test_a_recreated_pod_gets_a_full_timeout() -> None:
    k = tracker()
    for name in ("pg-0", "pg-1", "pg-2"):
        k.observe_pod(ev(name, f"u-{name}"), now=0.0)
    k.observe_health({"pg-0": True, "pg-1": True}, now=0.0)  # pg-2 publishes nothing
    assert k.decide(is_master=True, now=TIMEOUT).victim is not None
    k.observe_pod(ev("pg-2", "u-new", type_="MODIFIED"), now=TIMEOUT)  # replaced (new uid)
    assert k.decide(is_master=True, now=TIMEOUT + 1).victim is None
    assert k.decide(is_master=True, now=2 * TIMEOUT).victim is not None
    k.observe_pod(ev("pg-2", "u-new", type_="DELETED"), now=2 * TIMEOUT)
    assert "pg-2" not in {h.member for h in k.snapshot()}


# ------------------------------------------------------------------- against the fake API


class Cluster:
    def __init__(self, fake: FakeKubeApi, tmp_path: Path) -> None:
        self.fake = fake
        self.log = CapturingLog()
        self.clock = 0.0
        self.settings = settings_for(
            fake,
            tmp_path,
            kill_unhealthy_pods=True,
            unhealthy_pod_timeout=TIMEOUT,
            pod_kill_interval=INTERVAL,
        )
        self.api = KubeApi(self.settings, environ={})
        self.killer = PodKiller(
            self.settings, self.log, own_member="pg-0", api=self.api, clock=lambda: self.clock
        )
        self.watcher = PodWatcher(self.settings, self.killer.observe_pod, self.log, api=self.api)

    async def close(self) -> None:
        await self.watcher.close()
        await self.killer.close()
        await self.api.close()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    fake = FakeKubeApi(role=deploy_role(POD_KILLING))  # pod killing on: its component's Role
    await fake.start()
    for name in ("pg-0", "pg-1", "pg-2"):
        fake.add_pod(name, CLUSTER_LABELS, ready=True)
    c = Cluster(fake, tmp_path)
    c.watcher.start()
    await until(lambda: len(c.watcher.pods) == 3, what="pods seen")
    yield c
    await c.close()
    await fake.close()


async def test_deletes_the_hopeless_pod_once_per_interval(cluster: Cluster) -> None:
    fake, killer = cluster.fake, cluster.killer
    killer.observe_health({"pg-0": True, "pg-1": True, "pg-2": False}, now=0.0)
    assert await killer.maybe_kill(is_master=True, now=TIMEOUT - 1) is None
    uid = fake.pods["pg-2"]["metadata"]["uid"]
    action = await killer.maybe_kill(is_master=True, now=TIMEOUT)
    assert action is not None
    assert action["name"] == "delete_pod" and action["outcome"] == "ok"
    assert (action["pod"], action["member"], action["uid"]) == ("pg-2", "pg-2", uid)
    assert "unhealthy for 300s" in action["reason"]
    assert fake.pods["pg-2"]["metadata"].get("deletionTimestamp"), (
        "graceful delete: the agent hands off"
    )
    (_, path, _, body) = fake.calls("delete")[0]
    assert path.endswith("/pods/pg-2") and f'"uid": "{uid}"' in (body or "")
    # the StatefulSet brings it back as a new pod, still sick: not before the interval
    cluster.clock = TIMEOUT
    fake.finish_deletion("pg-2")
    fake.add_pod("pg-2", CLUSTER_LABELS)
    await until(
        lambda: (
            cluster.watcher.pods.get("pg-2") is not None and cluster.watcher.pods["pg-2"].uid != uid
        )
    )
    assert {h.member: h.unhealthy_since for h in killer.snapshot()}["pg-2"] == TIMEOUT, (
        "timed afresh"
    )
    killer.observe_health({"pg-0": True, "pg-1": True, "pg-2": False}, now=TIMEOUT + 1)
    assert await killer.maybe_kill(is_master=True, now=TIMEOUT + INTERVAL - 1) is None
    assert "rate limit" in killer.decide(is_master=True, now=TIMEOUT + INTERVAL - 1).reason
    again = await killer.maybe_kill(is_master=True, now=TIMEOUT + INTERVAL)
    assert again is not None and again["outcome"] == "ok"
    assert len(fake.calls("delete")) == 2


async def test_delete_refused_by_the_role_is_a_failed_action_not_a_crash(cluster: Cluster) -> None:
    fake, killer = cluster.fake, cluster.killer
    fake.role = deploy_role(BASE)  # the base Role: the pod-killing component is not applied
    killer.observe_health({"pg-0": True, "pg-1": True, "pg-2": False}, now=0.0)
    action = await killer.maybe_kill(is_master=True, now=TIMEOUT)
    assert action is not None and action["outcome"] == "failed" and action["status"] == 403
    assert "forbidden" in action["error"] and "delete" in action["error"]
    assert "pg-2" in fake.pods and not fake.pods["pg-2"]["metadata"].get("deletionTimestamp")
    # a refusal counts against the rate limit: no hammering
    assert await killer.maybe_kill(is_master=True, now=TIMEOUT + 1) is None
    assert len(fake.calls("delete")) == 1


async def test_a_pod_replaced_meanwhile_is_not_deleted(cluster: Cluster) -> None:
    fake, killer = cluster.fake, cluster.killer
    killer.observe_health({"pg-0": True, "pg-1": True, "pg-2": False}, now=0.0)
    await cluster.watcher.close()  # the killer does not hear of the replacement
    fake.delete_pod("pg-2", graceful=False)
    fake.add_pod("pg-2", CLUSTER_LABELS)
    action = await killer.maybe_kill(is_master=True, now=TIMEOUT)
    assert action is not None and action["outcome"] == "failed" and action["status"] == 409
    assert not fake.pods["pg-2"]["metadata"].get("deletionTimestamp"), "the new pod is untouched"


async def test_replicas_and_minorities_never_delete(cluster: Cluster) -> None:
    killer = cluster.killer
    killer.observe_health({"pg-0": True, "pg-1": False, "pg-2": False}, now=0.0)
    assert await killer.maybe_kill(is_master=True, now=10 * TIMEOUT) is None
    killer.observe_health({"pg-0": True, "pg-1": True, "pg-2": False}, now=0.0)
    assert await killer.maybe_kill(is_master=False, now=10 * TIMEOUT) is None
    assert cluster.fake.calls("delete") == []
