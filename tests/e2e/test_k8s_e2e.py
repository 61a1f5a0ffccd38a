"""Kubernetes end to end: real agents, PostgreSQL and etcd, and the fake API server
(tests/support/k8s_fake.py) standing in for the kube-apiserver. The role labels follow every transition
of a failover; deleting the master's pod starts the hand-off before any SIGTERM; `pgsidecar
rollout` replaces the pods of an OnDelete StatefulSet, replicas first, and stops at a broken one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from tests.support.clusterutil import local_cluster, new_master, wait_for
from tests.support.k8s_fake import DEPLOY, FakeKubeApi, Rule, deploy_role

pytestmark = pytest.mark.integration

TTL = 5.0
SELECTOR = "app=pgsidecar"


@contextlib.contextmanager
def fake_api_thread(role: list[Rule] | None = None) -> Iterator[FakeKubeApi]:
    loop = asyncio.new_event_loop()
    api = FakeKubeApi(namespace="pgs", role=role)
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


OLD_REVISION, NEW_REVISION = "pg-5d4c3b2a1", "pg-6e5d4c3b2"


class StatefulSetController:
    """The kubelet and the StatefulSet controller for real local members: a pod being deleted
    has its member stopped (SIGTERM, as the kubelet does; the agent may already have handed off
    and exited), then the pod is recreated on the update revision and its member started again,
    unless the member is in ``broken`` (a new image that crash-loops)."""

    def __init__(self, lc: object, api: FakeKubeApi) -> None:
        self.lc, self.api = lc, api
        self.broken: set[str] = set()
        self.deleted: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sts-controller", daemon=True)

    def __enter__(self) -> StatefulSetController:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            doomed = [
                n for n, p in list(self.api.pods.items()) if p["metadata"].get("deletionTimestamp")
            ]
            for name in doomed:
                self.deleted.append(name)
                self.lc.stop_member(name)  # type: ignore[attr-defined]
                call(self.api, self.api.finish_deletion, name)
                call(self.api, self.api.recreate_pod, name, ready=True)
                if name not in self.broken:
                    self.lc.start_member(name)  # type: ignore[attr-defined]


def run_rollout(
    lc: object, api: FakeKubeApi, token: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable, "-m", "pgsidecar", "rollout",
        "--dir", str(lc.dir),  # type: ignore[attr-defined]
        "--namespace", "pgs", "--statefulset", "pg",
        "--api-url", api.url, "--token-file", token,
        "--member-timeout", "60", "--switchover-timeout", "30", "--poll", "0.3", *extra,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


def test_rollout_of_an_ondelete_statefulset_stops_at_a_broken_member_then_completes(
    tmp_path,
) -> None:  # type: ignore[no-untyped-def]
    """`pgsidecar rollout` against the fake API and real members: a member whose new pod never
    comes back healthy stops it there (exit 1, naming it, nothing after it touched); once that
    member is fixed, a second run finishes: the other replica, a switchover, the old master."""
    rules = deploy_role() + deploy_role(DEPLOY / "rollout")  # the agents' Role and the rollout's
    with fake_api_thread(role=rules) as api:
        token = str(tmp_path / "token")
        with open(token, "w") as fh:
            fh.write(api.token or "")
        names = ("pg1", "pg2", "pg3")
        call(
            api,
            api.add_statefulset,
            "pg",
            names,
            {"app": "pgsidecar"},
            revision=OLD_REVISION,
            pod_labels={n: {"pgsidecar.io/member": n} for n in names},
        )
        extra = {
            "kubernetes.enabled": True,
            "kubernetes.namespace": "pgs",
            "kubernetes.pod_name": "{name}",
            "kubernetes.label_selector": SELECTOR,
            "kubernetes.api_url": api.url,
            "kubernetes.token_file": token,
        }
        with local_cluster(ttl=TTL, extra=extra) as lc, StatefulSetController(lc, api) as ctl:
            master = lc.master()
            assert master is not None
            replicas = [n for n in names if n != master]
            call(api, api.set_update_revision, "pg", NEW_REVISION)

            dry = run_rollout(lc, api, token, "--dry-run")
            assert dry.returncode == 0, dry.stderr
            assert f"switch over from {master}" in dry.stdout and ctl.deleted == []

            # the first replica to be replaced crash-loops on the new revision
            first, second = replicas  # no ordinals in these names: by name
            ctl.broken.add(first)
            stopped = run_rollout(lc, api, token, "--member-timeout", "25")
            assert stopped.returncode == 1, stopped.stdout + stopped.stderr
            assert f"rollout: stopped at {first}:" in stopped.stderr
            assert "not back as a healthy replica" in stopped.stderr
            assert ctl.deleted == [first]
            assert lc.master() == master  # no switchover, nothing else deleted

            # fixed: started again on the new revision; a second run does the rest
            ctl.broken.clear()
            lc.start_member(first)
            done = run_rollout(lc, api, token)
            assert done.returncode == 0, done.stdout + done.stderr
            assert ctl.deleted == [first, second, master]
            new = lc.master()
            assert new in replicas and new != master
            revisions = {
                n: p["metadata"]["labels"]["controller-revision-hash"]
                for n, p in list(api.pods.items())
            }
            assert revisions == dict.fromkeys(names, NEW_REVISION)
            # the old master came back as a streaming replica of the new one
            st = lc.api_status(master)
            assert st is not None and st["role"] == "replica" and st["streaming"], st
            assert st["leader"] == new
        refused = [(r.method, r.path) for r in api.denied()]
        assert refused == [], f"the Roles refused calls: {refused}"
