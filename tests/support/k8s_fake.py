"""A fake Kubernetes API server (aiohttp) implementing, strictly, the pod calls events/k8s.py
makes and the StatefulSet call of pgsidecar/rollout.py, and nothing else: anything it does not implement is an error, so the code cannot come to
depend on a behaviour the fake merely tolerates.

Implemented, in namespace ``namespace`` only (another namespace is 403, as for a namespaced Role):

* GET    /api/v1/namespaces/{ns}/pods?labelSelector=&resourceVersion=          list
* GET    /api/v1/namespaces/{ns}/pods?watch=1&resourceVersion=R&labelSelector=
         &allowWatchBookmarks=&timeoutSeconds=                                  watch: JSON lines
         {type, object}, history after R first, then live; BOOKMARK events; an ERROR event with
         code 410 when R is older than the compacted history; the stream ends after
         timeoutSeconds
* GET    /api/v1/namespaces/{ns}/pods/{name}                                    get
* PATCH  /api/v1/namespaces/{ns}/pods/{name}   application/merge-patch+json of metadata.labels
* DELETE /api/v1/namespaces/{ns}/pods/{name}   optional DeleteOptions with preconditions.uid
* GET    /apis/apps/v1/namespaces/{ns}/statefulsets/{name}                     get (`pgsidecar
         rollout`); the StatefulSet controller's OnDelete behaviour is a test helper: a pod of a
         StatefulSet whose deletion finishes is recreated on status.updateRevision, by the fake
         itself (``recreate_pods``) or by the test (``recreate_pod``)

Authorization is RBAC, as the real API server does it: every request (any path, implemented
or not) is first turned into its request attributes (verb, API group, resource, subresource,
namespace, name; the verb by the API server's own mapping: GET on an item is get, on a
collection list, with watch=true watch; POST create, PUT update, PATCH patch, DELETE delete, on a
collection deletecollection), then checked against ``role``: by default the Role that
deploy/kubernetes renders to (``deploy_role()``), bound in ``namespace``. A request the Role does
not grant is 403 Forbidden (a Status with reason Forbidden, as the API server answers), whether
or not the fake implements it. Every request is recorded in ``served`` with its attributes and
the status it got, so tests observe which calls the code really makes.

401 without the bearer token, 403 for what the Role does not grant, 400 for an unknown query
parameter, 404 for a path the fake does not implement, 415 for another patch type, 422 for a
patch touching anything but labels.

Test helpers change pods (each change gets the next resourceVersion, like etcd's revision),
drop watch connections, compact the history (forcing 410 on resume), send bookmarks, re-send
an old event (a misbehaving server), and make the next calls of a verb fail.
"""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.support import yamlutil

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
BASE = DEPLOY / "kubernetes"  # the Role the agent runs with
POD_KILLING = DEPLOY / "overlays" / "pod-killing"  # ... and with the pod-killing component
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}
_DROP = object()
_END = object()


def parse_bool(value: str) -> bool:
    # the API server parses booleans with Go's strconv.ParseBool
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(value)


def parse_selector(text: str) -> list[tuple[str, str, str | None]]:
    """Equality-based label selectors: k=v, k==v, k!=v, k, !k (comma = and)."""
    out: list[tuple[str, str, str | None]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "!=" in part:
            k, v = part.split("!=", 1)
            out.append(("!=", k.strip(), v.strip()))
        elif "==" in part:
            k, v = part.split("==", 1)
            out.append(("=", k.strip(), v.strip()))
        elif "=" in part:
            k, v = part.split("=", 1)
            out.append(("=", k.strip(), v.strip()))
        elif part.startswith("!"):
            out.append(("!", part[1:].strip(), None))
        elif " in " in part or "(" in part:
            raise ValueError(f"set-based selector not implemented by the fake: {part}")
        else:
            out.append(("exists", part, None))
    return out


def selector_matches(
    selector: list[tuple[str, str, str | None]], labels: Mapping[str, str]
) -> bool:
    for op, key, value in selector:
        if op == "=" and labels.get(key) != value:
            return False
        if op == "!=" and labels.get(key) == value:
            return False
        if op == "exists" and key not in labels:
            return False
        if op == "!" and key in labels:
            return False
    return True


# --------------------------------------------------------------------------- RBAC

Rule = dict[str, Any]  # a PolicyRule of rbac.authorization.k8s.io/v1


def _load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yamlutil.safe_load_all(path.read_text()) if d is not None]


def _apply_json6902(doc: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    for op in ops:
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")
        ]
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if op["op"] == "add":
            if isinstance(node, list):
                node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                node[last] = copy.deepcopy(op["value"])
        elif op["op"] == "replace":
            node[int(last) if isinstance(node, list) else last] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del node[int(last) if isinstance(node, list) else last]
        else:
            raise ValueError(f"fake: JSON patch op {op['op']!r} not implemented")


def _apply_patches(directory: Path, k: Mapping[str, Any], docs: list[dict[str, Any]]) -> None:
    for patch in k.get("patches") or ():
        target = patch.get("target") or {}
        if set(target) - {"kind", "name"}:
            raise ValueError(f"fake: patch target {target} not implemented")
        text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
        ops = yamlutil.safe_load(text)
        for doc in docs:
            if target.get("kind", doc["kind"]) != doc["kind"]:
                continue
            if target.get("name", doc["metadata"]["name"]) != doc["metadata"]["name"]:
                continue
            if not isinstance(ops, list):
                if doc["kind"] in ("Role", "ClusterRole"):
                    raise ValueError("fake: strategic-merge patches of a Role not implemented")
                continue  # not a Role: irrelevant here
            _apply_json6902(doc, ops)


def _render_python(directory: Path) -> list[dict[str, Any]]:
    """What kustomize does to the resources of ``directory``, as far as RBAC is concerned:
    resources (files and other kustomizations), then components' and own patches."""
    k = yamlutil.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for res in k.get("resources") or ():
        path = (directory / res).resolve()
        docs.extend(_render_python(path) if path.is_dir() else _load_docs(path))
    for comp in k.get("components") or ():
        comp_dir = (directory / comp).resolve()
        _apply_patches(
            comp_dir, yamlutil.safe_load((comp_dir / "kustomization.yaml").read_text()), docs
        )
    _apply_patches(directory, k, docs)
    return docs


@cache
def _render_kubectl(directory: Path) -> list[dict[str, Any]] | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory}: {out.stderr}")
    return [d for d in yamlutil.safe_load_all(out.stdout) if d is not None]


def _the_role(docs: Sequence[Mapping[str, Any]], where: str) -> list[Rule]:
    roles = [d for d in docs if d.get("kind") == "Role"]
    if len(roles) != 1 or any(d.get("kind") == "ClusterRole" for d in docs):
        raise ValueError(f"{where}: expected exactly one Role (and no ClusterRole)")
    return copy.deepcopy(list(roles[0]["rules"]))


def deploy_role(directory: Path = BASE, *, renderer: str = "auto") -> list[Rule]:
    """The rules of the Role that ``kubectl apply -k directory`` creates. ``renderer``: "kubectl"
    (``kubectl kustomize``), "python" (the small renderer above), "auto" (kubectl if installed)."""
    if renderer in ("auto", "kubectl"):
        docs = _render_kubectl(directory)
        if docs is not None:
            return _the_role(docs, f"kubectl kustomize {directory}")
        if renderer == "kubectl":
            raise RuntimeError("kubectl is not installed")
    return _the_role(_render_python(directory), str(directory))


def role_without(
    rules: Sequence[Rule], verb: str, resource: str, api_group: str = ""
) -> list[Rule]:
    """``rules`` with ``verb`` on ``resource`` no longer granted (rules left empty dropped)."""
    out = []
    for rule in copy.deepcopy(list(rules)):
        if api_group in rule.get("apiGroups", ()) and resource in rule.get("resources", ()):
            if "*" in rule["verbs"]:
                raise ValueError("fake: cannot take one verb out of a wildcard")
            rule["verbs"] = [v for v in rule["verbs"] if v != verb]
        if rule["verbs"]:
            out.append(rule)
    return out


def granted_calls(rules: Sequence[Rule]) -> set[tuple[str, str, str]]:
    """(API group, resource[/subresource], verb) each rule grants; wildcards refused, so the
    Role can be compared with the calls the code makes."""
    out = set()
    for rule in rules:
        if rule.get("resourceNames") or rule.get("nonResourceURLs"):
            raise ValueError(f"fake: rule {rule} not expandable")
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                for verb in rule["verbs"]:
                    if "*" in (group, verb) or "*" in res:
                        raise ValueError(f"wildcard in rule {rule}")
                    out.add((group, res, verb))
    return out


@dataclass
class Served:
    """One request, as the API server's authorizer sees it, and the status it was answered."""

    verb: str  # the RBAC verb (get, list, watch, create, update, patch, delete, deletecollection)
    resource: str  # "" for a non-resource path (/version, /healthz, ...)
    subresource: str
    api_group: str
    namespace: str | None
    name: str | None
    method: str
    path: str
    status: int = 0  # filled in once answered

    @property
    def call(self) -> tuple[str, str, str]:
        """(API group, resource[/subresource], verb): what an RBAC rule grants."""
        res = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        return (self.api_group, res, self.verb)


_SERVED = web.RequestKey("served", Served)
_INDEX = web.RequestKey("index", int)  # of the request in FakeKubeApi.requests

_METHOD_VERBS = {
    "GET": "get",
    "HEAD": "get",
    "POST": "create",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}


def request_attributes(method: str, path: str, query: Mapping[str, str]) -> Served:
    """The API server's RequestInfo (k8s.io/apiserver/pkg/endpoints/request/requestinfo.go)."""
    parts = [p for p in path.split("/") if p]
    verb = _METHOD_VERBS.get(method.upper(), method.lower())
    if len(parts) >= 2 and parts[0] == "api":
        group, rest = "", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, rest = parts[1], parts[3:]
    else:
        return Served(verb, "", "", "", None, None, method, path)  # non-resource URL
    if rest and rest[0] == "watch":  # the deprecated /watch/ path prefix
        verb, rest = "watch", rest[1:]
    namespace = None
    if rest and rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2:
            rest = rest[2:]  # /namespaces/{ns}/{resource}/...; else the namespace itself
    resource = rest[0] if rest else ""
    name = rest[1] if len(rest) > 1 else None
    subresource = rest[2] if len(rest) > 2 else ""
    if name is None and verb == "get":
        try:
            watching = parse_bool(query["watch"]) if "watch" in query else False
        except ValueError:
            watching = False
        verb = "watch" if watching else "list"
    if name is None and verb == "delete":
        verb = "deletecollection"
    return Served(verb, resource, subresource, group, namespace, name, method, path)


def rules_allow(rules: Sequence[Rule], req: Served) -> bool:
    """RBAC's RuleAllows (k8s.io/kubernetes/pkg/apis/rbac/v1/evaluation_helpers.go) for a
    resource request; a Role grants no non-resource URL."""
    if not req.resource:
        return False
    combined = f"{req.resource}/{req.subresource}" if req.subresource else req.resource
    for rule in rules:
        verbs = rule.get("verbs") or ()
        if "*" not in verbs and req.verb not in verbs:
            continue
        groups = rule.get("apiGroups") or ()
        if "*" not in groups and req.api_group not in groups:
            continue
        if not any(
            r in ("*", combined) or (req.subresource and r == f"*/{req.subresource}")
            for r in rule.get("resources") or ()
        ):
            continue
        names = rule.get("resourceNames") or ()
        if names and req.name not in names:
            continue
        return True
    return False


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _status_response(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(status(code, reason, message), status=code)


@dataclass
class _Change:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict[str, Any]
    old_labels: dict[str, str] | None  # labels before the change (None: the pod did not exist)


@dataclass
class _Watch:
    selector: list[tuple[str, str, str | None]]
    bookmarks: bool
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    request: web.Request | None = None


class FakeKubeApi:
    def __init__(
        self,
        *,
        namespace: str = "pgs",
        token: str | None = "test-token",
        role: Sequence[Rule] | None = None,
        graceful_delete: bool = True,
        bookmark_interval: float | None = None,
    ) -> None:
        self.namespace = namespace
        self.token = token
        # the Role bound to the agent's service account in ``namespace``; tests may replace it
        # (an operator fixing the Role takes effect at the next request)
        self.role: list[Rule] = deploy_role() if role is None else copy.deepcopy(list(role))
        self.served: list[Served] = []  # every request, with its attributes and status
        # a delete first sets deletionTimestamp (the kubelet then stops the pod); finish it
        # with finish_deletion(), like the kubelet reporting the containers gone
        self.graceful_delete = graceful_delete
        self.bookmark_interval = bookmark_interval
        self.rv = 100
        self.pods: dict[str, dict[str, Any]] = {}
        self.history: list[_Change] = []
        self.compacted_rv = 0  # history up to here is gone; a watch from before it is 410
        self._watches: list[_Watch] = []
        self.requests: list[tuple[str, str, dict[str, str], str | None]] = []
        self.patch_gate: asyncio.Event | None = None  # when set, PATCH waits for it
        self._fail_next: dict[str, list[int]] = {}
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.watch_connects = 0
        self.statefulsets: dict[str, dict[str, Any]] = {}
        self._owner: dict[str, str] = {}  # pod name -> its StatefulSet
        # the StatefulSet controller: recreate a StatefulSet's pod once its deletion finishes
        # (Ready when recreate_ready); off, the test recreates it with recreate_pod()
        self.recreate_pods = False
        self.recreate_ready = True

    # ----------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> str:
        app = web.Application(middlewares=[self._authorize])
        base = "/api/v1/namespaces/{ns}/pods"
        app.router.add_get(base, self._pods_collection)
        app.router.add_get(base + "/{name}", self._get)
        app.router.add_patch(base + "/{name}", self._patch)
        app.router.add_delete(base + "/{name}", self._delete)
        app.router.add_get(
            "/apis/apps/v1/namespaces/{ns}/statefulsets/{name}", self._get_statefulset
        )
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self.url

    async def close(self) -> None:
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ----------------------------------------------------------------- helpers for tests

    def _next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def _record(self, type_: str, obj: dict[str, Any], old_labels: dict[str, str] | None) -> None:
        change = _Change(self.rv, type_, copy.deepcopy(obj), old_labels)
        self.history.append(change)
        for w in list(self._watches):
            self._offer(w, change)

    def _offer(self, w: _Watch, change: _Change) -> None:
        """Queue a change for a watch, translated as the API server does for a selector: a pod
        that starts matching is ADDED, one that stops matching is DELETED."""
        new_match = change.type != "DELETED" and selector_matches(
            w.selector, change.obj["metadata"].get("labels") or {}
        )
        old_match = change.old_labels is not None and selector_matches(
            w.selector, change.old_labels
        )
        if change.type == "DELETED":
            old_match = selector_matches(w.selector, change.obj["metadata"].get("labels") or {})
            if old_match:
                w.queue.put_nowait({"type": "DELETED", "object": change.obj})
            return
        if new_match and old_match:
            w.queue.put_nowait({"type": change.type, "object": change.obj})
        elif new_match:
            w.queue.put_nowait({"type": "ADDED", "object": change.obj})
        elif old_match:
            w.queue.put_nowait({"type": "DELETED", "object": change.obj})

    def add_pod(
        self,
        name: str,
        labels: Mapping[str, str] | None = None,
        *,
        ready: bool = False,
        phase: str = "Running",
        node: str = "node-a",
    ) -> dict[str, Any]:
        assert name not in self.pods, name
        rv = self._next_rv()
        obj = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "uid": str(uuid.uuid4()),
                "resourceVersion": str(rv),
                "labels": dict(labels or {}),
            },
            "spec": {"nodeName": node},
            "status": {
                "phase": phase,
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            },
        }
        self.pods[name] = obj
        self._record("ADDED", obj, None)
        return copy.deepcopy(obj)

    def modify_pod(
        self,
        name: str,
        *,
        ready: bool | None = None,
        phase: str | None = None,
        labels: Mapping[str, str | None] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        obj = self.pods[name]
        old_labels = dict(obj["metadata"].get("labels") or {})
        if ready is not None:
            obj["status"]["conditions"] = [
                {"type": "Ready", "status": "True" if ready else "False"}
            ]
        if phase is not None:
            obj["status"]["phase"] = phase
        if labels is not None:
            current = obj["metadata"].setdefault("labels", {})
            for k, v in labels.items():
                if v is None:
                    current.pop(k, None)
                else:
                    current[k] = v
        if annotations is not None:
            obj["metadata"].setdefault("annotations", {}).update(annotations)
        obj["metadata"]["resourceVersion"] = str(self._next_rv())
        self._record("MODIFIED", obj, old_labels)
        return copy.deepcopy(obj)

    def delete_pod(self, name: str, *, graceful: bool | None = None) -> None:
        """Graceful: set deletionTimestamp (MODIFIED); then finish_deletion removes it."""
        graceful = self.graceful_delete if graceful is None else graceful
        obj = self.pods[name]
        if not graceful:
            self.finish_deletion(name)
        elif not obj["metadata"].get("deletionTimestamp"):  # a second delete changes nothing
            old_labels = dict(obj["metadata"].get("labels") or {})
            obj["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
            obj["metadata"]["deletionGracePeriodSeconds"] = 60
            obj["metadata"]["resourceVersion"] = str(self._next_rv())
            self._record("MODIFIED", obj, old_labels)

    def finish_deletion(self, name: str) -> None:
        obj = self.pods.pop(name)
        obj["metadata"]["resourceVersion"] = str(self._next_rv())
        self._record("DELETED", obj, dict(obj["metadata"].get("labels") or {}))
        if self.recreate_pods and name in self._owner:
            self.recreate_pod(name, ready=self.recreate_ready)

    # ----------------------------------------------------------------- StatefulSets

    def add_statefulset(
        self,
        name: str,
        pods: Sequence[str],
        match_labels: Mapping[str, str],
        *,
        revision: str,
        strategy: str = "OnDelete",
        pod_labels: Mapping[str, Mapping[str, str]] | None = None,
        ready: bool = True,
    ) -> dict[str, Any]:
        """A StatefulSet and its pods, all on ``revision`` (current = update revision).
        ``pod_labels``: extra labels of each pod (pod name -> labels)."""
        sts: dict[str, Any] = {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "uid": str(uuid.uuid4()),
                "resourceVersion": str(self._next_rv()),
            },
            "spec": {
                "replicas": len(pods),
                "selector": {"matchLabels": dict(match_labels)},
                "updateStrategy": {"type": strategy},
            },
            "status": {"currentRevision": revision, "updateRevision": revision},
            "_pod_labels": {p: dict((pod_labels or {}).get(p) or {}) for p in pods},
        }
        self.statefulsets[name] = sts
        for p in pods:
            self._owner[p] = name
            labels = {**match_labels, **sts["_pod_labels"][p], "controller-revision-hash": revision}
            self.add_pod(p, labels, ready=ready)
        return sts

    def set_update_revision(self, name: str, revision: str) -> None:
        """A new pod template applied: status.updateRevision moves, no pod changes (OnDelete)."""
        sts = self.statefulsets[name]
        sts["status"]["updateRevision"] = revision
        sts["metadata"]["resourceVersion"] = str(self._next_rv())

    def recreate_pod(self, name: str, *, ready: bool = True) -> dict[str, Any]:
        """What the StatefulSet controller does once a pod of it is gone: a new pod (new uid)
        under the same name, on the update revision."""
        sts = self.statefulsets[self._owner[name]]
        revision = sts["status"]["updateRevision"]
        labels = {
            **sts["spec"]["selector"]["matchLabels"],
            **sts["_pod_labels"][name],
            "controller-revision-hash": revision,
        }
        pod = self.add_pod(name, labels, ready=ready)
        revs = {
            (p["metadata"].get("labels") or {}).get("controller-revision-hash")
            for n, p in self.pods.items()
            if self._owner.get(n) == sts["metadata"]["name"]
        }
        if revs == {revision}:
            sts["status"]["currentRevision"] = revision
        return pod

    def drop_watches(self) -> int:
        """Break every open watch connection (abort the TCP connection mid-stream)."""
        n = len(self._watches)
        for w in list(self._watches):
            w.queue.put_nowait(_DROP)
        return n

    def end_watches(self) -> int:
        """End every open watch cleanly, as the server does when timeoutSeconds is reached."""
        n = len(self._watches)
        for w in list(self._watches):
            w.queue.put_nowait(_END)
        return n

    def compact(self) -> None:
        """Forget all history up to now: a watch resuming from an older version gets 410."""
        self.compacted_rv = self.rv
        self.history.clear()

    def send_bookmarks(self) -> None:
        for w in self._watches:
            if w.bookmarks:
                w.queue.put_nowait(self._bookmark())

    def resend(self, rv: int) -> None:
        """Misbehave: deliver the change made at ``rv`` again to every open watch."""
        for change in self.history:
            if change.rv == rv:
                for w in self._watches:
                    self._offer(w, change)

    def fail_next(self, verb: str, *statuses: int) -> None:
        """The next calls of ``verb`` answer these HTTP statuses, in order."""
        self._fail_next.setdefault(verb, []).extend(statuses)

    @property
    def open_watches(self) -> int:
        return len(self._watches)

    def calls(self, verb: str) -> list[tuple[str, str, dict[str, str], str | None]]:
        return [r for r in self.requests if r[0] == verb]

    def denied(self) -> list[Served]:
        return [r for r in self.served if r.status == 403]

    def _bookmark(self) -> dict[str, Any]:
        return {
            "type": "BOOKMARK",
            "object": {
                "kind": "Pod",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.rv)},
            },
        }

    # ----------------------------------------------------------------- HTTP

    @web.middleware
    async def _authorize(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Authentication (401), then RBAC (403), then the handler, as in the API server's
        filter chain; every request is recorded in ``served``."""
        req = request_attributes(request.method, request.path, request.query)
        self.served.append(req)
        request[_SERVED] = req
        # (verb, path, query, body): refused requests too; the handler fills in the body
        request[_INDEX] = len(self.requests)
        self.requests.append((req.verb, request.path, dict(request.query), None))
        response: web.StreamResponse
        if (
            self.token is not None
            and request.headers.get("Authorization") != f"Bearer {self.token}"
        ):
            response = _status_response(401, "Unauthorized", "Unauthorized")
        elif req.namespace != self.namespace or not rules_allow(self.role, req):
            response = self._forbidden(req)
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:  # no route: the fake does not implement it
                response = _status_response(
                    exc.status, exc.reason, f"fake: {request.method} {request.path}: {exc.reason}"
                )
        req.status = response.status
        return response

    def _record_body(self, request: web.Request, body: Any) -> None:
        i = request[_INDEX]
        self.requests[i] = (*self.requests[i][:3], json.dumps(body, sort_keys=True))

    def _forbidden(self, req: Served) -> web.Response:
        res = f"{req.resource}/{req.subresource}" if req.subresource else req.resource
        user = f"system:serviceaccount:{self.namespace}:pg"
        if not req.resource:
            message = f'forbidden: User "{user}" cannot {req.verb} path "{req.path}"'
        else:
            what = f'{res} "{req.name}"' if req.name else res
            where = (
                f'in the namespace "{req.namespace}"'
                if req.namespace is not None
                else "at the cluster scope"
            )
            message = (
                f'{what} is forbidden: User "{user}" cannot {req.verb} resource "{res}" '
                f'in API group "{req.api_group}" {where}'
            )
        body = status(403, "Forbidden", message)
        body["details"] = {"name": req.name or "", "kind": req.resource}
        if req.api_group:
            body["details"]["group"] = req.api_group
        return web.json_response(body, status=403)

    def _check(
        self, request: web.Request, verb: str, allowed_params: set[str]
    ) -> web.Response | None:
        # authorization (the Role, the namespace) happened in _authorize, before routing
        assert request[_SERVED].verb == verb, "fake: the verb mapping disagrees with the route"
        unknown = set(request.query) - allowed_params
        if unknown:
            return _status_response(
                400, "BadRequest", f"fake: unknown query parameters {sorted(unknown)}"
            )
        pending = self._fail_next.get(verb)
        if pending:
            code = pending.pop(0)
            return _status_response(code, "InternalError", f"fake: injected failure {code}")
        return None

    async def _pods_collection(self, request: web.Request) -> web.StreamResponse:
        watch_param = request.query.get("watch")
        if watch_param is not None:
            try:
                watching = parse_bool(watch_param)
            except ValueError:
                return _status_response(400, "BadRequest", f"bad watch={watch_param}")
            if watching:
                return await self._watch(request)
        refused = self._check(request, "list", {"labelSelector", "resourceVersion", "watch"})
        if refused is not None:
            return refused
        try:
            selector = parse_selector(request.query.get("labelSelector", ""))
        except ValueError as exc:
            return _status_response(400, "BadRequest", str(exc))
        # resourceVersion "" / "0" / any not newer than now: the current state satisfies all
        rv_param = request.query.get("resourceVersion", "")
        if rv_param not in ("", "0") and (not rv_param.isdigit() or int(rv_param) > self.rv):
            return _status_response(504, "Timeout", "fake: resourceVersion in the future")
        items = [
            copy.deepcopy(p)
            for _, p in sorted(self.pods.items())
            if selector_matches(selector, p["metadata"].get("labels") or {})
        ]
        return web.json_response(
            {
                "apiVersion": "v1",
                "kind": "PodList",
                "metadata": {"resourceVersion": str(self.rv)},
                "items": items,
            }
        )

    async def _watch(self, request: web.Request) -> web.StreamResponse:
        refused = self._check(
            request,
            "watch",
            {"watch", "labelSelector", "resourceVersion", "allowWatchBookmarks", "timeoutSeconds"},
        )
        if refused is not None:
            return refused
        q = request.query
        try:
            selector = parse_selector(q.get("labelSelector", ""))
            bookmarks = (
                parse_bool(q["allowWatchBookmarks"]) if "allowWatchBookmarks" in q else False
            )
            timeout = int(q["timeoutSeconds"]) if "timeoutSeconds" in q else None
        except (ValueError, KeyError) as exc:
            return _status_response(400, "BadRequest", f"bad watch parameter: {exc}")
        rv_param = q.get("resourceVersion")
        if not rv_param or not rv_param.isdigit():
            # the code always resumes from a version it got from a list or an event
            return _status_response(
                400,
                "BadRequest",
                "fake: watch without a concrete resourceVersion is not implemented",
            )
        since = int(rv_param)
        self.watch_connects += 1
        w = _Watch(selector=selector, bookmarks=bookmarks, request=request)
        gone = since < self.compacted_rv
        if not gone:
            # registered before the first await: a drop_watches() from now on reaches it
            for change in self.history:
                if change.rv > since:
                    self._offer(w, change)
            self._watches.append(w)
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        request[_SERVED].status = resp.status  # answered now; the stream goes on
        if gone:
            err = status(410, "Expired", f"too old resource version: {since} ({self.compacted_rv})")
            await resp.write(json.dumps({"type": "ERROR", "object": err}).encode() + b"\n")
            await resp.write_eof()
            return resp
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None else None
        try:
            while True:
                wait: float | None = None
                if deadline is not None:
                    wait = deadline - loop.time()
                    if wait <= 0:
                        break
                if self.bookmark_interval is not None and bookmarks:
                    wait = (
                        self.bookmark_interval
                        if wait is None
                        else min(wait, self.bookmark_interval)
                    )
                try:
                    item = await asyncio.wait_for(w.queue.get(), wait)
                except TimeoutError:
                    if deadline is not None and loop.time() >= deadline:
                        break
                    item = self._bookmark()
                if item is _END:
                    break
                if item is _DROP:
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                await resp.write(json.dumps(item).encode() + b"\n")
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            if w in self._watches:
                self._watches.remove(w)
        return resp

    async def _get_statefulset(self, request: web.Request) -> web.StreamResponse:
        refused = self._check(request, "get", set())
        if refused is not None:
            return refused
        name = request.match_info["name"]
        sts = self.statefulsets.get(name)
        if sts is None:
            return _status_response(404, "NotFound", f'statefulsets.apps "{name}" not found')
        return web.json_response({k: v for k, v in sts.items() if not k.startswith("_")})

    def _pod_or_404(self, name: str) -> dict[str, Any] | web.Response:
        pod = self.pods.get(name)
        if pod is None:
            return _status_response(404, "NotFound", f'pods "{name}" not found')
        return pod

    async def _get(self, request: web.Request) -> web.StreamResponse:
        refused = self._check(request, "get", set())
        if refused is not None:
            return refused
        pod = self._pod_or_404(request.match_info["name"])
        if isinstance(pod, web.Response):
            return pod
        return web.json_response(pod)

    async def _patch(self, request: web.Request) -> web.StreamResponse:
        refused = self._check(request, "patch", set())
        if refused is not None:
            return refused
        ctype = request.headers.get("Content-Type", "")
        if ctype.split(";")[0].strip() != "application/merge-patch+json":
            return _status_response(
                415, "UnsupportedMediaType", f"fake: patch type {ctype} not implemented"
            )
        try:
            body = await request.json()
        except ValueError:
            return _status_response(400, "BadRequest", "patch body is not JSON")
        self._record_body(request, body)
        labels = body.get("metadata", {}).get("labels") if isinstance(body, dict) else None
        if (
            not isinstance(body, dict)
            or set(body) != {"metadata"}
            or not isinstance(body["metadata"], dict)
            or set(body["metadata"]) != {"labels"}
            or not isinstance(labels, dict)
            or not all(isinstance(v, str) or v is None for v in labels.values())
        ):
            return _status_response(
                422, "Invalid", "fake: only merge patches of metadata.labels are implemented"
            )
        if self.patch_gate is not None:
            await self.patch_gate.wait()
        name = request.match_info["name"]
        pod = self._pod_or_404(name)
        if isinstance(pod, web.Response):
            return pod
        return web.json_response(self.modify_pod(name, labels=labels))

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        refused = self._check(request, "delete", set())
        if refused is not None:
            return refused
        name = request.match_info["name"]
        raw = await request.read()
        options: dict[str, Any] = {}
        if raw:
            try:
                options = json.loads(raw)
            except ValueError:
                return _status_response(400, "BadRequest", "delete body is not JSON")
        if set(options) - {"preconditions"} or set(options.get("preconditions") or {}) - {"uid"}:
            return _status_response(422, "Invalid", "fake: only preconditions.uid is implemented")
        self._record_body(request, options)
        pod = self._pod_or_404(name)
        if isinstance(pod, web.Response):
            return pod
        want_uid = (options.get("preconditions") or {}).get("uid")
        if want_uid is not None and want_uid != pod["metadata"]["uid"]:
            return _status_response(
                409,
                "Conflict",
                f"Precondition failed: UID in precondition: {want_uid}, UID in object meta: "
                f"{pod['metadata']['uid']}",
            )
        before = copy.deepcopy(pod)
        self.delete_pod(name)
        return web.json_response(self.pods.get(name, before))


# --------------------------------------------------------------------- helpers for the tests


class CapturingLog:
    """A structlog-like logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, dict[str, Any]]] = []

    def _add(self, level: str, event: str, **fields: Any) -> None:
        self.entries.append((level, event, fields))

    def debug(self, event: str, **fields: Any) -> None:
        self._add("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._add("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._add("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._add("error", event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._add("exception", event, **fields)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [f for _, e, f in self.entries if e == name]


async def until(predicate: Any, within: float = 10.0, what: str = "condition") -> None:
    """Wait (bounded) until ``predicate()`` is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)


CLUSTER_LABELS = {"app.kubernetes.io/name": "pgsidecar", "app.kubernetes.io/instance": "pg"}
CLUSTER_SELECTOR = "app.kubernetes.io/name=pgsidecar,app.kubernetes.io/instance=pg"


def settings_for(fake: FakeKubeApi, tmp_path: Any, **overrides: Any) -> Any:
    """KubernetesSettings pointing at the fake, with a token file holding its token."""
    from pgsidecar.config import KubernetesSettings

    token_file = tmp_path / "k8s-token"
    token_file.write_text((fake.token or "") + "\n")
    values: dict[str, Any] = {
        "enabled": True,
        "api_url": fake.url,
        "token_file": token_file,
        "namespace": fake.namespace,
        "pod_name": "pg-0",
        "label_selector": CLUSTER_SELECTOR,
    }
    values.update(overrides)
    return KubernetesSettings(**values)
