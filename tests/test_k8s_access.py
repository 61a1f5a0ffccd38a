"""Without a usable Kubernetes API the agent runs on, without pod events: says so once, keeps
retrying in the background, never raises into its caller; and it picks the events up as soon as
the API is there."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from events.k8s import Access, KubeApi, PodEvent, PodLabeler, PodWatcher, resolve_access
from pgsidecar.config import KubernetesSettings
from tests.k8s_fake import CLUSTER_LABELS, CapturingLog, FakeKubeApi, settings_for, until

pytestmark = pytest.mark.timeout(60)


def rewrite(path: Path, text: str) -> None:
    before = path.stat().st_mtime_ns
    path.write_text(text)
    later = before + 1_000_000_000  # a different mtime whatever the file system's granularity
    os.utime(path, ns=(later, later))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_in_cluster_access_from_the_service_account(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("tok\n")
    (tmp_path / "ca.crt").write_text("---")
    (tmp_path / "namespace").write_text("db\n")
    env = {
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "KUBERNETES_SERVICE_PORT": "443",
        "HOSTNAME": "pg-1",
    }
    got = resolve_access(KubernetesSettings(enabled=True), env, tmp_path)
    assert got == Access(
        url="https://10.96.0.1:443",
        token_file=tmp_path / "token",
        ca_file=tmp_path / "ca.crt",
        namespace="db",
        pod_name="pg-1",
    )
    # IPv6 service address; explicit settings win over the pod's files
    env6 = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"}
    got6 = resolve_access(KubernetesSettings(namespace="x", pod_name="pg-2"), env6, tmp_path)
    assert isinstance(got6, Access)
    assert (got6.url, got6.namespace, got6.pod_name) == ("https://[fd00::1]:6443", "x", "pg-2")


def test_reasons_when_there_is_no_way_in(tmp_path: Path) -> None:
    not_in_pod = resolve_access(KubernetesSettings(), {}, tmp_path)
    assert isinstance(not_in_pod, str) and "KUBERNETES_SERVICE_HOST" in not_in_pod
    no_token = resolve_access(
        KubernetesSettings(), {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, tmp_path
    )
    assert isinstance(no_token, str) and "no service-account token" in no_token
    (tmp_path / "token").write_text("t")
    no_ns = resolve_access(KubernetesSettings(), {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, tmp_path)
    assert isinstance(no_ns, str) and "namespace" in no_ns


async def test_no_token_runs_without_pod_events_and_says_so_once(tmp_path: Path) -> None:
    log = CapturingLog()
    settings = KubernetesSettings(enabled=True, label_selector="a=b")
    api = KubeApi(settings, environ={}, sa_dir=tmp_path)  # not in a pod: nothing mounted
    watcher = PodWatcher(
        settings, lambda ev: None, log, api=api, backoff_min=0.01, backoff_max=0.02
    )
    labeler = PodLabeler(settings, log, api=api, backoff_min=0.01, backoff_max=0.02)
    watcher.start()  # returns at once, never raises
    labeler.start()
    labeler.set_role("master")
    try:
        await until(
            lambda: watcher.problem != "not started" and labeler.failures > 3, what="retries"
        )
        await asyncio.sleep(0.1)
        assert not watcher.available
        assert watcher.problem is not None and "KUBERNETES_SERVICE_HOST" in watcher.problem
        assert watcher.lists == 0
        assert len(log.events("k8s_pod_events_unavailable")) == 1, "said once, not per retry"
        assert not labeler.available
        assert labeler.problem is not None and "KUBERNETES_SERVICE_HOST" in labeler.problem
        assert len(log.events("k8s_role_label_failed")) == 1
        assert not await labeler.wait_applied(0.05)
    finally:
        await watcher.close()
        await labeler.close()
        await api.close()


async def test_unreachable_api_then_it_comes_up(tmp_path: Path) -> None:
    port = free_port()
    fake = FakeKubeApi()
    log = CapturingLog()
    events: list[PodEvent] = []
    fake.port = port  # settings point at the port before anything listens there
    settings = settings_for(fake, tmp_path)
    api = KubeApi(settings, environ={}, connect_timeout=0.5)
    watcher = PodWatcher(settings, events.append, log, api=api, backoff_min=0.05, backoff_max=0.1)
    watcher.start()
    try:
        await until(lambda: watcher.problem is not None and "unreachable" in watcher.problem)
        assert not watcher.available
        await asyncio.sleep(0.3)  # several retries
        assert len(log.events("k8s_pod_events_unavailable")) == 1
        fake.add_pod("pg-0", CLUSTER_LABELS)
        await fake.start(port)
        await until(lambda: watcher.available and len(events) == 1, what="recovery")
        assert watcher.problem is None
        assert len(log.events("k8s_pod_events_available")) == 1
        # and the API going away again is one more message, not one per retry
        await fake.close()
        await until(lambda: not watcher.available, what="outage noticed")
        await asyncio.sleep(0.3)
        assert len(log.events("k8s_pod_events_unavailable")) == 2
    finally:
        await watcher.close()
        await api.close()
        await fake.close()


async def test_wrong_token_is_401_and_a_rotated_token_is_picked_up(tmp_path: Path) -> None:
    fake = FakeKubeApi(token="right")
    await fake.start()
    log = CapturingLog()
    settings = settings_for(fake, tmp_path)
    token_file: Path = settings.token_file
    rewrite(token_file, "wrong")
    api = KubeApi(settings, environ={})
    watcher = PodWatcher(settings, lambda ev: None, log, api=api, backoff_min=0.05, backoff_max=0.1)
    watcher.start()
    try:
        await until(lambda: watcher.problem is not None and "401" in watcher.problem)
        assert not watcher.available
        # the kubelet rotates the projected token: the file changes, the next call uses it
        rewrite(token_file, "right")
        await until(lambda: watcher.available, what="token picked up")
    finally:
        await watcher.close()
        await api.close()
        await fake.close()


async def test_role_without_watch_is_a_403_and_no_pod_events(tmp_path: Path) -> None:
    fake = FakeKubeApi(allowed={"get", "list", "patch"})
    await fake.start()
    log = CapturingLog()
    settings = settings_for(fake, tmp_path)
    api = KubeApi(settings, environ={})
    watcher = PodWatcher(settings, lambda ev: None, log, api=api, backoff_min=0.05, backoff_max=0.1)
    watcher.start()
    try:
        await until(lambda: watcher.problem is not None and "403" in watcher.problem)
        assert "watch" in watcher.problem  # type: ignore[operator]
        assert not watcher.available
    finally:
        await watcher.close()
        await api.close()
        await fake.close()


async def test_missing_selector_is_reported_not_raised(tmp_path: Path) -> None:
    fake = FakeKubeApi()
    await fake.start()
    log = CapturingLog()
    settings = settings_for(fake, tmp_path, label_selector=None)
    api = KubeApi(settings, environ={})
    watcher = PodWatcher(settings, lambda ev: None, log, api=api, backoff_min=0.05, backoff_max=0.1)
    watcher.start()
    try:
        await until(lambda: watcher.problem is not None and "label_selector" in watcher.problem)
        # with the cluster name the default selector is used
        w2 = PodWatcher(settings, lambda ev: None, log, api=api, cluster="pg")
        assert w2.selector == "app.kubernetes.io/name=pgsidecar,app.kubernetes.io/instance=pg"
    finally:
        await watcher.close()
        await api.close()
        await fake.close()


async def test_an_api_server_that_never_answers_cannot_hang_anything(tmp_path: Path) -> None:
    held: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    server = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = KubernetesSettings(
        enabled=True,
        api_url=f"http://127.0.0.1:{port}",
        namespace="x",
        pod_name="pg-0",
        label_selector="a=b",
    )
    log = CapturingLog()
    api = KubeApi(settings, environ={}, request_timeout=0.3)
    watcher = PodWatcher(settings, lambda ev: None, log, api=api, backoff_min=0.05, backoff_max=0.1)
    labeler = PodLabeler(settings, log, api=api, backoff_min=0.05, backoff_max=0.1)
    watcher.start()
    labeler.start()
    labeler.set_role("replica")
    try:
        await until(
            lambda: watcher.problem is not None and "unreachable" in watcher.problem, within=5
        )
        await until(lambda: labeler.failures >= 1, within=5, what="a bounded patch attempt")
        assert not watcher.available and not labeler.available
    finally:
        await watcher.close()
        await labeler.close()
        await api.close()
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()
