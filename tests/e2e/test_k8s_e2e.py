"""Kubernetes end to end: real agents, PostgreSQL and etcd, and the fake API server
(tests/support/k8s_fake.py) standing in for the kube-apiserver. The role labels follow every transition
of a failover; deleting the master's pod starts the hand-off before any SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import Iterator

import pytest

from tests.support.clusterutil import local_cluster, new_master, wait_for
from tests.support.k8s_fake import FakeKubeApi

pytestmark = pytest.mark.integration

TTL = 5.0
SELECTOR = "app=pgsidecar"


@contextlib.contextmanager
def fake_api_thread() -> Iterator[FakeKubeApi]:
    loop = asyncio.new_event_loop()
    api = FakeKubeApi(namespace="pgs")
    thread = threading.Thread(target=loop.run_forever, name="k8s-fake", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(api.start(), loop).result(10)
        api._loop = loop  # type: ignore[attr-defined]
        yield api
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(api.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def call(api: FakeKubeApi, fn, *args, **kw):  # type: ignore[no-untyped-def]
    """Run a FakeKubeApi helper on its own loop (it notifies watchers there)."""

    async def go():  # type: ignore[no-untyped-def]
        return fn(*args, **kw)

    return asyncio.run_coroutine_threadsafe(go(), api._loop).result(10)  # type: ignore[attr-defined]


def role_labels(api: FakeKubeApi) -> dict[str, str | None]:
    return {
        name: (pod["metadata"].get("labels") or {}).get("role")
        for name, pod in list(api.pods.items())
    }


@contextlib.contextmanager
def k8s_cluster(tmp_token_dir: str) -> Iterator[tuple[object, FakeKubeApi]]:
    with fake_api_thread() as api:
        token = os.path.join(tmp_token_dir, "token")
        with open(token, "w") as fh:
            fh.write(api.token or "")
        for n in ("pg1", "pg2", "pg3"):
            call(api, api.add_pod, n, {"app": "pgsidecar", "pgsidecar.io/member": n}, ready=True)
        extra = {
            "kubernetes.enabled": True,
            "kubernetes.namespace": "pgs",
            "kubernetes.pod_name": "{name}",
            "kubernetes.label_selector": SELECTOR,
            "kubernetes.api_url": api.url,
            "kubernetes.token_file": token,
        }
        with local_cluster(ttl=TTL, extra=extra) as lc:
            yield lc, api
        # the fake enforces deploy/kubernetes' Role: the real agents' calls were all granted
        refused = [(r.method, r.path) for r in api.denied()]
        assert refused == [], f"the Role refused calls the agents made: {refused}"


def test_labels_follow_the_lease_through_a_failover(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with k8s_cluster(str(tmp_path)) as (lc, api):
        master = lc.master()  # type: ignore[attr-defined]
        wait_for(
            lambda: (
                role_labels(api)
                == {n: ("master" if n == master else "replica") for n in ("pg1", "pg2", "pg3")}
            ),
            20,
            what="role labels on every pod",
        )
        lc.stop_member(master)  # type: ignore[attr-defined]
        new = wait_for(lambda: new_master(lc, master), TTL * 2, what="a new master")
        wait_for(
            lambda: (
                role_labels(api).get(new) == "master"
                and [n for n, r in role_labels(api).items() if r == "master"] == [new]
            ),
            20,
            what="exactly the new master labelled master",
        )


def test_deleting_the_master_pod_hands_off_before_sigterm(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with k8s_cluster(str(tmp_path)) as (lc, api):
        master = lc.master()  # type: ignore[attr-defined]
        pid = lc.agent_pid(master)  # type: ignore[attr-defined]
        assert pid is not None, "the master's agent runs before its pod is deleted"
        assert lc.postmaster_pid(master) is not None  # type: ignore[attr-defined]
        call(api, api.delete_pod, master, graceful=True)  # deletionTimestamp set, no signal sent
        new = wait_for(
            lambda: new_master(lc, master), TTL * 2, what="a new master after pod deletion"
        )
        assert new != master
        # the agent handed off and exited by itself: nobody sent it a signal
        wait_for(lambda: lc.agent_pid(master) is None, 30, what="the deleted pod's agent exits")  # type: ignore[attr-defined]
        journal = lc.member(master).dir / "journal.jsonl"  # type: ignore[attr-defined]
        recs = [json.loads(x) for x in journal.read_text().splitlines() if x.strip()]
        pod_inputs = [
            r
            for r in recs
            if r["kind"] == "input"
            and r["body"]["type"] == "pod"
            and r["body"]["data"].get("deleting")
        ]
        shutdown = [
            r for r in recs if r["kind"] == "transition" and r["body"]["trigger"] == "shutdown"
        ]
        assert pod_inputs and shutdown and pod_inputs[0]["seq"] < shutdown[0]["seq"]
        assert not any(r["kind"] == "input" and r["body"]["type"] == "stop" for r in recs), (
            "no SIGTERM was needed"
        )
        # observed, not assumed: the very process that ran as master exited by itself, cleanly,
        # and its PostgreSQL is stopped (handed off, not left running beside the new master)
        proc = lc._children.get(master)  # type: ignore[attr-defined]
        assert proc is not None and proc.pid == pid
        assert proc.wait(timeout=10) == 0, f"the agent exited with {proc.returncode}"
        assert lc.postmaster_pid(master) is None, "the deleted pod's PostgreSQL still runs"  # type: ignore[attr-defined]
