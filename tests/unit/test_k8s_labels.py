"""PodLabeler: the own pod's role label follows every set_role, coalesced, retried."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from events.k8s import KubeApi, PodLabeler, PodWatcher
from tests.support.k8s_fake import (
    CLUSTER_LABELS,
    CapturingLog,
    FakeKubeApi,
    deploy_role,
    role_without,
    settings_for,
    until,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def fake() -> AsyncIterator[FakeKubeApi]:
    f = FakeKubeApi()
    await f.start()
    f.add_pod("pg-0", CLUSTER_LABELS)
    yield f
    await f.close()


class Setup:
    def __init__(self, fake: FakeKubeApi, tmp_path: Path) -> None:
        self.log = CapturingLog()
        self.settings = settings_for(fake, tmp_path)
        self.api = KubeApi(self.settings, environ={})
        self.labeler = PodLabeler(
            self.settings, self.log, api=self.api, backoff_min=0.02, backoff_max=0.1
        )

    async def close(self) -> None:
        await self.labeler.close()
        await self.api.close()


@pytest.fixture
async def setup(fake: FakeKubeApi, tmp_path: Path) -> AsyncIterator[Setup]:
    s = Setup(fake, tmp_path)
    yield s
    await s.close()


def role_of(fake: FakeKubeApi, pod: str = "pg-0") -> str | None:
    role = fake.pods[pod]["metadata"]["labels"].get("role")
    return None if role is None else str(role)


async def test_labels_follow_each_transition(fake: FakeKubeApi, setup: Setup) -> None:
    lab = setup.labeler
    lab.start()
    for role in ("replica", "master", None, "replica"):
        lab.set_role(role)
        assert await lab.wait_applied(5)
        assert role_of(fake) == role
        assert lab.applied == role
    # other labels are never touched: a merge patch of the role label only
    assert all(fake.pods["pg-0"]["metadata"]["labels"][k] == v for k, v in CLUSTER_LABELS.items())
    patches = fake.calls("patch")
    assert [json.loads(b or "{}") for *_, b in patches] == [
        {"metadata": {"labels": {"role": "replica"}}},
        {"metadata": {"labels": {"role": "master"}}},
        {"metadata": {"labels": {"role": None}}},
        {"metadata": {"labels": {"role": "replica"}}},
    ]
    assert lab.available and lab.patches == 4
    # the same role again costs nothing
    lab.set_role("replica")
    assert await lab.wait_applied(5)
    assert len(fake.calls("patch")) == 4


async def test_only_the_latest_role_is_sent(fake: FakeKubeApi, setup: Setup) -> None:
    lab = setup.labeler
    fake.patch_gate = asyncio.Event()  # the first patch hangs in the API server
    lab.start()
    lab.set_role("master")
    await until(lambda: len(fake.calls("patch")) == 1, what="first patch in flight")
    for role in ("replica", None, "master", None, "replica"):
        lab.set_role(role)
    assert not await lab.wait_applied(0.1)
    fake.patch_gate.set()
    assert await lab.wait_applied(5)
    assert role_of(fake) == "replica"
    # one in flight + the latest one: the intermediate roles were never sent
    assert len(fake.calls("patch")) == 2


async def test_failed_patches_are_retried_with_backoff(fake: FakeKubeApi, setup: Setup) -> None:
    fake.fail_next("patch", 503, 500, 503)
    lab = setup.labeler
    lab.start()
    lab.set_role("master")
    assert await lab.wait_applied(5)
    assert role_of(fake) == "master"
    assert lab.failures == 3 and lab.available
    assert len(setup.log.events("k8s_role_label_failed")) == 1  # once per outage
    assert len(setup.log.events("k8s_role_label_recovered")) == 1


async def test_forbidden_patch_retries_until_allowed(fake: FakeKubeApi, setup: Setup) -> None:
    fake.role = role_without(deploy_role(), "patch", "pods")  # the Role without patch
    lab = setup.labeler
    lab.start()
    lab.set_role("replica")
    await until(lambda: lab.failures >= 2, what="refusals")
    assert not lab.available and "403" in (lab.problem or "")
    fake.role = deploy_role()  # the operator fixes the Role
    assert await lab.wait_applied(5)
    assert role_of(fake) == "replica"


async def test_a_label_left_by_a_previous_life_is_read_not_rewritten(
    fake: FakeKubeApi, setup: Setup
) -> None:
    fake.modify_pod("pg-0", labels={"role": "replica"})
    lab = setup.labeler
    lab.set_role("replica")  # before start: kept and applied when started
    lab.start()
    assert await lab.wait_applied(5)
    assert fake.calls("get") and not fake.calls("patch")
    # a stale label that disagrees with the lease is corrected at start
    lab.set_role(None)
    assert await lab.wait_applied(5)
    assert role_of(fake) is None


async def test_a_label_changed_behind_our_back_is_put_back(fake: FakeKubeApi, setup: Setup) -> None:
    lab = setup.labeler
    watcher = PodWatcher(setup.settings, lab.observe, setup.log, api=setup.api, backoff_min=0.02)
    lab.start()
    watcher.start()
    try:
        lab.set_role("master")
        assert await lab.wait_applied(5)
        await until(
            lambda: watcher.pods.get("pg-0") is not None and watcher.pods["pg-0"].role == "master"
        )
        fake.modify_pod("pg-0", labels={"role": None})  # someone (kubectl label) removed it
        await until(
            lambda: role_of(fake) == "master" and len(fake.calls("patch")) == 2, what="repair"
        )
    finally:
        await watcher.close()
