"""A strict in-process emulator of the parts of Consul's HTTP API that pgsidecar uses.

Tests only: it never ships (tests/ is not a package of the distribution). There is no Consul
package on these machines, so the Consul backend (events/dcs/consul.py) and the DCS contract suite
run against this emulator; when a ``consul`` binary is on PATH they also run against
``consul agent -dev`` (tests/support/fixtures_consul.py).

What it implements, following Consul's API documentation (api-docs/session, kv,
features/blocking, agent/service, catalog, health, status):

* sessions: create (Name, Node, LockDelay, Checks/NodeChecks/ServiceChecks, Behavior, TTL),
  renew (404 once gone), destroy, info, list, node; invalidation when the TTL lapses, when the
  session is destroyed, when one of its checks turns critical or when the agent's node leaves;
  on invalidation the session's behavior (release: keys lose their Session; delete: keys are
  deleted) and its lock-delay (``?acquire=`` on those keys is refused for that long).
* KV: GET (recurse, keys, separator, raw, blocking ``index``/``wait``), PUT (acquire, release,
  cas, flags; answers ``true``/``false``), DELETE (cas, recurse). Entries carry CreateIndex,
  ModifyIndex, LockIndex, Flags, Key, Value (base64), Session. One raft index increases on every
  write; the X-Consul-Index of a recursive read is the highest ModifyIndex of the prefix or of
  its tombstones, as in Consul (so reaping tombstones can make it go backwards).
* blocking queries: a request with ``?index=N`` waits until the result's index exceeds N or
  ``wait`` (default 5 min, at most 10 min, plus up to wait/16 of jitter) passes; an index that
  would be 0 is reported as 1.
* agent services with an HTTP check (run for real against its URL: 2xx passing, 429 warning,
  anything else critical), catalog and health views of them, /v1/status/leader.
* ACLs: when started with a token, a request without a token is refused with 403 "Permission
  denied" and one with another token with 403 "ACL not found" (status endpoints are exempt).

Where it is deliberately *stricter* than Consul (so that anything it accepts, Consul accepts):
an unknown query parameter, a repeated one, a boolean flag given a value other than
``""``/``1``/``true`` (Consul treats ``?recurse=false`` as *true*), a ``?token=`` in the URL
(Consul accepts it, but a token in a URL ends up in logs), ``cas`` combined with
``acquire``/``release`` (Consul silently ignores the cas), and unknown JSON body fields are all
refused with 400. Field names in JSON bodies match case-insensitively, as Go's decoder does.

Status codes are Consul's: a session TTL out of range, a bad Behavior or an ``?acquire=`` with
an unknown session are 500s (server-side RPC errors), not 400s; a renew of a gone session is 404.

Where it deviates on purpose: the minimum session TTL is a constructor argument (``min_ttl``,
Consul's server option ``session_ttl_min``, default 10 s) so that expiry tests do not take
20 s; and the moment a lapsed session is actually invalidated is ``ttl * ttl_multiplier``
(default 1; Consul promises never before the TTL and may take up to twice the TTL, so tests of
the worst case use 2).

Hooks for fault tests: ``stop_listener()``/``start_listener()`` (connection refused, same port),
``restart_agent()`` (the node leaves and rejoins: every session is invalidated),
``gossip_blip()`` (serfHealth turns critical for a moment), ``snapshot()``/``restore()`` (a raft
snapshot restore: indexes go backwards), ``reap_tombstones()``, ``inject_failure()`` (errors or
garbage on the next requests), ``latency``, ``force_index_zero`` and ``ignore_blocking``
(misbehaving servers, for the index sanity and rate-limit rules).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import logging
import random
import re
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

log = logging.getLogger(__name__)

DEFAULT_MIN_TTL = 10.0
MAX_TTL = 86400.0
MAX_LOCK_DELAY = 60.0
DEFAULT_LOCK_DELAY = 15.0
MAX_VALUE_SIZE = 512 * 1024
DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
DEFAULT_CHECK_TIMEOUT = 10.0
SERF_CHECK = "serfHealth"
NODE_NAME = "emulator-node"
DATACENTER = "dc1"
SERVER_ADDR = "127.0.0.1:8300"

# -- Go's time.ParseDuration, which Consul uses for every duration string ------------------------
_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UINT = re.compile(r"^[0-9]+$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def parse_duration(text: str) -> float:
    """Seconds of a Go duration string ("10s", "1m30s", "250ms", "0"). Raises ValueError."""
    s = text
    sign = 1.0
    if s[:1] in ("+", "-"):
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f'time: invalid duration "{text}"')
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            raise ValueError(f'time: invalid duration "{text}"')
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def _go_duration(seconds: float) -> str:
    return f"{seconds:g}s"


class Reply(Exception):
    """Raised by handlers: becomes an HTTP response with a plain-text body, as Consul's are."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"{status} {body}")
        self.status = status
        self.body = body


# query parameter kinds
BOOL, UINT, DURATION, STR, MULTI = "bool", "uint", "duration", "str", "multi"
_READ = {"dc": STR, "index": UINT, "wait": DURATION, "stale": BOOL, "consistent": BOOL}
_WRITE = {"dc": STR}


@dataclass
class KVEntry:
    key: str
    value: bytes | None
    flags: int
    create_index: int
    modify_index: int
    lock_index: int = 0
    session: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "LockIndex": self.lock_index,
            "Key": self.key,
            "Flags": self.flags,
            # Consul stores an empty PUT body as nil, which Go encodes as null
            "Value": base64.b64encode(self.value).decode("ascii") if self.value else None,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }
        if self.session:
            out["Session"] = self.session
        return out


@dataclass
class Session:
    id: str
    name: str
    node: str
    lock_delay: float
    behavior: str
    ttl: str
    ttl_seconds: float
    node_checks: list[str]
    service_checks: list[dict[str, str]] | None
    create_index: int
    modify_index: int
    timer: asyncio.TimerHandle | None = None
    last_renew: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Name": self.name,
            "Node": self.node,
            "LockDelay": int(self.lock_delay * 1e9),
            "Behavior": self.behavior,
            "TTL": self.ttl,
            "NodeChecks": list(self.node_checks),
            "ServiceChecks": copy.deepcopy(self.service_checks),
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class Check:
    id: str
    name: str
    service_id: str
    http: str | None
    interval: float
    timeout: float
    deregister_after: float | None
    definition: dict[str, Any]
    status: str = "critical"
    output: str = ""
    critical_since: float | None = None
    create_index: int = 0
    modify_index: int = 0
    task: asyncio.Task[None] | None = None


@dataclass
class Service:
    id: str
    name: str
    tags: list[str]
    address: str
    port: int
    meta: dict[str, str]
    enable_tag_override: bool
    weights: dict[str, int]
    create_index: int
    modify_index: int
    check_ids: list[str] = field(default_factory=list)


@dataclass
class _Failure:
    status: int
    body: str
    remaining: int
    path_prefix: str
    content_type: str
    method: str | None


def _norm(name: str) -> str:
    """Go's JSON decoding matches field names case-insensitively; Consul also translates
    snake_case aliases. Both fold to one spelling here."""
    return name.replace("_", "").lower()


def _decode_object(raw: bytes, allowed: Mapping[str, str], what: str) -> dict[str, Any]:
    """Parse a JSON object body; returns {canonical field: value}. Unknown fields are a 400."""
    if not raw.strip():
        return {}
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Reply(400, f"Request decode failed: {exc}") from None
    if not isinstance(obj, dict):
        raise Reply(400, f"Request decode failed: {what} must be a JSON object")
    lookup = {_norm(k): k for k in allowed}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        canonical = lookup.get(_norm(key))
        if canonical is None:
            raise Reply(400, f'Request decode failed: json: unknown field "{key}"')
        if canonical in out:
            raise Reply(400, f'Request decode failed: duplicate field "{key}"')
        out[canonical] = value
    return out


def _expect(value: Any, kind: type | tuple[type, ...], name: str) -> Any:
    # bool is an int in Python, never in Go's JSON decoder
    if isinstance(value, bool) and kind is not bool:
        raise Reply(400, f"Request decode failed: {name}: cannot unmarshal bool")
    if not isinstance(value, kind):
        raise Reply(400, f"Request decode failed: {name}: cannot unmarshal {type(value).__name__}")
    return value


def _str_list(value: Any, name: str) -> list[str] | None:
    if value is None:
        return None
    _expect(value, list, name)
    for item in value:
        _expect(item, str, name)
    return list(value)


def _duration_field(value: Any, name: str) -> float:
    _expect(value, str, name)
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise Reply(400, f"Request decode failed: {name}: {exc}") from None


class ConsulEmulator:
    """One Consul agent (and its server) on a loopback port. Start with ``await start()``."""

    def __init__(
        self,
        *,
        acl_token: str | None = None,
        min_ttl: float = DEFAULT_MIN_TTL,
        ttl_multiplier: float = 1.0,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        start_index: int = 100,
        critical_reap_min: float = 60.0,
    ) -> None:
        self.acl_token = acl_token
        self.min_ttl = min_ttl
        self.ttl_multiplier = ttl_multiplier
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.critical_reap_min = critical_reap_min
        self.datacenter = DATACENTER
        self.node = NODE_NAME
        self.node_id = str(uuid.uuid4())

        # store
        self.index = start_index
        self.kv: dict[str, KVEntry] = {}
        self.tombstones: dict[str, int] = {}
        self.kv_index = start_index
        self.lock_delays: dict[str, float] = {}
        self.sessions: dict[str, Session] = {}
        self.sessions_index = start_index
        self.services: dict[str, Service] = {}
        self.checks: dict[str, Check] = {}
        self.catalog_index = start_index
        self.serf_status = "passing"

        # fault knobs
        self.latency = 0.0
        self.force_index_zero = False
        self.ignore_blocking = False
        self.leaderless = False
        self._failures: list[_Failure] = []

        # observation
        self.requests: Counter[str] = Counter()
        self.request_log: list[tuple[str, str]] = []  # (method, path_qs)
        self.invalidations: list[tuple[str, str]] = []  # (session id, reason)

        self._changed = asyncio.Event()
        self._abandon = 0
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._probe_http: aiohttp.ClientSession | None = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def listening(self) -> bool:
        return self._site is not None

    async def start(self) -> None:
        await self.start_listener()

    async def stop(self) -> None:
        """Stop everything: listener, session timers, check probes."""
        self._closed = True
        await self.stop_listener()
        for s in self.sessions.values():
            if s.timer is not None:
                s.timer.cancel()
        tasks = [c.task for c in self.checks.values() if c.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, 2.0)
        if self._probe_http is not None:
            await self._probe_http.close()
            self._probe_http = None

    async def start_listener(self) -> None:
        """(Re)open the HTTP listener on the same port: clients can connect again."""
        if self._site is not None:
            return
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_VALUE_SIZE * 4)
        self._routes(app)
        # a short shutdown_timeout: stop_listener() must cut blocking queries like a crash would
        # handler_cancellation: a client that hangs up ends its blocking query, as in Consul
        runner = web.AppRunner(
            app, shutdown_timeout=0.2, access_log=None, handler_cancellation=True
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.ssl_context)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        if self.port == 0:
            server = site._server  # the bound socket tells which free port the OS chose
            assert isinstance(server, asyncio.base_events.Server)
            self.port = server.sockets[0].getsockname()[1]
        self._runner, self._site = runner, site

    async def stop_listener(self) -> None:
        """Close the listener and every open connection: clients get connection refused.
        State (KV, sessions and their timers) lives on, as on a server whose agent is down."""
        runner, self._runner, self._site = self._runner, None, None
        if runner is not None:
            await asyncio.wait_for(runner.cleanup(), 10.0)

    async def __aenter__(self) -> ConsulEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- fault hooks ----------------------------------------------------------------------------
    async def restart_agent(self, downtime: float = 0.0) -> None:
        """The local agent restarts: its node leaves the cluster (every session bound to it is
        invalidated, whatever its checks) and the listener is down for ``downtime`` seconds."""
        await self.stop_listener()
        for sid in [s.id for s in self.sessions.values() if s.node == self.node]:
            self.invalidate_session(sid, "node left (agent restart)")
        if downtime > 0:
            await asyncio.sleep(downtime)
        await self.start_listener()

    def gossip_blip(self) -> list[str]:
        """serfHealth goes critical for a moment (a missed gossip probe) and recovers. Returns
        the ids of the sessions this invalidated (those that include serfHealth)."""
        victims = [s.id for s in self.sessions.values() if SERF_CHECK in s.node_checks]
        self.serf_status = "critical"
        self._bump()
        for sid in victims:
            self.invalidate_session(sid, "serfHealth critical")
        self.serf_status = "passing"
        self._bump()
        return victims

    def snapshot(self) -> dict[str, Any]:
        """The KV store as a raft snapshot would hold it."""
        return {
            "kv": copy.deepcopy(self.kv),
            "tombstones": dict(self.tombstones),
            "kv_index": self.kv_index,
        }

    def restore(self, snap: Mapping[str, Any]) -> None:
        """Restore a snapshot: KV data and its indexes go back; every blocking query returns at
        once (Consul abandons them on restore)."""
        self.kv = copy.deepcopy(snap["kv"])
        self.tombstones = dict(snap["tombstones"])
        self.kv_index = int(snap["kv_index"])
        for e in self.kv.values():
            if e.session and e.session not in self.sessions:
                e.session = None
        self._abandon += 1
        self._notify()

    def reap_tombstones(self) -> None:
        """Consul reaps KV tombstones after a while: a recursive read's index may go back."""
        self.tombstones.clear()
        self._notify()

    def inject_failure(
        self,
        status: int = 500,
        body: str = "rpc error: injected failure",
        count: int = 1,
        path_prefix: str = "/v1/",
        content_type: str = "text/plain",
        method: str | None = None,
    ) -> None:
        """Answer the next ``count`` requests under ``path_prefix`` (and of ``method``, if given)
        with ``status``/``body`` (status 200 with a non-JSON body emulates garbage)."""
        self._failures.append(_Failure(status, body, count, path_prefix, content_type, method))

    def invalidate_session(self, session_id: str, reason: str = "invalidated") -> bool:
        """Invalidate one session now, applying its behavior and lock-delay."""
        s = self.sessions.pop(session_id, None)
        if s is None:
            return False
        if s.timer is not None:
            s.timer.cancel()
        idx = self._next_index()
        self.sessions_index = idx
        now = time.monotonic()
        touched = False
        for key, e in list(self.kv.items()):
            if e.session != session_id:
                continue
            touched = True
            if s.behavior == "delete":
                del self.kv[key]
                self.tombstones[key] = idx
            else:
                e.session = None
                e.modify_index = idx
            if s.lock_delay > 0:
                self.lock_delays[key] = now + s.lock_delay
        if touched:
            self.kv_index = idx
        self.invalidations.append((session_id, reason))
        log.debug("emulator: session %s invalidated (%s)", session_id, reason)
        self._notify()
        return True

    def kv_entry(self, key: str) -> KVEntry | None:
        return self.kv.get(key)

    @property
    def pending_failures(self) -> int:
        return sum(f.remaining for f in self._failures)

    def clear_requests(self) -> None:
        self.requests.clear()
        self.request_log.clear()

    # -- internals ------------------------------------------------------------------------------
    def _next_index(self) -> int:
        self.index += 1
        return self.index

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _bump(self) -> int:
        idx = self._next_index()
        self._notify()
        return idx

    def _routes(self, app: web.Application) -> None:
        r = app.router
        r.add_route("*", "/v1/kv/{key:.*}", self._kv)
        r.add_route("*", "/v1/session/create", self._method("PUT", self._session_create))
        r.add_route("*", "/v1/session/renew/{id:.*}", self._method("PUT", self._session_renew))
        r.add_route("*", "/v1/session/destroy/{id:.*}", self._method("PUT", self._session_destroy))
        r.add_route("*", "/v1/session/info/{id:.*}", self._method("GET", self._session_info))
        r.add_route("*", "/v1/session/list", self._method("GET", self._session_list))
        r.add_route("*", "/v1/session/node/{node:.*}", self._method("GET", self._session_node))
        r.add_route("*", "/v1/agent/service/register", self._method("PUT", self._service_register))
        r.add_route(
            "*",
            "/v1/agent/service/deregister/{id:.*}",
            self._method("PUT", self._service_deregister),
        )
        r.add_route("*", "/v1/agent/services", self._method("GET", self._agent_services))
        r.add_route("*", "/v1/agent/checks", self._method("GET", self._agent_checks))
        r.add_route(
            "*", "/v1/catalog/service/{name:.*}", self._method("GET", self._catalog_service)
        )
        r.add_route("*", "/v1/health/service/{name:.*}", self._method("GET", self._health_service))
        r.add_route("*", "/v1/status/leader", self._method("GET", self._status_leader))
        r.add_route("*", "/v1/status/peers", self._method("GET", self._status_peers))

    def _method(
        self, method: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            if request.method != method:
                raise Reply(405, f"method {request.method} not allowed")
            return await handler(request)

        return wrapped

    @web.middleware
    async def _middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        self.requests[request.path] += 1
        self.request_log.append((request.method, request.path_qs))
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        try:
            for f in self._failures:
                if (
                    f.remaining > 0
                    and request.path.startswith(f.path_prefix)
                    and f.method in (None, request.method)
                ):
                    f.remaining -= 1
                    self._failures = [x for x in self._failures if x.remaining > 0]
                    return web.Response(status=f.status, text=f.body, content_type=f.content_type)
            if "token" in request.query:
                raise Reply(
                    400,
                    "the emulator refuses ?token=: send the X-Consul-Token header (a token in a "
                    "URL ends up in access logs and error messages)",
                )
            self._check_acl(request)
            return await handler(request)
        except Reply as reply:
            return web.Response(status=reply.status, text=reply.body)
        except web.HTTPException:
            raise
        except Exception:  # an emulator bug must show up as a 500, as a server's would
            log.exception("emulator: handler failed")
            return web.Response(status=500, text="emulator internal error")

    def _check_acl(self, request: web.Request) -> None:
        if self.acl_token is None or request.path.startswith("/v1/status/"):
            return
        token = request.headers.get("X-Consul-Token")
        auth = request.headers.get("Authorization", "")
        if token is None and auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        if not token:
            raise Reply(
                403, f'Permission denied: anonymous token lacks permission on "{request.path}"'
            )
        if token != self.acl_token:
            raise Reply(403, "ACL not found")

    def _params(self, request: web.Request, spec: Mapping[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in set(request.query.keys()):
            values = request.query.getall(name)
            kind = spec.get(name)
            if kind is None:
                raise Reply(
                    400,
                    f"unsupported query parameter {name!r} on {request.path} (the emulator "
                    f"refuses what Consul would silently ignore)",
                )
            if kind != MULTI and len(values) > 1:
                raise Reply(400, f"query parameter {name!r} given {len(values)} times")
            value = values[0]
            if kind == BOOL:
                # Consul only checks presence: ?recurse=false would mean recurse
                if value not in ("", "1", "true", "True"):
                    raise Reply(400, f"invalid value for flag {name!r}: {value!r}")
                out[name] = True
            elif kind == UINT:
                if not _UINT.match(value) or int(value) >= 2**64:
                    raise Reply(400, f"Invalid {name}: {value!r} is not an unsigned integer")
                out[name] = int(value)
            elif kind == DURATION:
                try:
                    seconds = parse_duration(value)
                except ValueError:
                    raise Reply(400, "Invalid wait time") from None
                if seconds < 0:
                    raise Reply(400, "Invalid wait time")
                out[name] = seconds
            elif kind == MULTI:
                out[name] = list(values)
            else:
                out[name] = value
        if out.get("stale") and out.get("consistent"):
            raise Reply(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
        if "dc" in out and out["dc"] != self.datacenter:
            raise Reply(500, "No path to datacenter")
        return out

    async def _blocking(
        self, params: Mapping[str, Any], compute: Callable[[], tuple[int, Any]]
    ) -> tuple[int, Any]:
        """Run ``compute`` (-> (index, result)) as a blocking query."""
        if self.force_index_zero:
            # the Consul bug the docs warn about: the query's own index is 0, so it blocks on
            # any index >= 0 and answers 0
            inner = compute

            def compute() -> tuple[int, Any]:
                return 0, inner()[1]

        idx, result = compute()
        min_index = params.get("index", 0)
        if not min_index or self.ignore_blocking:
            return idx, result
        wait = params.get("wait") or DEFAULT_WAIT
        wait = min(wait, MAX_WAIT)
        wait += random.uniform(0, wait / 16)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        abandon = self._abandon
        while idx <= min_index and abandon == self._abandon:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
            idx, result = compute()
        return idx, result

    def _index_headers(self, idx: int) -> dict[str, str]:
        idx = 0 if self.force_index_zero else max(idx, 1)
        return {
            "X-Consul-Index": str(idx),
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
        }

    def _json(self, data: Any, status: int = 200, index: int | None = None) -> web.Response:
        headers = self._index_headers(index) if index is not None else None
        return web.Response(
            status=status,
            text=json.dumps(data),
            content_type="application/json",
            headers=headers,
        )

    # -- KV -------------------------------------------------------------------------------------
    async def _kv(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        if request.method == "GET":
            return await self._kv_get(request, key)
        if request.method == "PUT":
            return await self._kv_put(request, key)
        if request.method == "DELETE":
            return await self._kv_delete(request, key)
        raise Reply(405, f"method {request.method} not allowed")

    def _list_index(self, prefix: str, entries: list[KVEntry]) -> int:
        # Consul's kvsListTxn: the highest ModifyIndex under the prefix, or of its tombstones;
        # the whole table's index when neither exists (or when the prefix is empty)
        lindex = max((e.modify_index for e in entries), default=0)
        if prefix:
            gindex = max((i for k, i in self.tombstones.items() if k.startswith(prefix)), default=0)
            lindex = max(lindex, gindex)
        else:
            lindex = self.kv_index
        return lindex or self.kv_index

    async def _kv_get(self, request: web.Request, key: str) -> web.StreamResponse:
        params = self._params(
            request, {**_READ, "recurse": BOOL, "raw": BOOL, "keys": BOOL, "separator": STR}
        )
        keys_only = params.get("keys", False)
        recurse = params.get("recurse", False) or keys_only
        if params.get("raw") and recurse:
            raise Reply(400, "?raw cannot be combined with ?recurse or ?keys")
        if "separator" in params and not keys_only:
            raise Reply(400, "?separator is only used with ?keys")
        if not key and not recurse:
            raise Reply(400, "Missing key name")

        if recurse:

            def compute() -> tuple[int, Any]:
                entries = [e for k, e in sorted(self.kv.items()) if k.startswith(key)]
                return self._list_index(key, entries), entries

        else:

            def compute() -> tuple[int, Any]:
                return self.kv_index, self.kv.get(key)

        idx, result = await self._blocking(params, compute)
        headers = self._index_headers(idx)
        if keys_only:
            sep = params.get("separator")
            names: list[str] = []
            for e in result:
                name = e.key
                if sep:
                    cut = name.find(sep, len(key))
                    if cut >= 0:
                        name = name[: cut + len(sep)]
                if not names or names[-1] != name:
                    names.append(name)
            if not names:
                return web.Response(status=404, headers=headers)
            return web.Response(
                text=json.dumps(names), content_type="application/json", headers=headers
            )
        if recurse:
            if not result:
                return web.Response(status=404, headers=headers)
            return web.Response(
                text=json.dumps([e.to_json() for e in result]),
                content_type="application/json",
                headers=headers,
            )
        if result is None:
            return web.Response(status=404, headers=headers)
        if params.get("raw"):
            return web.Response(
                body=result.value or b"", content_type="text/plain", headers=headers
            )
        return web.Response(
            text=json.dumps([result.to_json()]), content_type="application/json", headers=headers
        )

    def _write_entry(self, key: str, value: bytes | None, flags: int, idx: int) -> KVEntry:
        e = self.kv.get(key)
        if e is None:
            e = KVEntry(key, value, flags, create_index=idx, modify_index=idx)
            self.kv[key] = e
        else:
            e.value, e.flags, e.modify_index = value, flags, idx
        self.kv_index = idx
        return e

    async def _kv_put(self, request: web.Request, key: str) -> web.StreamResponse:
        params = self._params(
            request, {**_WRITE, "flags": UINT, "cas": UINT, "acquire": STR, "release": STR}
        )
        if not key:
            raise Reply(400, "Missing key name")
        if key.startswith("/"):
            raise Reply(400, "key must not start with a slash")
        if "acquire" in params and "release" in params:
            raise Reply(400, "?acquire and ?release given together")
        if "cas" in params and ("acquire" in params or "release" in params):
            raise Reply(
                400,
                "?cas cannot be combined with ?acquire/?release: Consul would ignore the cas "
                "(the emulator refuses it)",
            )
        if request.content_length is not None and request.content_length > MAX_VALUE_SIZE:
            raise Reply(413, f"Request body too large, max size: {MAX_VALUE_SIZE} bytes")
        body = await request.read()
        if len(body) > MAX_VALUE_SIZE:
            raise Reply(413, f"Request body too large, max size: {MAX_VALUE_SIZE} bytes")
        value = body or None
        flags = params.get("flags", 0)
        existing = self.kv.get(key)

        if "acquire" in params:
            sid = params["acquire"]
            # Consul checks the lock-delay before it even looks at the session
            until = self.lock_delays.get(key)
            if until is not None and until > time.monotonic():
                return self._json(False)
            if not _UUID.match(sid) or sid not in self.sessions:
                raise Reply(500, f'invalid session "{sid}"')
            if existing is not None and existing.session and existing.session != sid:
                return self._json(False)
            idx = self._next_index()
            held_already = existing is not None and existing.session == sid
            e = self._write_entry(key, value, flags, idx)
            if not held_already:
                e.lock_index += 1
                e.session = sid
            self._notify()
            return self._json(True)

        if "release" in params:
            sid = params["release"]
            if existing is None or existing.session != sid:
                return self._json(False)
            idx = self._next_index()
            e = self._write_entry(key, value, flags, idx)
            e.session = None
            self._notify()
            return self._json(True)

        if "cas" in params:
            cas = params["cas"]
            if cas == 0 and existing is not None:
                return self._json(False)
            if cas != 0 and (existing is None or existing.modify_index != cas):
                return self._json(False)
        idx = self._next_index()
        self._write_entry(key, value, flags, idx)  # session and LockIndex are kept
        self._notify()
        return self._json(True)

    async def _kv_delete(self, request: web.Request, key: str) -> web.StreamResponse:
        params = self._params(request, {**_WRITE, "recurse": BOOL, "cas": UINT})
        if "recurse" in params and "cas" in params:
            raise Reply(400, "?cas cannot be combined with ?recurse (Consul would ignore it)")
        if params.get("recurse"):
            victims = [k for k in self.kv if k.startswith(key)]
            if victims:
                idx = self._next_index()
                for k in victims:
                    del self.kv[k]
                    self.tombstones[k] = idx
                self.kv_index = idx
                self._notify()
            return self._json(True)
        if not key:
            raise Reply(400, "Missing key name")
        existing = self.kv.get(key)
        if "cas" in params:
            # Consul's kvsDeleteCASTxn: "deleted" is true for a key that does not exist
            if existing is None:
                return self._json(True)
            if params["cas"] == 0 or existing.modify_index != params["cas"]:
                return self._json(False)
        if existing is not None:
            idx = self._next_index()
            del self.kv[key]
            self.tombstones[key] = idx
            self.kv_index = idx
            self._notify()
        return self._json(True)

    # -- sessions -------------------------------------------------------------------------------
    _SESSION_FIELDS = {
        "Name": "str",
        "Node": "str",
        "LockDelay": "duration|number",
        "Checks": "list",
        "NodeChecks": "list",
        "ServiceChecks": "list",
        "Behavior": "str",
        "TTL": "str",
    }

    async def _session_create(self, request: web.Request) -> web.StreamResponse:
        self._params(request, _WRITE)
        body = _decode_object(await request.read(), self._SESSION_FIELDS, "session")
        name = _expect(body.get("Name", ""), str, "Name")
        node = _expect(body.get("Node", "") or self.node, str, "Node")
        behavior = _expect(body.get("Behavior", "") or "release", str, "Behavior")
        ttl = _expect(body.get("TTL", ""), str, "TTL")

        lock_delay = DEFAULT_LOCK_DELAY
        if "LockDelay" in body:
            raw = body["LockDelay"]
            if isinstance(raw, str):
                try:
                    lock_delay = parse_duration(raw)
                except ValueError as exc:
                    raise Reply(400, f"Request decode failed: LockDelay: {exc}") from None
                if lock_delay < 1e-6:
                    # Consul's fix-up: below 1000 ns the number is taken as seconds ("5ns" = 5 s)
                    lock_delay = lock_delay * 1e9
            elif isinstance(raw, (int, float)) and not isinstance(raw, bool):
                # Consul: numbers below 1000 are seconds, larger ones nanoseconds
                lock_delay = float(raw) if raw < 1000 else raw / 1e9
            else:
                raise Reply(400, "Request decode failed: LockDelay: not a duration")
        if lock_delay < 0 or lock_delay > MAX_LOCK_DELAY:
            raise Reply(500, f"Lock delay must be between 0 and {MAX_LOCK_DELAY:g}s")

        # Consul >= 1.7: NodeChecks defaults to [serfHealth]; an explicit empty Checks (the
        # pre-1.7 way) or an empty NodeChecks removes it (fixupEmptySessionChecks)
        checks = _str_list(body.get("Checks"), "Checks") if "Checks" in body else [SERF_CHECK]
        node_checks = (
            _str_list(body.get("NodeChecks"), "NodeChecks")
            if "NodeChecks" in body
            else [SERF_CHECK]
        )
        if not checks:
            node_checks = []
            checks = []
        elif checks == [SERF_CHECK]:
            checks = []
        elif not node_checks:
            checks = []
        all_node_checks = list(dict.fromkeys([*(node_checks or []), *(checks or [])]))
        service_checks: list[dict[str, str]] | None = None
        if body.get("ServiceChecks") is not None:
            _expect(body["ServiceChecks"], list, "ServiceChecks")
            service_checks = []
            for item in body["ServiceChecks"]:
                _expect(item, dict, "ServiceChecks")
                sc = _decode_object(
                    json.dumps(item).encode(), {"ID": "str", "Namespace": "str"}, "ServiceCheck"
                )
                cid = _expect(sc.get("ID"), str, "ServiceChecks.ID")
                service_checks.append({"ID": cid, "Namespace": sc.get("Namespace", "")})

        if behavior not in ("release", "delete"):
            raise Reply(500, f"Invalid Behavior setting '{behavior}'")
        if node != self.node:
            raise Reply(500, f"Missing node registration for '{node}'")
        ttl_seconds = 0.0
        if ttl:
            try:
                ttl_seconds = parse_duration(ttl)
            except ValueError as exc:
                raise Reply(500, f"Session TTL '{ttl}' invalid: {exc}") from None
            # Consul answers this with a 500 (Patroni's client matches on it)
            if ttl_seconds != 0 and not (self.min_ttl <= ttl_seconds <= MAX_TTL):
                raise Reply(
                    500,
                    f"Invalid Session TTL '{int(ttl_seconds * 1e9)}', must be between "
                    f"[{_go_duration(self.min_ttl)}={_go_duration(MAX_TTL)}]",
                )
        for cid in all_node_checks:
            status = self._node_check_status(cid)
            if status is None:
                raise Reply(500, f"Missing check '{cid}' registration")
            if status == "critical":
                raise Reply(500, f"Check '{cid}' is in critical state")
        for sc in service_checks or []:
            chk = self.checks.get(sc["ID"])
            if chk is None:
                raise Reply(500, f"Missing check '{sc['ID']}' registration")
            if chk.status == "critical":
                raise Reply(500, f"Check '{sc['ID']}' is in critical state")

        idx = self._next_index()
        s = Session(
            id=str(uuid.uuid4()),
            name=name,
            node=node,
            lock_delay=lock_delay,
            behavior=behavior,
            ttl=ttl,
            ttl_seconds=ttl_seconds,
            node_checks=all_node_checks,
            service_checks=service_checks,
            create_index=idx,
            modify_index=idx,
        )
        self.sessions[s.id] = s
        self.sessions_index = idx
        self._arm(s)
        self._notify()
        return self._json({"ID": s.id})

    def _node_check_status(self, check_id: str) -> str | None:
        if check_id == SERF_CHECK:
            return self.serf_status
        chk = self.checks.get(check_id)
        return chk.status if chk is not None else None

    def _arm(self, s: Session) -> None:
        if s.timer is not None:
            s.timer.cancel()
            s.timer = None
        s.last_renew = time.monotonic()
        if s.ttl_seconds > 0:
            delay = s.ttl_seconds * self.ttl_multiplier
            s.timer = asyncio.get_running_loop().call_later(
                delay, self.invalidate_session, s.id, "TTL expired"
            )

    def _session_id(self, request: web.Request) -> str:
        sid = request.match_info["id"]
        if not sid:
            raise Reply(400, "Missing session")
        if not _UUID.match(sid):
            raise Reply(400, f"Session ID {sid!r} is not a valid UUID")
        return sid

    async def _session_renew(self, request: web.Request) -> web.StreamResponse:
        self._params(request, _WRITE)
        sid = self._session_id(request)
        s = self.sessions.get(sid)
        if s is None:
            raise Reply(404, f"Session id '{sid}' not found")
        self._arm(s)
        return self._json([s.to_json()])

    async def _session_destroy(self, request: web.Request) -> web.StreamResponse:
        self._params(request, _WRITE)
        sid = self._session_id(request)
        self.invalidate_session(sid, "destroyed")
        return self._json(True)

    async def _session_info(self, request: web.Request) -> web.StreamResponse:
        params = self._params(request, _READ)
        sid = self._session_id(request)

        def compute() -> tuple[int, Any]:
            s = self.sessions.get(sid)
            return self.sessions_index, [s.to_json()] if s else []

        idx, result = await self._blocking(params, compute)
        return self._json(result, index=idx)

    async def _session_list(self, request: web.Request) -> web.StreamResponse:
        params = self._params(request, _READ)

        def compute() -> tuple[int, Any]:
            return self.sessions_index, [s.to_json() for s in self.sessions.values()]

        idx, result = await self._blocking(params, compute)
        return self._json(result, index=idx)

    async def _session_node(self, request: web.Request) -> web.StreamResponse:
        params = self._params(request, _READ)
        node = request.match_info["node"]
        if not node:
            raise Reply(400, "Missing node name")

        def compute() -> tuple[int, Any]:
            return self.sessions_index, [
                s.to_json() for s in self.sessions.values() if s.node == node
            ]

        idx, result = await self._blocking(params, compute)
        return self._json(result, index=idx)

    # -- agent services and checks --------------------------------------------------------------
    _SERVICE_FIELDS = {
        "Name": "str",
        "ID": "str",
        "Tags": "list",
        "Address": "str",
        "Port": "int",
        "Meta": "dict",
        "Check": "dict",
        "Checks": "list",
        "EnableTagOverride": "bool",
        "Weights": "dict",
    }
    _CHECK_FIELDS = {
        "Name": "str",
        "CheckID": "str",
        "ID": "str",
        "HTTP": "str",
        "Method": "str",
        "Header": "dict",
        "Interval": "duration",
        "Timeout": "duration",
        "DeregisterCriticalServiceAfter": "duration",
        "TLSSkipVerify": "bool",
        "Status": "str",
        "Notes": "str",
    }

    async def _service_register(self, request: web.Request) -> web.StreamResponse:
        params = self._params(request, {"replace-existing-checks": BOOL})
        body = _decode_object(await request.read(), self._SERVICE_FIELDS, "service")
        name = body.get("Name")
        if not name:
            raise Reply(400, "Missing service name")
        _expect(name, str, "Name")
        sid = _expect(body.get("ID") or name, str, "ID")
        tags = _str_list(body.get("Tags"), "Tags") or []
        address = _expect(body.get("Address", ""), str, "Address")
        port = _expect(body.get("Port", 0), int, "Port")
        if not 0 <= port <= 65535:
            raise Reply(400, f"Invalid Service Port: {port}")
        meta = _expect(body.get("Meta") or {}, dict, "Meta")
        for k, v in meta.items():
            if not re.match(r"^[A-Za-z0-9_-]{1,128}$", k) or not isinstance(v, str):
                raise Reply(400, f"Invalid Service Meta: invalid key or value {k!r}")
        weights = _expect(body.get("Weights") or {"Passing": 1, "Warning": 1}, dict, "Weights")
        enable_override = _expect(body.get("EnableTagOverride", False), bool, "EnableTagOverride")

        definitions: list[dict[str, Any]] = []
        if body.get("Check") is not None:
            definitions.append(_expect(body["Check"], dict, "Check"))
        if body.get("Checks") is not None:
            for item in _expect(body["Checks"], list, "Checks"):
                definitions.append(_expect(item, dict, "Checks"))
        new_checks: list[Check] = []
        for i, raw in enumerate(definitions):
            d = _decode_object(json.dumps(raw).encode(), self._CHECK_FIELDS, "check")
            cid = d.get("CheckID") or d.get("ID")
            if not cid:
                cid = f"service:{sid}" + (f":{i + 1}" if len(definitions) > 1 else "")
            _expect(cid, str, "CheckID")
            http = d.get("HTTP")
            if http is None:
                raise Reply(
                    400,
                    "Invalid check: the emulator only runs HTTP checks (HTTP and Interval)",
                )
            _expect(http, str, "HTTP")
            if "Interval" not in d:
                raise Reply(400, "Invalid check: Interval must be > 0 for HTTP checks")
            interval = _duration_field(d["Interval"], "Interval")
            if interval <= 0:
                raise Reply(400, "Invalid check: Interval must be > 0 for HTTP checks")
            timeout = (
                _duration_field(d["Timeout"], "Timeout")
                if "Timeout" in d
                else DEFAULT_CHECK_TIMEOUT
            )
            dcsa = (
                _duration_field(
                    d["DeregisterCriticalServiceAfter"], "DeregisterCriticalServiceAfter"
                )
                if "DeregisterCriticalServiceAfter" in d
                else None
            )
            status = _expect(d.get("Status", "critical"), str, "Status")
            if status not in ("passing", "warning", "critical"):
                raise Reply(400, f"Invalid check status: {status!r}")
            new_checks.append(
                Check(
                    id=cid,
                    name=_expect(d.get("Name") or f"Service '{name}' check", str, "Name"),
                    service_id=sid,
                    http=http,
                    interval=interval,
                    timeout=timeout,
                    deregister_after=dcsa,
                    definition=raw,
                    status=status,
                )
            )

        idx = self._next_index()
        old = self.services.get(sid)
        service = Service(
            id=sid,
            name=name,
            tags=tags,
            address=address,
            port=port,
            meta=dict(meta),
            enable_tag_override=enable_override,
            weights=dict(weights),
            create_index=old.create_index if old else idx,
            modify_index=idx,
        )
        keep: list[str] = []
        if old is not None:
            new_ids = {c.id for c in new_checks}
            for cid in old.check_ids:
                if cid in new_ids:
                    continue
                if params.get("replace-existing-checks"):
                    self._remove_check(cid)
                else:
                    keep.append(cid)
        self.services[sid] = service
        for chk in new_checks:
            previous = self.checks.get(chk.id)
            if previous is not None:
                self._remove_check(chk.id)
            chk.create_index = chk.modify_index = idx
            self.checks[chk.id] = chk
            chk.task = asyncio.get_running_loop().create_task(self._run_check(chk.id))
        service.check_ids = keep + [c.id for c in new_checks]
        self.catalog_index = idx
        self._notify()
        return web.Response(status=200)

    def _remove_check(self, check_id: str) -> None:
        chk = self.checks.pop(check_id, None)
        if chk is None:
            return
        if chk.task is not None:
            chk.task.cancel()
        # a session bound to a deregistered check is invalidated, as in Consul
        for s in list(self.sessions.values()):
            if check_id in s.node_checks or any(
                sc["ID"] == check_id for sc in s.service_checks or ()
            ):
                self.invalidate_session(s.id, f"check {check_id} deregistered")

    async def _service_deregister(self, request: web.Request) -> web.StreamResponse:
        self._params(request, {})
        sid = request.match_info["id"]
        if not self._deregister(sid):
            raise Reply(404, f'Unknown service ID "{sid}". Ensure that the service ID is passed')
        return web.Response(status=200)

    def _deregister(self, sid: str) -> bool:
        service = self.services.pop(sid, None)
        if service is None:
            return False
        for cid in service.check_ids:
            self._remove_check(cid)
        self.catalog_index = self._next_index()
        self._notify()
        return True

    async def _run_check(self, check_id: str) -> None:
        """Probe an HTTP check every interval, as the agent does (first probe at once)."""
        while not self._closed:
            chk = self.checks.get(check_id)
            if chk is None or chk.http is None:
                return
            status, output = await self._probe(chk)
            if self.checks.get(check_id) is not chk:
                return
            self._set_check_status(chk, status, output)
            if (
                chk.deregister_after is not None
                and chk.critical_since is not None
                and time.monotonic() - chk.critical_since
                >= max(chk.deregister_after, self.critical_reap_min)
            ):
                self._deregister(chk.service_id)
                return
            await asyncio.sleep(chk.interval)

    async def _probe(self, chk: Check) -> tuple[str, str]:
        if self._probe_http is None or self._probe_http.closed:
            self._probe_http = aiohttp.ClientSession()
        assert chk.http is not None
        try:
            async with self._probe_http.get(
                chk.http, timeout=aiohttp.ClientTimeout(total=chk.timeout)
            ) as resp:
                text = (await resp.text(errors="replace"))[:4096]
                code = resp.status
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return "critical", f"Get {chk.http}: {exc.__class__.__name__}: {exc}"
        output = f"HTTP GET {chk.http}: {code} Output: {text}"
        if 200 <= code < 300:
            return "passing", output
        if code == 429:
            return "warning", output
        return "critical", output

    def set_check_status(self, check_id: str, status: str, output: str = "") -> None:
        """Force a check's status (as if its probe had answered so)."""
        self._set_check_status(self.checks[check_id], status, output)

    def _set_check_status(self, chk: Check, status: str, output: str) -> None:
        if status == chk.status and output == chk.output:
            return
        if status == "critical" and chk.critical_since is None:
            chk.critical_since = time.monotonic()
        elif status != "critical":
            chk.critical_since = None
        changed = status != chk.status
        chk.status, chk.output = status, output
        if changed:
            chk.modify_index = self.catalog_index = self._next_index()
            if status == "critical":
                for s in list(self.sessions.values()):
                    if chk.id in s.node_checks or any(
                        sc["ID"] == chk.id for sc in s.service_checks or ()
                    ):
                        self.invalidate_session(s.id, f"check {chk.id} critical")
            self._notify()

    def _service_json(self, s: Service) -> dict[str, Any]:
        return {
            "ID": s.id,
            "Service": s.name,
            "Tags": list(s.tags),
            "Meta": dict(s.meta),
            "Port": s.port,
            "Address": s.address,
            "Weights": dict(s.weights),
            "EnableTagOverride": s.enable_tag_override,
            "Datacenter": self.datacenter,
        }

    def _check_json(self, c: Check) -> dict[str, Any]:
        service = self.services.get(c.service_id)
        return {
            "Node": self.node,
            "CheckID": c.id,
            "Name": c.name,
            "Status": c.status,
            "Notes": "",
            "Output": c.output,
            "ServiceID": c.service_id,
            "ServiceName": service.name if service else "",
            "ServiceTags": list(service.tags) if service else [],
            "Type": "http",
            "Definition": {
                "HTTP": c.http,
                "Interval": _go_duration(c.interval),
                "Timeout": _go_duration(c.timeout),
                "DeregisterCriticalServiceAfter": (
                    _go_duration(c.deregister_after) if c.deregister_after is not None else "0s"
                ),
            },
            "CreateIndex": c.create_index,
            "ModifyIndex": c.modify_index,
        }

    def _serf_json(self) -> dict[str, Any]:
        return {
            "Node": self.node,
            "CheckID": SERF_CHECK,
            "Name": "Serf Health Status",
            "Status": self.serf_status,
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
        }

    async def _agent_services(self, request: web.Request) -> web.StreamResponse:
        self._params(request, {})
        return self._json({sid: self._service_json(s) for sid, s in self.services.items()})

    async def _agent_checks(self, request: web.Request) -> web.StreamResponse:
        self._params(request, {})
        return self._json({cid: self._check_json(c) for cid, c in self.checks.items()})

    def _matching(self, name: str, tags: list[str]) -> list[Service]:
        return [
            s
            for s in sorted(self.services.values(), key=lambda s: s.id)
            if s.name == name and all(t in s.tags for t in tags)
        ]

    async def _catalog_service(self, request: web.Request) -> web.StreamResponse:
        params = self._params(request, {**_READ, "tag": MULTI})
        name = request.match_info["name"]
        if not name:
            raise Reply(400, "Missing service name")

        def compute() -> tuple[int, Any]:
            return self.catalog_index, [
                {
                    "ID": self.node_id,
                    "Node": self.node,
                    "Address": "127.0.0.1",
                    "Datacenter": self.datacenter,
                    "TaggedAddresses": {"lan": "127.0.0.1", "wan": "127.0.0.1"},
                    "NodeMeta": {},
                    "ServiceID": s.id,
                    "ServiceName": s.name,
                    "ServiceTags": list(s.tags),
                    "ServiceAddress": s.address,
                    "ServicePort": s.port,
                    "ServiceMeta": dict(s.meta),
                    "ServiceEnableTagOverride": s.enable_tag_override,
                    "CreateIndex": s.create_index,
                    "ModifyIndex": s.modify_index,
                }
                for s in self._matching(name, params.get("tag", []))
            ]

        idx, result = await self._blocking(params, compute)
        return self._json(result, index=idx)

    async def _health_service(self, request: web.Request) -> web.StreamResponse:
        params = self._params(request, {**_READ, "tag": MULTI, "passing": BOOL})
        name = request.match_info["name"]
        if not name:
            raise Reply(400, "Missing service name")

        def compute() -> tuple[int, Any]:
            out = []
            for s in self._matching(name, params.get("tag", [])):
                checks = [self._serf_json()] + [
                    self._check_json(self.checks[c]) for c in s.check_ids if c in self.checks
                ]
                if params.get("passing") and any(c["Status"] != "passing" for c in checks):
                    continue
                out.append(
                    {
                        "Node": {
                            "ID": self.node_id,
                            "Node": self.node,
                            "Address": "127.0.0.1",
                            "Datacenter": self.datacenter,
                        },
                        "Service": self._service_json(s),
                        "Checks": checks,
                    }
                )
            return self.catalog_index, out

        idx, result = await self._blocking(params, compute)
        return self._json(result, index=idx)

    # -- status ---------------------------------------------------------------------------------
    async def _status_leader(self, request: web.Request) -> web.StreamResponse:
        self._params(request, {"dc": STR})
        return self._json("" if self.leaderless else SERVER_ADDR)

    async def _status_peers(self, request: web.Request) -> web.StreamResponse:
        self._params(request, {"dc": STR})
        return self._json([] if self.leaderless else [SERVER_ADDR])
