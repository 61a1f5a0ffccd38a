"""`pgsidecar rollout`: the plan (order, refusals) and the run against the fake API server
(tests/support/k8s_fake.py, enforcing deploy/rollout's Role) with members faked in memory: the
order of deletions, the switchover between the replicas and the old master, and the stop at the
first member that does not come back healthy."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgsidecar.rollout import (
    KubeAccess,
    KubeClient,
    PodInfo,
    Rollout,
    RolloutError,
    StatefulSetInfo,
    plan_rollout,
    replica_healthy,
)
from tests.support.k8s_fake import DEPLOY, FakeKubeApi, deploy_role, granted_calls

OLD, NEW = "pg-6b8f", "pg-7c9a"
MATCH = {"app.kubernetes.io/name": "pgsidecar", "app.kubernetes.io/instance": "pg"}


def sts(strategy: str = "OnDelete", update: str | None = NEW) -> StatefulSetInfo:
    return StatefulSetInfo("pg", strategy, update, "app=pg")


def pod(name: str, rev: str | None = OLD, deleting: bool = False) -> PodInfo:
    return PodInfo(name, name, f"uid-{name}", rev, True, deleting)


def steps(plan: Any) -> list[tuple[str, str]]:
    return [(s.action, s.member) for s in plan.steps]


# -- the plan ----------------------------------------------------------------------------------


def test_replicas_first_highest_ordinal_first_then_switchover_then_the_old_master() -> None:
    pods = [pod("pg-0"), pod("pg-1"), pod("pg-2")]
    plan = plan_rollout(sts(), pods, leader="pg-1")
    assert steps(plan) == [
        ("update", "pg-2"),
        ("update", "pg-0"),
        ("switchover", "pg-1"),
        ("update", "pg-1"),
    ]
    assert plan.steps[2].targets == ("pg-2", "pg-0")
    assert plan.steps[3].role == "master"
    text = "\n".join(plan.describe())
    assert "delete pod pg-2" in text and "switch over from pg-1" in text


def test_members_on_the_revision_are_left_alone_and_are_switchover_targets() -> None:
    pods = [pod("pg-0", NEW), pod("pg-1"), pod("pg-2")]
    plan = plan_rollout(sts(), pods, leader="pg-1")
    assert steps(plan) == [("update", "pg-2"), ("switchover", "pg-1"), ("update", "pg-1")]
    assert plan.steps[1].targets == ("pg-0", "pg-2")
    assert plan.up_to_date == ("pg-0",)


def test_an_updated_master_needs_no_switchover() -> None:
    plan = plan_rollout(sts(), [pod("pg-0", NEW), pod("pg-1"), pod("pg-2", NEW)], leader="pg-0")
    assert steps(plan) == [("update", "pg-1")]


def test_nothing_to_do() -> None:
    plan = plan_rollout(sts(), [pod("pg-0", NEW), pod("pg-1", NEW)], leader="pg-0")
    assert plan.steps == ()
    assert "nothing to do" in plan.describe()[0]


def test_members_named_by_label() -> None:
    p = PodInfo.from_pod(
        {
            "metadata": {
                "name": "pg-0",
                "uid": "u",
                "labels": {"pgsidecar.io/member": "alpha", "controller-revision-hash": NEW},
            },
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }
    )
    assert (p.member, p.revision, p.ready, p.deleting) == ("alpha", NEW, True, False)


@pytest.mark.parametrize(
    "info,pods,leader,says",
    [
        (sts("RollingUpdate"), [pod("pg-0")], "pg-0", "updateStrategy RollingUpdate"),
        (sts(update=None), [pod("pg-0")], "pg-0", "no status.updateRevision"),
        (sts(), [pod("pg-0"), pod("pg-1")], None, "no master"),
        (sts(), [pod("pg-0"), pod("pg-1")], "pg-9", "pg-9 is not a pod"),
        (sts(), [pod("pg-0")], "pg-0", "only member"),
        (sts(), [pod("pg-0"), pod("pg-1", deleting=True)], "pg-0", "being deleted already: pg-1"),
    ],
    ids=["rolling-update", "no-revision", "no-master", "master-elsewhere", "single", "deleting"],
)
def test_refusals(
    info: StatefulSetInfo, pods: list[PodInfo], leader: str | None, says: str
) -> None:
    with pytest.raises(RolloutError, match=says):
        plan_rollout(info, pods, leader)


@pytest.mark.parametrize(
    "status,problem",
    [
        (None, "does not answer"),
        ({"role": "replica", "pg_running": True, "streaming": False}, "not streaming"),
        ({"role": "replica", "pg_running": False, "streaming": True}, "not running"),
        ({"role": "candidate", "pg_running": True, "streaming": True}, "role is candidate"),
        ({"role": "replica", "pg_running": True, "streaming": True, "busy": "clone"}, "busy"),
        (
            {"role": "replica", "pg_running": True, "streaming": True, "leader": "pg-2"},
            "follows pg-2",
        ),
    ],
)
def test_a_replica_is_healthy_only_when_streaming_from_the_master(
    status: dict[str, Any] | None, problem: str
) -> None:
    assert problem in (replica_healthy(status, "pg-0") or "")
    ok = {"role": "replica", "pg_running": True, "streaming": True, "leader": "pg-0"}
    assert replica_healthy(ok, "pg-0") is None


# -- the run, against the fake API server ------------------------------------------------------


class FakeMembers:
    """The members as the DCS and their APIs would show them: a member whose pod exists (and is
    not being deleted) is a healthy replica, or the master; ``sick`` ones never come back."""

    def __init__(self, api: FakeKubeApi, leader: str, sick: Sequence[str] = ()) -> None:
        self.api = api
        self.current = leader
        self.sick = set(sick)
        self.log: list[tuple[str, str]] = []
        self.keys_lag = 0  # how many reads of the member keys still show no streaming replica

    def _up(self, member: str) -> bool:
        p = self.api.pods.get(member)
        return p is not None and not p["metadata"].get("deletionTimestamp")

    async def leader(self) -> str | None:
        return self.current

    async def member_status(self, member: str) -> dict[str, Any] | None:
        if not self._up(member):
            return None
        if member in self.sick:
            return {"role": "replica", "pg_running": True, "streaming": False, "busy": None}
        role = "master" if member == self.current else "replica"
        return {
            "role": role,
            "pg_running": True,
            "streaming": role == "replica",
            "leader": self.current,
        }

    async def writable(self, member: str) -> bool:
        return member == self.current and self._up(member)

    async def most_advanced(self, members: Sequence[str]) -> str | None:
        if self.keys_lag > 0:  # member keys not yet rewritten since /status showed streaming
            self.keys_lag -= 1
            return None
        return next((m for m in members if self._up(m) and m not in self.sick), None)

    async def switchover(self, master: str, target: str, within: float) -> str | None:
        self.log.append(("switchover", target))
        self.current = target
        return target


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeApi]:
    fake = FakeKubeApi(namespace="pgs", role=deploy_role(DEPLOY / "rollout"), graceful_delete=False)
    fake.recreate_pods = True
    await fake.start()
    fake.add_statefulset("pg", ["pg-0", "pg-1", "pg-2"], MATCH, revision=OLD)
    fake.set_update_revision("pg", NEW)
    yield fake
    await fake.close()


def kube_for(api: FakeKubeApi, tmp_path: Path) -> KubeClient:
    token = tmp_path / "token"
    token.write_text(api.token or "")
    return KubeClient(KubeAccess(namespace="pgs", api_url=api.url, token_file=str(token)))


def revisions(api: FakeKubeApi) -> dict[str, str]:
    return {n: p["metadata"]["labels"]["controller-revision-hash"] for n, p in api.pods.items()}


def deleted(api: FakeKubeApi) -> list[str]:
    return [path.rsplit("/", 1)[-1] for _, path, _, _ in api.calls("delete")]


async def test_the_switchover_waits_for_the_member_keys_to_show_a_streaming_replica(
    api: FakeKubeApi, tmp_path: Path
) -> None:
    """A replica's /status shows it streaming before its member key in the DCS does (the key is
    rewritten on its next probe): the switchover step waits for the keys, bounded, instead of
    calling the replicas unfit (seen in the end-to-end rollout: stopped right after pg3 came
    back streaming)."""
    members = FakeMembers(api, leader="pg-0")
    members.keys_lag = 3
    kube = kube_for(api, tmp_path)
    rollout = Rollout(
        kube, members, "pg", member_timeout=5, switchover_timeout=5, poll=0.01, say=lambda _: None
    )
    try:
        await rollout.run(await rollout.plan())
    finally:
        await kube.close()
    assert members.log == [("switchover", "pg-2")] and members.keys_lag == 0


async def test_the_switchover_stops_when_no_member_key_ever_shows_a_streaming_replica(
    api: FakeKubeApi, tmp_path: Path
) -> None:
    members = FakeMembers(api, leader="pg-0")
    members.keys_lag = 10**9
    kube = kube_for(api, tmp_path)
    rollout = Rollout(
        kube, members, "pg", member_timeout=5, switchover_timeout=0.3, poll=0.01, say=lambda _: None
    )
    try:
        with pytest.raises(RolloutError, match="running, streaming replica .* after 0.3 s"):
            await rollout.run(await rollout.plan())
    finally:
        await kube.close()
    assert members.log == [] and members.current == "pg-0"


async def test_a_rollout_replaces_replicas_then_switches_over_then_the_old_master(
    api: FakeKubeApi, tmp_path: Path
) -> None:
    members = FakeMembers(api, leader="pg-0")
    kube = kube_for(api, tmp_path)
    said: list[str] = []
    rollout = Rollout(kube, members, "pg", member_timeout=5, poll=0.01, say=said.append)
    try:
        plan = await rollout.plan()
        await rollout.run(plan)
    finally:
        await kube.close()
    assert deleted(api) == ["pg-2", "pg-1", "pg-0"]
    assert members.log == [("switchover", "pg-2")]
    assert members.current == "pg-2"
    assert revisions(api) == {"pg-0": NEW, "pg-1": NEW, "pg-2": NEW}
    assert api.statefulsets["pg"]["status"]["currentRevision"] == NEW
    assert rollout.done == ["pg-2", "pg-1", "pg-0"]
    # the switchover came after both replicas were back, before the old master's pod went
    assert said.index(next(s for s in said if "switch over" in s)) > said.index(
        next(s for s in said if "pg-1 is on revision" in s)
    )
    # every call was granted by deploy/rollout's Role, and the Role grants nothing unused
    assert api.denied() == []
    assert {r.call for r in api.served} == granted_calls(api.role)


async def test_the_rollout_stops_at_the_first_member_that_does_not_come_back_healthy(
    api: FakeKubeApi, tmp_path: Path
) -> None:
    members = FakeMembers(api, leader="pg-0", sick=["pg-1"])
    kube = kube_for(api, tmp_path)
    rollout = Rollout(kube, members, "pg", member_timeout=0.5, poll=0.01, say=lambda _: None)
    try:
        with pytest.raises(RolloutError) as caught:
            await rollout.run(await rollout.plan())
    finally:
        await kube.close()
    message = str(caught.value)
    assert message.startswith("stopped at pg-1:")
    assert "not streaming" in message
    # pg-2 went first and came back; nothing after pg-1 was touched, the master stayed
    assert deleted(api) == ["pg-2", "pg-1"]
    assert members.log == [] and members.current == "pg-0"
    assert revisions(api)["pg-0"] == OLD


async def test_the_rollout_stops_when_a_pod_is_not_recreated(
    api: FakeKubeApi, tmp_path: Path
) -> None:
    api.recreate_pods = False  # no StatefulSet controller (or no room on any node)
    kube = kube_for(api, tmp_path)
    rollout = Rollout(
        kube, FakeMembers(api, "pg-0"), "pg", member_timeout=0.3, poll=0.01, say=lambda _: None
    )
    try:
        with pytest.raises(RolloutError, match="stopped at pg-2: pod pg-2 was not recreated"):
            await rollout.run(await rollout.plan())
    finally:
        await kube.close()
    assert deleted(api) == ["pg-2"]


async def test_a_pod_back_but_not_ready_is_named(api: FakeKubeApi, tmp_path: Path) -> None:
    api.recreate_ready = False
    kube = kube_for(api, tmp_path)
    rollout = Rollout(
        kube, FakeMembers(api, "pg-0"), "pg", member_timeout=0.3, poll=0.01, say=lambda _: None
    )
    try:
        with pytest.raises(RolloutError, match=f"pod pg-2 is on revision {NEW} but not Ready"):
            await rollout.run(await rollout.plan())
    finally:
        await kube.close()


async def test_the_api_server_through_a_kubeconfig(api: FakeKubeApi, tmp_path: Path) -> None:
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
        "users": [{"name": "op", "user": {"token": api.token}}],
        "contexts": [{"name": "ctx", "context": {"cluster": "fake", "user": "op"}}],
        "current-context": "ctx",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    kube = KubeClient(KubeAccess(namespace="pgs", kubeconfig=str(path)))
    try:
        sts_obj = await kube.get_statefulset("pg")
        with pytest.raises(RolloutError, match="404"):
            await kube.get_statefulset("other")
    finally:
        await kube.close()
    info = StatefulSetInfo.from_object(sts_obj)
    assert (info.strategy, info.update_revision) == ("OnDelete", NEW)
    assert info.selector == "app.kubernetes.io/instance=pg,app.kubernetes.io/name=pgsidecar"
