"""Without a usable Kubernetes API the agent runs on, without pod events: says so once, keeps
retrying in the background, never raises into its caller; and it picks the events up as soon as
the API is there.

And the RBAC Role of deploy/ against the calls the code really makes: the fake API server
enforces that Role (403 for anything it does not grant), the components run against it through
their real code paths, and the calls the fake saw must be exactly what the Role grants."""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from events.k8s import (
    _API_CALLS,
    K8S_API_CALLS,
    POD_KILLING_API_CALLS,
    Access,
    KubeApi,
    PodEvent,
    PodKiller,
    PodLabeler,
    PodWatcher,
    resolve_access,
)
from pgsidecar.config import KubernetesSettings
from tests.support.k8s_fake import (
    BASE,
    CLUSTER_LABELS,
    POD_KILLING,
    CapturingLog,
    FakeKubeApi,
    deploy_role,
    granted_calls,
    request_attributes,
    role_without,
    settings_for,
    until,
)

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
    fake = FakeKubeApi(role=role_without(deploy_role(), "watch", "pods"))
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


# ------------------------------------------------------------------ RBAC: observed, not declared

# Calls the code makes only on paths no test here can drive, so the Role grants them on trust.
# Empty: every call is driven below. Add one only with a comment saying why it cannot be driven.
UNDRIVEN_CALLS: frozenset[tuple[str, str, str]] = frozenset()

TIMEOUT = 300.0  # the pod killer's unhealthy_pod_timeout in the scenario (its clock is ours)


@dataclass
class Exercised:
    watcher: PodWatcher
    labeler: PodLabeler
    killer: PodKiller
    action: dict[str, Any] | None
    log: CapturingLog


async def exercise(fake: FakeKubeApi, tmp_path: Path, *, kill: bool) -> Exercised:
    """Run PodWatcher, PodLabeler and PodKiller on one KubeApi against ``fake``, through every
    path that calls the API: the labeler's start (get) and its label patch, the watcher's list,
    watch, a dropped watch resumed into 410 Gone and the relist, and (``kill``) a deletion.
    Each step waits for its success or for the fake refusing anything; nothing is asserted."""
    for name in ("pg-0", "pg-1", "pg-2"):
        fake.add_pod(name, CLUSTER_LABELS, ready=True)
    log = CapturingLog()
    settings = settings_for(fake, tmp_path, kill_unhealthy_pods=kill, unhealthy_pod_timeout=TIMEOUT)
    api = KubeApi(settings, environ={})
    killer = PodKiller(settings, log, own_member="pg-0", api=api, clock=lambda: 0.0)
    labeler = PodLabeler(settings, log, api=api, backoff_min=0.02, backoff_max=0.1)

    def on_event(ev: PodEvent) -> None:  # as the agent wires them
        killer.observe_pod(ev)
        labeler.observe(ev)

    watcher = PodWatcher(settings, on_event, log, api=api, backoff_min=0.02, backoff_max=0.1)
    action = None
    try:
        labeler.start()
        labeler.set_role("master")
        await until(lambda: labeler.applied == "master" or bool(fake.denied()), what="label")
        watcher.start()
        await until(
            lambda: (len(watcher.pods) == 3 and fake.open_watches == 1) or bool(fake.denied()),
            what="pods listed and watched",
        )
        if watcher.available and fake.open_watches:
            # the watch breaks, a change it never carried is compacted away: the resume gets
            # 410 Gone and relists (no await in between: the watcher cannot see the change)
            fake.drop_watches()
            fake.modify_pod("pg-1", ready=False)
            fake.compact()
            await until(
                lambda: (
                    (watcher.gone and watcher.lists >= 2 and fake.open_watches == 1)
                    or bool(fake.denied())
                ),
                what="relist after 410 Gone",
            )
        killer.observe_health({"pg-0": True, "pg-1": True, "pg-2": False}, now=0.0)
        action = await killer.maybe_kill(is_master=True, now=TIMEOUT)
    finally:
        await watcher.close()
        await labeler.close()
        await killer.close()
        await api.close()
    return Exercised(watcher, labeler, killer, action, log)


def observed(fake: FakeKubeApi) -> set[tuple[str, str, str]]:
    return {r.call for r in fake.served}


@pytest.mark.parametrize(
    ("directory", "kill"), [(BASE, False), (POD_KILLING, True)], ids=["base", "pod-killing"]
)
async def test_the_role_grants_exactly_the_calls_the_components_make(
    tmp_path: Path, directory: Path, kill: bool
) -> None:
    role = deploy_role(directory)
    fake = FakeKubeApi(role=role)
    await fake.start()
    try:
        ran = await exercise(fake, tmp_path, kill=kill)
    finally:
        await fake.close()
    # every path was really taken...
    assert ran.labeler.applied == "master" and ran.labeler.patches == 1
    assert fake.pods["pg-0"]["metadata"]["labels"]["role"] == "master"
    assert ran.watcher.lists == 2 and ran.watcher.gone == 1 and ran.watcher.watches >= 2
    if kill:
        assert ran.action is not None and ran.action["outcome"] == "ok", ran.action
    else:
        assert ran.action is None
    # ...and nothing was refused: no 403 at the fake, and no component complained
    assert fake.denied() == []
    assert {r.status for r in fake.served} <= {200}, [(r.call, r.status) for r in fake.served]
    for complaint in (
        "k8s_label_read_failed",
        "k8s_role_label_failed",
        "k8s_pod_events_unavailable",
        "k8s_pod_delete_failed",
    ):
        assert ran.log.events(complaint) == [], complaint
    # least privilege: the Role grants nothing the code never used
    granted = granted_calls(role)
    assert observed(fake) <= granted
    assert granted - observed(fake) <= UNDRIVEN_CALLS, "granted but never used"
    # the declarations in events/k8s.py (tests/unit/test_deploy_manifests.py checks the Role against
    # them) agree with what was observed
    declared = {("", res, verb) for res, verb in K8S_API_CALLS}
    if kill:
        declared |= {("", res, verb) for res, verb in POD_KILLING_API_CALLS}
    assert declared == observed(fake) | UNDRIVEN_CALLS


def _seen_by_component(verb: str, ran: Exercised) -> bool:
    """The component that makes the call reports the refusal (the agent would log it)."""
    if verb in ("list", "watch"):
        problem = ran.watcher.problem or ""
        return not ran.watcher.available and "403" in problem and verb in problem
    if verb == "get":
        return any("403" in e["problem"] for e in ran.log.events("k8s_label_read_failed"))
    if verb == "patch":
        problem = ran.labeler.problem or ""
        return ran.labeler.applied != "master" and "403" in problem and "patch" in problem
    if verb == "delete":
        return ran.action is not None and ran.action["status"] == 403
    raise AssertionError(f"the Role grants {verb}, which no component here is known to use")


@pytest.mark.parametrize(
    "call", sorted(granted_calls(deploy_role(POD_KILLING))), ids=lambda c: "/".join(c[1:])
)
async def test_a_role_missing_one_permission_is_a_403_the_component_sees(
    tmp_path: Path, call: tuple[str, str, str]
) -> None:
    group, resource, verb = call
    fake = FakeKubeApi(role=role_without(deploy_role(POD_KILLING), verb, resource, group))
    await fake.start()
    try:
        ran = await exercise(fake, tmp_path, kill=True)
    finally:
        await fake.close()
    refused = fake.denied()
    assert refused and {r.call for r in refused} == {call}
    body = refused[0]
    assert (body.verb, body.resource, body.status) == (verb, resource, 403)
    assert _seen_by_component(verb, ran), (ran.watcher.problem, ran.labeler.problem, ran.action)


async def test_each_api_method_sends_the_call_it_declares(tmp_path: Path) -> None:
    """``@api_call`` in events/k8s.py against the request each KubeApi method really sends; and
    no method calls the API without declaring it."""
    public = {
        name
        for name, fn in inspect.getmembers(KubeApi, inspect.iscoroutinefunction)
        if not name.startswith("_") and name != "close"
    }
    assert public == set(_API_CALLS), "a KubeApi method without @api_call (or a stale one)"
    fake = FakeKubeApi(role=deploy_role(POD_KILLING))
    await fake.start()
    api = KubeApi(settings_for(fake, tmp_path), environ={})
    try:
        fake.add_pod("pg-1", CLUSTER_LABELS)
        uid = fake.pods["pg-1"]["metadata"]["uid"]
        rv = str(fake.rv)
        calls = {
            "get_pod": lambda: api.get_pod("pg-1"),
            "list_pods": lambda: api.list_pods("a=b"),
            "watch_pods": lambda: api.watch_pods("a=b", rv, 1),
            "patch_pod_labels": lambda: api.patch_pod_labels("pg-1", {"role": "replica"}),
            "delete_pod": lambda: api.delete_pod("pg-1", uid),
        }
        assert set(calls) == set(_API_CALLS)
        for name, send in calls.items():
            before = len(fake.served)
            got = await send()
            if name == "watch_pods":
                got.close()
            sent = [(r.call, r.status) for r in fake.served[before:]]
            resource, verb, _ = _API_CALLS[name]
            assert sent == [(("", resource, verb), 200)], name
    finally:
        await api.close()
        await fake.close()


# ------------------------------------------------------------------ the fake's authorizer


@pytest.mark.parametrize(
    ("method", "path", "query", "call"),
    [
        ("GET", "/api/v1/namespaces/n/pods/p", {}, ("", "pods", "get")),
        ("GET", "/api/v1/namespaces/n/pods", {}, ("", "pods", "list")),
        ("GET", "/api/v1/namespaces/n/pods", {"watch": "true"}, ("", "pods", "watch")),
        ("GET", "/api/v1/watch/namespaces/n/pods", {}, ("", "pods", "watch")),
        ("POST", "/api/v1/namespaces/n/pods", {}, ("", "pods", "create")),
        ("PUT", "/api/v1/namespaces/n/pods/p", {}, ("", "pods", "update")),
        ("PATCH", "/api/v1/namespaces/n/pods/p", {}, ("", "pods", "patch")),
        ("DELETE", "/api/v1/namespaces/n/pods/p", {}, ("", "pods", "delete")),
        ("DELETE", "/api/v1/namespaces/n/pods", {}, ("", "pods", "deletecollection")),
        ("GET", "/api/v1/namespaces/n/pods/p/log", {}, ("", "pods/log", "get")),
        ("POST", "/api/v1/namespaces/n/pods/p/eviction", {}, ("", "pods/eviction", "create")),
        (
            "PUT",
            "/apis/coordination.k8s.io/v1/namespaces/n/leases/l",
            {},
            ("coordination.k8s.io", "leases", "update"),
        ),
    ],
)
def test_the_fake_maps_requests_to_verbs_as_the_api_server_does(
    method: str, path: str, query: dict[str, str], call: tuple[str, str, str]
) -> None:
    assert request_attributes(method, path, query).call == call


async def test_the_fake_refuses_what_the_role_does_not_grant_with_a_forbidden_status() -> None:
    fake = FakeKubeApi()  # the base Role of deploy/kubernetes
    await fake.start()
    fake.add_pod("pg-1", CLUSTER_LABELS)
    headers = {"Authorization": f"Bearer {fake.token}"}
    pods = f"{fake.url}/api/v1/namespaces/{fake.namespace}/pods"
    try:
        async with aiohttp.ClientSession(headers=headers) as http:
            for method, url in [
                ("DELETE", f"{pods}/pg-1"),  # delete: only with the pod-killing component
                ("DELETE", pods),  # deletecollection
                ("POST", pods),  # create, not implemented by the fake: still 403 first
                ("GET", f"{pods}/pg-1/log"),  # a subresource
                ("GET", f"{fake.url}/api/v1/namespaces/other/pods"),  # another namespace
                ("GET", f"{fake.url}/api/v1/pods"),  # cluster scope
            ]:
                async with http.request(method, url) as resp:
                    body = await resp.json()
                    assert resp.status == 403, (method, url)
                    assert (body["kind"], body["status"], body["reason"], body["code"]) == (
                        "Status",
                        "Failure",
                        "Forbidden",
                        403,
                    )
                    assert "is forbidden" in body["message"]
            async with http.get(f"{pods}/pg-1") as resp:
                assert resp.status == 200
        assert "pg-1" in fake.pods and not fake.pods["pg-1"]["metadata"].get("deletionTimestamp")
        assert [r.status for r in fake.served] == [403] * 6 + [200]
    finally:
        await fake.close()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("directory", [BASE, POD_KILLING], ids=["base", "pod-killing"])
def test_the_fakes_own_rendering_of_the_role_agrees_with_kubectl(directory: Path) -> None:
    python = deploy_role(directory, renderer="python")
    assert granted_calls(python) == granted_calls(deploy_role(directory, renderer="kubectl"))
