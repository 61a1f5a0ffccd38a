"""Kubernetes: pod-lifecycle events in, role labels and (optionally) pod deletions out.

Three small pieces share one ``KubeApi`` (kubernetes_asyncio over the pod's service account):

* ``PodWatcher`` lists, then watches, the pods of the cluster and hands each change to a callback
  as a ``PodEvent``, exactly once: resumes from the last resourceVersion after a dropped
  connection, follows bookmarks, relists on 410 Gone and synthesizes the DELETED events a relist
  reveals, and suppresses repeats by (pod, resourceVersion).
* ``PodLabeler`` keeps its own pod's ``role`` label equal to the latest role the agent set
  (merge patch, retried in the background, coalesced: only the latest desired value is sent).
* ``PodKiller`` deletes the pod of a member that has been unhealthy for too long (off by
  default). The decision is the pure function ``decide_pod_kill``; the deletion is a thin effect.

Kubernetes is never on the failover path: nothing here raises into the caller or blocks it. With
no token or no reachable API server, ``available`` is False, the reason is logged once and kept in
``problem`` (for /status), and the pieces retry in the background.

Every ``KubeApi`` method that calls the API says which (resource, verb) it is with ``@api_call``;
``K8S_API_CALLS`` and ``POD_KILLING_API_CALLS`` (only the pod-killing component grants these) are
read off those methods, not kept by hand. What the code really sends is observed in
tests/unit/test_k8s_access.py: the components run against a fake API server that enforces the Role
deploy/kubernetes renders to, and the Role must grant exactly the calls seen there.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import importlib
import json
import os
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import aiohttp

from events import netloc
from events.settings import KubernetesSettings
from events.tasks import bounded, stop_task

if TYPE_CHECKING:
    from kubernetes_asyncio import client as k8s_client

F = TypeVar("F", bound=Callable[..., Any])

# KubeApi method name -> (resource, verb, granted only by the pod-killing component)
_API_CALLS: dict[str, tuple[str, str, bool]] = {}


def api_call(resource: str, verb: str, *, pod_killing: bool = False) -> Callable[[F], F]:
    """Declare the (resource, verb) a KubeApi method calls; the method itself is unchanged."""

    def mark(fn: F) -> F:
        _API_CALLS[fn.__name__] = (resource, verb, pod_killing)
        return fn

    return mark


ROLE_LABEL = "role"
ROLE_VALUES = ("master", "replica")
# a pod may name its member explicitly; otherwise the member is the pod (StatefulSet: pg-0, ...)
MEMBER_LABEL = "pgsidecar.io/member"
DEFAULT_SELECTOR = "app.kubernetes.io/name=pgsidecar,app.kubernetes.io/instance={cluster}"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

MERGE_PATCH = "application/merge-patch+json"
EventType = Literal["ADDED", "MODIFIED", "DELETED"]
Role = Literal["master", "replica"]


class K8sError(Exception):
    """A call failed. ``status`` is the HTTP status (None: no answer at all)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class K8sUnavailable(K8sError):
    """No way to talk to the API: not in a pod, no token, unreachable, or the token refused."""


class Gone(K8sError):
    """410: the resourceVersion we resume from has been compacted away; relist."""


class WatchDropped(K8sError):
    """The watch stream broke after it had been established; resume from the last version."""


# --------------------------------------------------------------------------- access


@dataclass(frozen=True)
class Access:
    url: str
    token_file: Path | None
    ca_file: Path | None
    namespace: str
    pod_name: str | None


def resolve_access(
    settings: KubernetesSettings,
    environ: Mapping[str, str],
    sa_dir: Path = SERVICE_ACCOUNT_DIR,
) -> Access | str:
    """Where the API is and how to authenticate; a string says why it cannot be reached.

    Explicit settings win (tests, out-of-cluster use); otherwise the in-cluster service account:
    KUBERNETES_SERVICE_HOST/PORT, and the token, CA bundle and namespace mounted in the pod."""
    url = settings.api_url
    if url is None:
        host = environ.get("KUBERNETES_SERVICE_HOST")
        if not host:
            return (
                "not running in a Kubernetes pod (KUBERNETES_SERVICE_HOST is unset) and "
                "kubernetes.api_url is not set"
            )
        port = environ.get("KUBERNETES_SERVICE_PORT", "443")
        url = netloc.url("https", host, port)
    token_file = settings.token_file
    if token_file is None and settings.api_url is None:
        token_file = sa_dir / "token"
    if token_file is not None and not token_file.is_file():
        return (
            f"no service-account token at {token_file} (automountServiceAccountToken off, "
            "or kubernetes.token_file wrong)"
        )
    ca_file = settings.ca_file
    if ca_file is None and settings.api_url is None and (sa_dir / "ca.crt").is_file():
        ca_file = sa_dir / "ca.crt"
    namespace = settings.namespace or environ.get("POD_NAMESPACE")
    if not namespace:
        try:
            namespace = (sa_dir / "namespace").read_text().strip()
        except OSError:
            namespace = None
    if not namespace:
        return "namespace unknown: set kubernetes.namespace (or POD_NAMESPACE)"
    pod_name = settings.pod_name or environ.get("POD_NAME") or environ.get("HOSTNAME") or None
    return Access(
        url=url, token_file=token_file, ca_file=ca_file, namespace=namespace, pod_name=pod_name
    )


def _status_message(body: bytes) -> str:
    """The ``message`` of a Kubernetes Status object, or the start of the body."""
    try:
        data = json.loads(body)
        if isinstance(data, dict) and data.get("message"):
            return str(data["message"])
    except ValueError:
        pass
    return body[:200].decode("utf-8", "replace")


class KubeApi:
    """The few pod calls this module makes, with errors reduced to K8sError subclasses.

    The client is made lazily (it needs a running loop) and re-made after a configuration
    problem is fixed; the token file is re-read when it changes, because service-account
    tokens are rotated by the kubelet."""

    def __init__(
        self,
        settings: KubernetesSettings,
        *,
        environ: Mapping[str, str] | None = None,
        sa_dir: Path = SERVICE_ACCOUNT_DIR,
        request_timeout: float = 10.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.settings = settings
        self._environ = dict(os.environ if environ is None else environ)
        self._sa_dir = sa_dir
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self._client: k8s_client.ApiClient | None = None
        self._core: k8s_client.CoreV1Api | None = None
        self._token_mtime: float | None = None
        self.access: Access | None = None
        resolved = resolve_access(settings, self._environ, sa_dir)
        if isinstance(resolved, Access):
            self.access = resolved

    @property
    def namespace(self) -> str | None:
        return self.access.namespace if self.access else None

    @property
    def pod_name(self) -> str | None:
        return self.access.pod_name if self.access else None

    def _read_token(self, conf: k8s_client.Configuration) -> None:
        access = self.access
        if access is None or access.token_file is None:
            return
        try:
            mtime = access.token_file.stat().st_mtime
            if mtime == self._token_mtime:
                return
            token = access.token_file.read_text().strip()
        except OSError:
            return  # keep the last token; a refusal will say 401
        self._token_mtime = mtime
        conf.api_key["BearerToken"] = token
        conf.api_key_prefix["BearerToken"] = "Bearer"

    def resolve(self) -> Access:
        """Where and how to reach the API; raises K8sUnavailable saying why it cannot."""
        if self.access is None:
            resolved = resolve_access(self.settings, self._environ, self._sa_dir)
            if isinstance(resolved, str):
                raise K8sUnavailable(resolved)
            self.access = resolved
        return self.access

    def _core_api(self) -> k8s_client.CoreV1Api:
        if self._core is not None:
            return self._core
        access = self.resolve()
        # imported here, not at module level: the generated client loads ~800 model modules
        # (+34 MB resident, ~1 s), a cost only an agent that really talks to Kubernetes pays
        from kubernetes_asyncio import client as k8s_client

        conf = k8s_client.Configuration()
        conf.host = access.url
        if access.ca_file is not None:
            conf.ssl_ca_cert = str(access.ca_file)
        self._read_token(conf)
        conf.refresh_api_key_hook = self._read_token
        self._client = k8s_client.ApiClient(configuration=conf)
        self._core = k8s_client.CoreV1Api(self._client)
        return self._core

    async def close(self) -> None:
        client, self._client, self._core = self._client, None, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def _send(
        self, verb: str, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """Run one generated-client call with ``_preload_content=False``; return the response
        whose status is 2xx, or raise a K8sError naming the verb."""
        try:
            if self._core is None:
                self.resolve()  # no way in: say why, without loading the client at all
                if "kubernetes_asyncio.client" not in sys.modules:
                    # the first import takes about a second: not on the agent's event loop
                    await asyncio.to_thread(importlib.import_module, "kubernetes_asyncio.client")
            core = self._core_api()
            return_resp = await call(core, *args, _preload_content=False, **kwargs)
        except K8sError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise K8sUnavailable(
                f"API server {self._url()} unreachable ({verb} {what}): {exc!r}"
            ) from exc
        status = return_resp.status
        if 200 <= status < 300:
            return return_resp
        try:
            body = await bounded(return_resp.read(), self.request_timeout)
        except (aiohttp.ClientError, TimeoutError):
            body = b""
        finally:
            return_resp.release()
        message = _status_message(body)
        if status == 401:
            raise K8sUnavailable(
                f"API server refused the token (401) on {verb} {what}: {message}", 401
            )
        if status == 403:
            raise K8sError(
                f"forbidden (403): the Role does not allow {verb} {what}: {message}", 403
            )
        if status == 410:
            raise Gone(f"410 Gone on {verb} {what}: {message}", 410)
        raise K8sError(f"{verb} {what} failed ({status}): {message}", status)

    def _url(self) -> str:
        return self.access.url if self.access else "(unknown)"

    async def _json(
        self, verb: str, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        kwargs.setdefault("_request_timeout", self.request_timeout)
        resp = await self._send(verb, what, call, *args, **kwargs)
        try:
            body = await bounded(resp.read(), self.request_timeout)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise K8sUnavailable(f"{verb} {what}: reading the answer failed: {exc!r}") from exc
        finally:
            resp.release()
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise K8sError(f"{verb} {what}: answer is not JSON") from exc
        if not isinstance(data, dict):
            raise K8sError(f"{verb} {what}: answer is not a JSON object")
        return data

    def _ns(self) -> str:
        return self.resolve().namespace

    @api_call("pods", "get")
    async def get_pod(self, name: str) -> dict[str, Any]:
        return await self._json(
            "get", f"pods/{name}", lambda c, **kw: c.read_namespaced_pod(name, self._ns(), **kw)
        )

    @api_call("pods", "list")
    async def list_pods(self, selector: str) -> dict[str, Any]:
        return await self._json(
            "list",
            "pods",
            lambda c, **kw: c.list_namespaced_pod(self._ns(), label_selector=selector, **kw),
        )

    @api_call("pods", "watch")
    async def watch_pods(self, selector: str, resource_version: str, timeout_seconds: int) -> Any:
        """The raw streaming response of a watch; the caller reads and releases it."""
        # bounded until the headers arrive; the body is a long-lived stream whose reads the
        # caller bounds
        try:
            return await bounded(
                self._watch(selector, resource_version, timeout_seconds), self.request_timeout
            )
        except TimeoutError as exc:
            raise K8sUnavailable(
                f"API server {self._url()} did not answer a watch within {self.request_timeout:g}s"
            ) from exc

    async def _watch(self, selector: str, resource_version: str, timeout_seconds: int) -> Any:
        return await self._send(
            "watch",
            "pods",
            lambda c, **kw: c.list_namespaced_pod(
                self._ns(),
                label_selector=selector,
                watch=True,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout_seconds,
                **kw,
            ),
            # no total/read timeout: the stream is long-lived; the reader bounds each read
            _request_timeout=aiohttp.ClientTimeout(
                total=None, connect=self.connect_timeout, sock_connect=self.connect_timeout
            ),
        )

    @api_call("pods", "patch")
    async def patch_pod_labels(self, name: str, labels: Mapping[str, str | None]) -> dict[str, Any]:
        # merge patch: a null value removes the label; other labels are left alone
        body = {"metadata": {"labels": dict(labels)}}
        return await self._json(
            "patch",
            f"pods/{name}",
            lambda c, **kw: c.patch_namespaced_pod(
                name, self._ns(), body, _content_type=MERGE_PATCH, **kw
            ),
        )

    @api_call("pods", "delete", pod_killing=True)
    async def delete_pod(self, name: str, uid: str | None) -> dict[str, Any]:
        # the uid precondition: a StatefulSet recreates a pod under the same name, and the new
        # pod must not pay for the old one's sickness
        body = {"preconditions": {"uid": uid}} if uid else {}
        return await self._json(
            "delete",
            f"pods/{name}",
            lambda c, **kw: c.delete_namespaced_pod(name, self._ns(), body=body, **kw),
        )


# (resource, verb) of every call KubeApi makes; the pod-killing component's apart
K8S_API_CALLS: tuple[tuple[str, str], ...] = tuple(
    (res, verb) for res, verb, pod_killing in _API_CALLS.values() if not pod_killing
)
POD_KILLING_API_CALLS: tuple[tuple[str, str], ...] = tuple(
    (res, verb) for res, verb, pod_killing in _API_CALLS.values() if pod_killing
)


# --------------------------------------------------------------------------- pod events


@dataclass(frozen=True)
class PodEvent:
    """One change of one pod of the cluster, as the machine sees it.

    ``type`` is relative to what this watcher delivered before: ADDED the first time a pod is
    seen, MODIFIED when a fact below changed, DELETED when it is gone (deleted, or no longer
    matching the selector, or missing from a relist)."""

    type: EventType
    pod: str
    member: str
    ready: bool
    deleting: bool  # deletionTimestamp set: the pod is terminating
    phase: str | None
    resource_version: str
    uid: str | None = None
    own: bool = False  # the agent's own pod
    role: str | None = None  # current value of the role label
    node: str | None = None  # the node it is scheduled on

    @classmethod
    def from_pod(
        cls, type_: EventType, obj: Mapping[str, Any], own_pod: str | None = None
    ) -> PodEvent:
        meta = obj.get("metadata") or {}
        status = obj.get("status") or {}
        labels = meta.get("labels") or {}
        name = str(meta.get("name") or "")
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or ()
        )
        return cls(
            type=type_,
            pod=name,
            member=str(labels.get(MEMBER_LABEL) or name),
            ready=ready,
            deleting=bool(meta.get("deletionTimestamp")),
            phase=status.get("phase"),
            resource_version=str(meta.get("resourceVersion") or ""),
            uid=meta.get("uid"),
            own=own_pod is not None and name == own_pod,
            role=labels.get(ROLE_LABEL),
            node=(obj.get("spec") or {}).get("nodeName"),
        )

    def facts(self) -> tuple[Any, ...]:
        """What the machine acts on; an event that changes none of it is not delivered."""
        return (self.member, self.ready, self.deleting, self.phase, self.uid, self.role, self.node)

    def to_input(self) -> dict[str, Any]:
        """The body of an ``input`` record: plain JSON types only."""
        data = asdict(self)
        data["event"] = data.pop("type")
        return {"type": "pod", "data": data}


class _ApiLoop:
    """A loop beside the agent on the Kubernetes API, through its own client unless it was
    given one: ``start`` runs ``_run`` as a task (once), ``close`` cancels it and closes the
    client if it is ours."""

    TASK_NAME = ""
    api: KubeApi
    _own_api: bool
    _task: asyncio.Task[None] | None

    async def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        """Start the loop in the background; never raises, never waits for the API."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.TASK_NAME)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await stop_task(task)
        if self._own_api:
            await self.api.close()


class PodWatcher(_ApiLoop):
    """List, then watch, the cluster's pods; deliver each change exactly once to ``on_event``.

    ``on_event`` is called from the watcher's task, synchronously, in order; it should only
    enqueue (an exception it raises is logged and the watch goes on)."""

    SEEN_MAX = 4096  # (pod, resourceVersion) pairs remembered to drop repeated events
    TASK_NAME = "k8s-pod-watcher"

    def __init__(
        self,
        settings: KubernetesSettings,
        on_event: Callable[[PodEvent], None],
        log: Any,
        *,
        api: KubeApi | None = None,
        cluster: str | None = None,
        label_selector: str | None = None,
        backoff_min: float = 0.5,
        backoff_max: float = 15.0,
        read_slack: float = 15.0,
    ) -> None:
        self.settings = settings
        self.on_event = on_event
        self.log = log
        self._own_api = api is None
        self.api = api or KubeApi(settings)
        self.selector = label_selector or settings.label_selector
        if self.selector is None and cluster is not None:
            self.selector = DEFAULT_SELECTOR.format(cluster=cluster)
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        # a watch request ends on the server after watch_timeout; a read that waits longer
        # than that plus this slack means a half-open connection
        self.read_slack = read_slack
        self.resource_version: str | None = None
        self._pods: dict[str, PodEvent] = {}
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._available = False
        self.problem: str | None = "not started"
        self._said_unavailable = False
        self._task: asyncio.Task[None] | None = None
        self._gone_streak = 0
        # counters, for /metrics and tests
        self.lists = 0
        self.watches = 0
        self.gone = 0
        self.bookmarks = 0
        self.delivered = 0
        self.suppressed = 0

    # -- public

    @property
    def available(self) -> bool:
        """True while pod events flow (last list/watch request succeeded)."""
        return self._available

    @property
    def pods(self) -> dict[str, PodEvent]:
        """The latest delivered state of each pod, by pod name."""
        return dict(self._pods)

    # -- loop

    async def _run(self) -> None:
        backoff = self.backoff_min
        while True:
            try:
                if self.selector is None:
                    raise K8sUnavailable(
                        "kubernetes.label_selector is not set: cannot tell this cluster's pods"
                    )
                if self.resource_version is None:
                    await self._relist()
                started = time.monotonic()
                await self._watch()
                backoff = self.backoff_min  # the server ended a healthy stream: watch again
                if time.monotonic() - started < 1.0:
                    # ...but not in a busy loop if a server (or proxy) ends streams at once
                    await asyncio.sleep(self.backoff_min)
                continue
            except asyncio.CancelledError:
                raise
            except Gone as exc:
                self.gone += 1
                self.resource_version = None
                self._gone_streak += 1
                self.log.info("k8s_watch_gone", detail=str(exc), action="relist")
                if self._gone_streak == 1:
                    continue  # relist at once, no event is lost: the relist shows the state
                problem = str(exc)
            except WatchDropped as exc:
                # the stream broke after it had worked: resume at once from the last version;
                # only if that fails is the API unavailable
                self.log.info(
                    "k8s_watch_dropped", detail=str(exc), resource_version=self.resource_version
                )
                await asyncio.sleep(self.backoff_min * random.uniform(0.5, 1.0))
                continue
            except K8sError as exc:
                problem = str(exc)
            except Exception as exc:  # never let the watcher die: the agent must not notice
                problem = f"unexpected error: {exc!r}"
                self.log.exception("k8s_watch_error")
            self._unavailable(problem)
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, self.backoff_max)

    def _ok(self) -> None:
        if not self._available:
            self._available = True
            self.problem = None
            self.log.info(
                "k8s_pod_events_available", selector=self.selector, namespace=self.api.namespace
            )
            self._said_unavailable = False

    def _unavailable(self, problem: str) -> None:
        self._available = False
        self.problem = problem
        if not self._said_unavailable:
            # once per outage: the agent runs on the DCS alone meanwhile
            self._said_unavailable = True
            self.log.warning(
                "k8s_pod_events_unavailable",
                problem=problem,
                effect="running without pod events (DCS only); retrying in the background",
            )

    async def _relist(self) -> None:
        assert self.selector is not None
        body = await self.api.list_pods(self.selector)
        self.lists += 1
        rv = str((body.get("metadata") or {}).get("resourceVersion") or "")
        if not rv:
            raise K8sError("pod list has no resourceVersion")
        self._ok()
        own = self.api.pod_name
        current: dict[str, Mapping[str, Any]] = {}
        for obj in body.get("items") or ():
            name = (obj.get("metadata") or {}).get("name")
            if name:
                current[name] = obj
        # pods we knew that are gone now: their DELETED events happened while we were not
        # watching (or were compacted away); the machine must still hear of them
        for name in sorted(set(self._pods) - set(current)):
            self._deliver(replace(self._pods[name], type="DELETED", resource_version=rv))
        for name in sorted(current):
            self._apply("ADDED", PodEvent.from_pod("ADDED", current[name], own))
        self.resource_version = rv

    async def _watch(self) -> None:
        assert self.selector is not None and self.resource_version is not None
        timeout_seconds = int(self.settings.watch_timeout)
        resp = await self.api.watch_pods(self.selector, self.resource_version, timeout_seconds)
        self.watches += 1
        self._ok()
        buf = b""
        try:
            while True:
                try:
                    chunk = await bounded(resp.content.readany(), timeout_seconds + self.read_slack)
                except TimeoutError as exc:
                    raise WatchDropped(
                        "no data from the watch for longer than its timeout"
                    ) from exc
                except (aiohttp.ClientError, OSError) as exc:
                    raise WatchDropped(f"watch connection lost: {exc!r}") from exc
                if not chunk:
                    return  # the server closed the stream (its timeout): watch again
                buf += chunk
                if len(buf) > 16 * 1024 * 1024:
                    raise K8sError("watch line longer than 16 MiB")
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        self._handle_line(line)
        finally:
            resp.close()

    def _handle_line(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise K8sError(f"malformed watch line: {line[:120]!r}") from exc
        typ = msg.get("type")
        obj = msg.get("object") or {}
        if typ == "ERROR":
            code = obj.get("code")
            text = obj.get("message") or obj.get("reason") or "watch error"
            if code == 410:
                raise Gone(f"410 Gone: {text}", 410)
            raise K8sError(f"watch error ({code}): {text}", code if isinstance(code, int) else None)
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if typ == "BOOKMARK":
            # nothing changed for us up to rv: resuming from here spares a relist after a
            # compaction of events that were never ours
            if rv:
                self.resource_version = rv
                self.bookmarks += 1
                self._gone_streak = 0
            return
        if typ not in ("ADDED", "MODIFIED", "DELETED"):
            self.log.warning("k8s_watch_unknown_event", watch_type=typ)
            return
        self._apply(typ, PodEvent.from_pod(typ, obj, self.api.pod_name))
        if rv:
            self.resource_version = rv
        self._gone_streak = 0

    def _apply(self, raw_type: str, ev: PodEvent) -> None:
        """Fold one observed pod state into what we delivered; deliver what changed."""
        key = (ev.pod, ev.resource_version)
        if key in self._seen:
            self.suppressed += 1
            return
        prev = self._pods.get(ev.pod)
        if raw_type == "DELETED":
            if prev is None or (prev.uid and ev.uid and prev.uid != ev.uid):
                self.suppressed += 1  # already gone for us, or an older incarnation
                return
            self._deliver(replace(ev, type="DELETED"))
            return
        if prev is None:
            self._deliver(replace(ev, type="ADDED"))
        elif prev.uid and ev.uid and prev.uid != ev.uid:
            # same name, new pod (the StatefulSet recreated it while we were not looking)
            self._deliver(replace(prev, type="DELETED", resource_version=ev.resource_version))
            self._deliver(replace(ev, type="ADDED"))
        elif prev.facts() != ev.facts():
            self._deliver(replace(ev, type="MODIFIED"))
        else:
            self._pods[ev.pod] = replace(prev, resource_version=ev.resource_version)
            self._remember(key)
            self.suppressed += 1

    def _remember(self, key: tuple[str, str]) -> None:
        self._seen[key] = None
        while len(self._seen) > self.SEEN_MAX:
            self._seen.popitem(last=False)

    def _deliver(self, ev: PodEvent) -> None:
        if ev.type == "DELETED":
            self._pods.pop(ev.pod, None)
        else:
            self._pods[ev.pod] = ev
        self._remember((ev.pod, ev.resource_version))
        self.delivered += 1
        try:
            self.on_event(ev)
        except Exception:
            self.log.exception("k8s_on_event_failed", pod=ev.pod, change=ev.type)


# --------------------------------------------------------------------------- role label


class _Unknown(enum.Enum):
    """The label was never read nor written: unlike None (no label), it differs from every role."""

    UNKNOWN = "unknown"


_UNKNOWN: Final = _Unknown.UNKNOWN


class PodLabeler(_ApiLoop):
    """Keeps the own pod's role label equal to the latest ``set_role``.

    ``set_role`` returns at once; a background task patches, retries with backoff, and sends
    only the latest desired value (a demotion that follows a promotion before the first patch
    went out sends one patch). The label follows the lease: the agent calls ``set_role`` on
    every transition and once at start-up, so labels left by a previous life are corrected."""

    TASK_NAME = "k8s-pod-labeler"

    def __init__(
        self,
        settings: KubernetesSettings,
        log: Any,
        *,
        api: KubeApi | None = None,
        backoff_min: float = 0.2,
        backoff_max: float = 10.0,
    ) -> None:
        self.settings = settings
        self.log = log
        self._own_api = api is None
        self.api = api or KubeApi(settings)
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self._desired: str | None | _Unknown = _UNKNOWN
        self._applied: str | None | _Unknown = _UNKNOWN
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.problem: str | None = None
        self.patches = 0
        self.failures = 0

    @property
    def available(self) -> bool:
        return self.problem is None

    @property
    def desired(self) -> str | None:
        return None if self._desired is _UNKNOWN else self._desired

    @property
    def applied(self) -> str | None:
        return None if self._applied is _UNKNOWN else self._applied

    def set_role(self, role: Role | None) -> None:
        if role is not None and role not in ROLE_VALUES:
            raise ValueError(f"role label must be one of {ROLE_VALUES} or None, not {role!r}")
        self._desired = role
        self._settled.clear()  # the loop sets it again once the label says ``role``
        self._wake.set()

    def observe(self, ev: PodEvent) -> None:
        """Feed own-pod events from the watcher: a label changed behind our back (or a
        recreated pod without it) is put back."""
        if not ev.own or ev.type == "DELETED" or self._desired is _UNKNOWN:
            return
        if ev.role != self._desired and self._applied == self._desired:
            self._applied = _UNKNOWN
            self._settled.clear()
            self._wake.set()

    async def wait_applied(self, seconds: float) -> bool:
        """True once the label equals the latest desired role, within ``seconds``."""
        try:
            await bounded(self._settled.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _learn_current(self) -> None:
        """Read the pod's current label once: no patch when it already says the right thing,
        and a wrong kubernetes.pod_name shows up in the log at start."""
        pod = self.api.pod_name
        if pod is None:
            return
        try:
            obj = await bounded(self.api.get_pod(pod), self.api.request_timeout * 2)
        except (K8sError, TimeoutError) as exc:
            self.log.info("k8s_label_read_failed", pod=pod, problem=str(exc))
            return
        if self._applied is _UNKNOWN:
            self._applied = ((obj.get("metadata") or {}).get("labels") or {}).get(ROLE_LABEL)
            if self._desired is not _UNKNOWN and self._applied == self._desired:
                self._settled.set()

    async def _run(self) -> None:
        await self._learn_current()
        backoff = self.backoff_min
        while True:
            await self._wake.wait()
            self._wake.clear()
            # _UNKNOWN (label never read nor written) differs from every role: it is patched
            while self._desired is not _UNKNOWN and self._applied != self._desired:
                want = self._desired
                try:
                    pod = self.api.resolve().pod_name
                    if pod is None:
                        raise K8sUnavailable(
                            "own pod name unknown: set kubernetes.pod_name (or POD_NAME)"
                        )
                    await bounded(
                        self.api.patch_pod_labels(
                            pod, {ROLE_LABEL: None if want is None else str(want)}
                        ),
                        self.api.request_timeout * 2,
                    )
                except asyncio.CancelledError:
                    raise
                except (K8sError, TimeoutError) as exc:
                    self.failures += 1
                    if self.problem is None:
                        self.log.warning(
                            "k8s_role_label_failed", role=want, problem=str(exc), retry=True
                        )
                    self.problem = str(exc) or "timeout"
                    # a newer desired role cuts the wait short: it is the only one worth sending
                    with contextlib.suppress(TimeoutError):
                        await bounded(self._wake.wait(), backoff * random.uniform(0.5, 1.0))
                    self._wake.clear()
                    backoff = min(backoff * 2, self.backoff_max)
                    continue
                except Exception as exc:
                    self.log.exception("k8s_role_label_error")
                    self.problem = repr(exc)
                    await asyncio.sleep(self.backoff_max)
                    continue
                self.patches += 1
                backoff = self.backoff_min
                if self.problem is not None:
                    self.log.info("k8s_role_label_recovered", role=want)
                self.problem = None
                self._applied = want
            if self._desired is not _UNKNOWN and self._applied == self._desired:
                self._settled.set()


# --------------------------------------------------------------------------- pod killing


@dataclass(frozen=True)
class MemberHealth:
    """One member as the pod killer sees it."""

    member: str
    healthy: bool
    unhealthy_since: float | None = None  # agent's monotonic clock
    pod: str | None = None
    uid: str | None = None
    deleting: bool = False


@dataclass(frozen=True)
class KillDecision:
    victim: MemberHealth | None
    reason: str


def decide_pod_kill(
    *,
    enabled: bool,
    is_master: bool,
    own_member: str,
    own_pod: str | None,
    members: Sequence[MemberHealth],
    unhealthy_timeout: float,
    interval: float,
    last_kill_at: float | None,
    now: float,
) -> KillDecision:
    """Which pod (if any) the master deletes now, and why (or why not). Pure.

    ``members`` is every member known (DCS members and pods, ourselves included)."""
    if not enabled:
        return KillDecision(None, "pod killing is off (kubernetes.kill_unhealthy_pods)")
    if not is_master:
        return KillDecision(None, "only the master deletes pods")
    if last_kill_at is not None and now - last_kill_at < interval:
        return KillDecision(
            None,
            f"rate limit: last deletion {now - last_kill_at:.0f}s ago, interval {interval:.0f}s",
        )
    total = len(members)
    healthy = sum(1 for m in members if m.healthy)
    quorum = total // 2 + 1
    if healthy < quorum:
        return KillDecision(
            None, f"only {healthy} of {total} members healthy, below a quorum of {quorum}"
        )
    candidates = [
        m
        for m in members
        if not m.healthy
        and m.member != own_member
        and m.pod is not None
        and m.pod != own_pod
        and not m.deleting
        and m.unhealthy_since is not None
        and now - m.unhealthy_since >= unhealthy_timeout
    ]
    if not candidates:
        return KillDecision(
            None, f"no other member unhealthy for {unhealthy_timeout:.0f}s or longer"
        )
    victim = min(candidates, key=lambda m: (m.unhealthy_since, m.member))
    assert victim.unhealthy_since is not None
    return KillDecision(
        victim,
        f"member {victim.member} unhealthy for {now - victim.unhealthy_since:.0f}s "
        f"(limit {unhealthy_timeout:.0f}s); {healthy} of {total} members healthy",
    )


class PodKiller:
    """Tracks how long each member has been unhealthy; the master deletes a hopeless one.

    Feed it ``observe_pod`` (watcher events) and ``observe_health`` (from the DCS view, on each
    change); call ``maybe_kill`` when a timer or a change fires. A member whose pod exists but
    that has no health entry (its agent publishes nothing) counts as unhealthy."""

    def __init__(
        self,
        settings: KubernetesSettings,
        log: Any,
        *,
        own_member: str,
        api: KubeApi | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.log = log
        self.own_member = own_member
        self._own_api = api is None
        self.api = api or KubeApi(settings)
        self.clock = clock
        self._pods: dict[str, PodEvent] = {}  # member -> its pod
        self._health: dict[str, bool] = {}
        self._since: dict[str, float] = {}
        self.last_kill_at: float | None = None

    def observe_pod(self, ev: PodEvent, now: float | None = None) -> None:
        prev = self._pods.get(ev.member)
        if ev.type == "DELETED":
            if prev is not None and prev.pod == ev.pod:
                self._pods.pop(ev.member, None)
                self._since.pop(ev.member, None)  # a new pod gets a full timeout again
        else:
            if prev is not None and prev.uid != ev.uid:
                self._since.pop(ev.member, None)
            self._pods[ev.member] = ev
        self._refresh(self.clock() if now is None else now)

    def observe_health(self, health: Mapping[str, bool], now: float | None = None) -> None:
        """``health``: member -> healthy. Healthy means its PostgreSQL serves its role, or its
        agent is actively repairing it (cloning, rewinding): never kill a member mid-repair."""
        self._health = dict(health)
        self._refresh(self.clock() if now is None else now)

    def _refresh(self, now: float) -> None:
        members = set(self._members())
        for name in members:
            if self._is_healthy(name):
                self._since.pop(name, None)
            else:
                self._since.setdefault(name, now)
        for name in set(self._since) - members:
            del self._since[name]

    def _members(self) -> Iterable[str]:
        return set(self._health) | set(self._pods)

    def _is_healthy(self, name: str) -> bool:
        return self._health.get(name, False)

    def snapshot(self) -> list[MemberHealth]:
        out = []
        for name in sorted(self._members()):
            pod = self._pods.get(name)
            out.append(
                MemberHealth(
                    member=name,
                    healthy=self._is_healthy(name),
                    unhealthy_since=self._since.get(name),
                    pod=pod.pod if pod else None,
                    uid=pod.uid if pod else None,
                    deleting=pod.deleting if pod else False,
                )
            )
        return out

    def decide(self, *, is_master: bool, now: float | None = None) -> KillDecision:
        now = self.clock() if now is None else now
        return decide_pod_kill(
            enabled=self.settings.kill_unhealthy_pods,
            is_master=is_master,
            own_member=self.own_member,
            own_pod=self.api.pod_name,
            members=self.snapshot(),
            unhealthy_timeout=self.settings.unhealthy_pod_timeout,
            interval=self.settings.pod_kill_interval,
            last_kill_at=self.last_kill_at,
            now=now,
        )

    async def maybe_kill(
        self, *, is_master: bool, now: float | None = None
    ) -> dict[str, Any] | None:
        """Delete one pod if the rules allow it; return the ``action`` record body, or None.
        Never raises: a failed deletion is an action with outcome "failed"."""
        now = self.clock() if now is None else now
        decision = self.decide(is_master=is_master, now=now)
        victim = decision.victim
        if victim is None or victim.pod is None:
            return None
        # the attempt counts against the rate limit even if it fails: a refused deletion is
        # not hammered on
        self.last_kill_at = now
        body: dict[str, Any] = {
            "name": "delete_pod",
            "pod": victim.pod,
            "member": victim.member,
            "uid": victim.uid,
            "reason": decision.reason,
            "unhealthy_for": round(now - (victim.unhealthy_since or now), 3),
        }
        started = time.monotonic()
        try:
            await bounded(self.api.delete_pod(victim.pod, victim.uid), self.api.request_timeout * 2)
        except (K8sError, TimeoutError) as exc:
            body.update(
                outcome="failed", error=str(exc) or "timeout", status=getattr(exc, "status", None)
            )
            self.log.warning("k8s_pod_delete_failed", pod=victim.pod, problem=body["error"])
        else:
            body["outcome"] = "ok"
            pod = self._pods.get(victim.member)
            if pod is not None:
                self._pods[victim.member] = replace(pod, deleting=True)
            self.log.warning(
                "k8s_pod_deleted", pod=victim.pod, member=victim.member, reason=decision.reason
            )
        body["duration"] = round(time.monotonic() - started, 3)
        return body

    async def close(self) -> None:
        if self._own_api:
            await self.api.close()
