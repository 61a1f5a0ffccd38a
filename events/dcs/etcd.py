"""etcd v3 backend of the DCS interface, over etcd's JSON gRPC-gateway with aiohttp.

Why the gateway and not gRPC: the agent must stay under 80 MB resident and already carries one
HTTP stack (aiohttp) for its REST API and for Consul; grpcio alone costs tens of MB. The gateway
speaks the same v3 API as JSON: keys and values are base64, int64 fields are decimal strings,
streaming calls (watch, lease keepalive) answer newline-delimited ``{"result": ...}`` objects.

Mapping of the DCS semantics (see events/dcs/base.py):

* session      = one lease (TTL = ceil(ttl), at least 2 s: etcd raises smaller TTLs to its
                 minimum anyway, and we want ``session_ttl`` to say what was granted)
* leader       = txn "create_revision(leader) == 0 -> put leader=name with our lease";
                 term = the txn's header revision = the key's mod_revision, a cluster-wide
                 monotonic counter, so a new leader always gets a larger term
* members/<n>  = put with our lease; registration refuses a live key of another instance_id
* initialize   = txn create-if-absent without a lease (survives its creator)
* watch        = one range read, then a /v3/watch stream over the cluster prefix from
                 revision+1, resumed from the last revision seen after any interruption

Every request has a bounded timeout. Endpoints are tried in order; a request moves on to the next
endpoint only when it provably never reached the previous one (connect refused / connect
timeout), or when it is idempotent (reads, keepalive, revoke) - a write that may have been applied
is never silently replayed somewhere else: the caller gets a DCSError and decides.

A request that gives up on an endpoint also takes the watches streaming from it along: they are
re-opened on the next endpoint from their last revision. An idle watch is silent, so a watch on a
hung member (stopped, or cut off without the connection breaking) would otherwise sit there until
the idle timeout noticed, while the requests beside it had long moved on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import aiohttp

from events.dcs.base import (
    DCS,
    AuthError,
    ClusterView,
    DCSError,
    Leader,
    SessionLost,
    TimelineCounter,
    build_view,
    decode_json_object,
    decode_timeline,
    require_own_incarnation,
)
from events.settings import ConfigError, EtcdSettings
from events.tasks import bounded
from events.tlsclient import client_context, tls_reason

log = logging.getLogger(__name__)

# etcd's smallest lease TTL with its default heartbeat/election settings (it silently raises a
# smaller request to this); asking for it explicitly keeps session_ttl truthful.
MIN_LEASE_TTL = 2
# upper bound of any single request when the session TTL does not impose a smaller one
MAX_REQUEST_TIMEOUT = 2.0
WATCH_BACKOFF_START = 0.1
WATCH_BACKOFF_CAP = 2.0
# A watch that has been silent this long is re-opened (from the last revision: nothing is lost).
# etcd sends nothing on an idle watch, and the gateway cannot carry progress requests (it only
# forwards the request body once it is complete), so this is how a half-open connection after a
# network partition is detected.
DEFAULT_WATCH_IDLE_TIMEOUT = 15.0
# Re-opening costs the store a call per member and idle period, so a silent watch stays open while
# the endpoint it is on has answered another request of ours within the idle timeout (the session
# renewals: a request carries "hasleader", so an answer proves the member is alive and in its
# cluster); a hung or cut-off member answers nothing and its watch is re-opened as before. A watch
# silent for this many idle timeouts is re-opened whatever, for a connection a middlebox dropped.
WATCH_SILENCE_CAP = 4
# a single gateway message larger than this is treated as a protocol error (protects memory)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# gRPC status codes that the gateway reports in {"code": ...}
_GRPC_INVALID_ARGUMENT = 3
_GRPC_NOT_FOUND = 5
_GRPC_PERMISSION_DENIED = 7
_GRPC_UNAVAILABLE = 14
_GRPC_UNAUTHENTICATED = 16

# errors that prove the request never reached the server: safe to send elsewhere
_NOT_SENT_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectorError,
    aiohttp.ConnectionTimeoutError,
)
# gRPC metadata "hasleader: true" (the gateway forwards Grpc-Metadata-* headers): a member that
# loses its cluster's leader ends our watch / keepalive stream at once instead of keeping it open
# but silent, and refuses requests with "no leader", so that we move to another endpoint
_REQUIRE_LEADER = {"Grpc-Metadata-hasleader": "true"}
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, asyncio.TimeoutError)


def _b64(data: str | bytes) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _unb64(data: str | None) -> bytes:
    return base64.b64decode(data) if data else b""


def _prefix_end(prefix: str) -> bytes:
    """The exclusive end of the key range that holds every key starting with ``prefix``."""
    raw = bytearray(prefix.encode("utf-8"))
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"  # etcd: "every key" (never reached: the prefix ends with '/')


def _int(value: Any, default: int = 0) -> int:
    # int64 fields arrive as strings; absent means the proto default 0
    if value is None:
        return default
    return int(value)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")


class _EtcdReplyError(DCSError):
    """etcd answered with a gRPC error: keeps the code and message for classification."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code
        self.etcd_message = message


class EtcdDCS(DCS):
    def __init__(
        self,
        settings: EtcdSettings,
        cluster: str,
        prefix: str = "pgsidecar",
        *,
        request_timeout: float | None = None,
        watch_idle_timeout: float = DEFAULT_WATCH_IDLE_TIMEOUT,
    ) -> None:
        super().__init__(cluster, prefix)
        self._endpoints = [e.rstrip("/") for e in settings.endpoints]
        self._current = 0  # index of the endpoint that answered last
        self._username = settings.username
        self._password = settings.resolve_password()
        self._ssl = _ssl_context(settings)
        self._request_timeout = request_timeout
        self._watch_idle_timeout = watch_idle_timeout
        self._http: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._auth_lock: asyncio.Lock | None = None
        self._lease: int | None = None
        self._ttl = 0
        self._closed = False
        # each running watch's response, with the index of the endpoint it streams from
        self._watch_responses: dict[aiohttp.ClientResponse, int] = {}
        self._answered_at: dict[int, float] = {}  # endpoint index -> when it last answered us
        self._range_end = _prefix_end(self.base)
        # how often watch() had to re-read everything vs. how many streams it opened (a resumed
        # stream costs nothing; a full read means a compaction or a server-side cancel)
        self.watch_stats = {"full_reads": 0, "streams": 0}

    def __repr__(self) -> str:  # never shows credentials
        return f"EtcdDCS(cluster={self.cluster!r}, prefix={self.prefix!r}, endpoints={self._endpoints!r})"

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def timeout(self) -> float:
        """Bound of one request to one endpoint: a third of the lease TTL (so that a master gets
        several renewal attempts before its lease lapses), at most 2 s; 2 s before any lease
        exists. ``request_timeout`` overrides it."""
        if self._request_timeout is not None:
            return self._request_timeout
        if not self._ttl:
            return MAX_REQUEST_TIMEOUT
        return min(self._ttl / 3.0, MAX_REQUEST_TIMEOUT)

    def _session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise DCSError("etcd client is closed")
        if self._http is None or self._http.closed:
            # Created lazily: aiohttp binds the session to the running loop.
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=16, keepalive_timeout=30, ssl=self._ssl if self._ssl is not None else True
                ),
                timeout=aiohttp.ClientTimeout(total=MAX_REQUEST_TIMEOUT * 4),
            )
        return self._http

    def _endpoint_order(self) -> list[int]:
        n = len(self._endpoints)
        return [(self._current + i) % n for i in range(n)]

    async def _auth_headers(self) -> dict[str, str]:
        if self._username is None:
            return {}
        if self._token is None:
            if self._auth_lock is None:
                self._auth_lock = asyncio.Lock()
            async with self._auth_lock:
                if self._token is None:
                    reply = await self._post(
                        "/v3/auth/authenticate",
                        {"name": self._username, "password": self._password or ""},
                        idempotent=True,
                        auth=False,
                    )
                    token = reply.get("token")
                    if not token:
                        raise AuthError(
                            f"etcd returned no auth token for user {self._username!r}: is auth "
                            f"enabled on the server? check dcs.etcd.username/password"
                        )
                    self._token = str(token)
        assert self._token is not None
        return {"Authorization": self._token}

    async def _post(
        self,
        path: str,
        body: Mapping[str, Any],
        *,
        idempotent: bool,
        auth: bool = True,
    ) -> dict[str, Any]:
        """POST ``body`` to the gateway and return the decoded reply (the ``result`` of a
        streaming call). Raises DCSError/AuthError/_EtcdReplyError; retries once after an
        expired auth token."""
        try:
            return await self._post_once(path, body, idempotent=idempotent, auth=auth)
        except _EtcdReplyError as exc:
            if auth and self._username is not None and exc.code == _GRPC_UNAUTHENTICATED:
                # simple tokens expire (--auth-token-ttl): get a new one and try once more
                self._token = None
                return await self._post_once(path, body, idempotent=idempotent, auth=auth)
            raise

    async def _post_once(
        self,
        path: str,
        body: Mapping[str, Any],
        *,
        idempotent: bool,
        auth: bool,
    ) -> dict[str, Any]:
        http = self._session()
        headers = {**_REQUIRE_LEADER, **(await self._auth_headers())} if auth else {}
        per_try = self.timeout
        client_timeout = aiohttp.ClientTimeout(total=per_try, sock_connect=per_try)
        last_error = ""
        retried = False
        order = self._endpoint_order()
        i = 0
        while i < len(order):
            idx = order[i]
            url = self._endpoints[idx] + path
            try:
                async with http.post(
                    url, json=body, headers=headers, timeout=client_timeout
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
            except asyncio.CancelledError:
                # the caller gave up on this request before the endpoint answered (a lease
                # renewal is bounded by its own cadence, shorter than our per-try timeout): the
                # next request must not queue on the same, possibly hung, member again
                self._leave_endpoint(idx)
                raise
            except _TLS_ERRORS as exc:
                raise _tls_error(self._endpoints[idx], exc) from None
            except _NOT_SENT_ERRORS as exc:
                # never reached this endpoint: any request may go to the next one
                last_error = f"{self._endpoints[idx]}: {_describe(exc)}"
                self._leave_endpoint(idx)
                i += 1
                continue
            except _TRANSPORT_ERRORS as exc:
                if _is_tls_failure(exc):
                    raise _tls_error(self._endpoints[idx], exc) from None
                # may have been applied: only an idempotent request is sent again
                last_error = f"{self._endpoints[idx]}: {_describe(exc)}"
                self._leave_endpoint(idx)
                if not idempotent:
                    raise DCSError(f"etcd {path} failed ({last_error})") from None
                if len(order) == 1 and not retried:
                    # one endpoint: a second try covers a pooled connection it closed meanwhile
                    retried = True
                    continue
                i += 1
                continue
            try:
                reply = _decode_reply(path, status, raw)
            except _EtcdReplyError as exc:
                if exc.code == _GRPC_UNAVAILABLE and "no leader" in exc.etcd_message:
                    # this member is cut off from its cluster and refused the request without
                    # proposing it: any other member may take it
                    last_error = f"{self._endpoints[idx]}: {exc.etcd_message}"
                    self._leave_endpoint(idx)
                    i += 1
                    continue
                self._current = idx
                self._answered_at[idx] = time.monotonic()
                raise
            self._current = idx
            self._answered_at[idx] = time.monotonic()
            return reply
        raise DCSError(f"etcd {path} failed: no endpoint answered ({last_error})")

    def _leave_endpoint(self, idx: int) -> None:
        """Endpoint ``idx`` failed a request: the next requests start at the one after it, and
        the watches streaming from it are closed, so that they re-open there too (from their
        last revision) instead of waiting for the idle timeout on a member that may be hung.
        With a single endpoint there is nowhere else to go: the watches stay."""
        self._current = (idx + 1) % len(self._endpoints)
        if len(self._endpoints) == 1:
            return
        for resp, on in list(self._watch_responses.items()):
            if on == idx:
                log.info(
                    "etcd %s failed a request: re-opening the watch elsewhere", self._endpoints[idx]
                )
                resp.close()

    def _raise_session_error(self, exc: _EtcdReplyError) -> None:
        if exc.code == _GRPC_NOT_FOUND and "lease not found" in exc.etcd_message:
            raise SessionLost(f"etcd lease {self._lease_hex()} no longer exists") from None
        raise exc

    def _lease_hex(self) -> str:
        return f"{self._lease:x}" if self._lease is not None else "(none)"

    def _require_lease(self) -> int:
        if self._lease is None:
            raise SessionLost(
                "no etcd lease: open_session was not called or the session was closed"
            )
        return self._lease

    def _rel(self, key_b64: str) -> str | None:
        key = _unb64(key_b64).decode("utf-8", errors="replace")
        if not key.startswith(self.base):
            return None
        return key[len(self.base) :]

    async def _put_if_unchanged(
        self, key: str, kv: dict[str, Any], put: dict[str, Any]
    ) -> dict[str, Any]:
        """``put`` in a transaction that succeeds only if ``key`` (base64) has not been written
        since it was read as ``kv``: a takeover of exactly the key that was looked at."""
        return await self._txn(
            {
                "compare": [
                    {
                        "key": key,
                        "target": "MOD",
                        "result": "EQUAL",
                        "mod_revision": str(_int(kv.get("mod_revision"))),
                    }
                ],
                "success": [put],
            }
        )

    async def _txn(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._post("/v3/kv/txn", body, idempotent=False)
        except _EtcdReplyError as exc:
            self._raise_session_error(exc)
            raise  # unreachable: _raise_session_error always raises

    async def _range_prefix(self) -> tuple[dict[str, tuple[bytes, int, bool]], int]:
        reply = await self._post(
            "/v3/kv/range",
            {"key": _b64(self.base), "range_end": _b64(self._range_end)},
            idempotent=True,
        )
        kvs: dict[str, tuple[bytes, int, bool]] = {}
        for kv in reply.get("kvs") or ():
            rel = self._rel(kv["key"])
            if rel is not None:
                kvs[rel] = _entry(kv)
        return kvs, _int(reply.get("header", {}).get("revision"))

    def _view(self, kvs: Mapping[str, tuple[bytes, int, bool]], index: int) -> ClusterView:
        rows = [
            (self.base + rel, value, mod_revision, held)
            for rel, (value, mod_revision, held) in kvs.items()
        ]
        return build_view(self.base, rows, index)

    async def connect(self) -> None:
        self._closed = False
        # authenticates too, when credentials are configured: a wrong password fails here
        await self._post("/v3/kv/range", {"key": _b64(self.base + "leader")}, idempotent=True)

    async def close(self) -> None:
        self._closed = True
        for resp in list(self._watch_responses):
            resp.close()
        self._watch_responses.clear()
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- session --------------------------------------------------------------------------------
    @property
    def session_ttl(self) -> float:
        return float(self._ttl) if self._lease is not None else 0.0

    async def open_session(self, ttl: float) -> None:
        if self._lease is not None:
            # one session per agent: a new one replaces the old, whose keys go with it now (as
            # with Consul) rather than at its TTL; it is usually gone already (SessionLost)
            with contextlib.suppress(DCSError):
                await self.close_session()
        want = max(MIN_LEASE_TTL, math.ceil(ttl))
        reply = await self._post("/v3/lease/grant", {"TTL": str(want)}, idempotent=False)
        if reply.get("error"):
            raise DCSError(f"etcd refused a lease of {want} s: {reply['error']}")
        self._lease = _int(reply.get("ID"))
        self._ttl = _int(reply.get("TTL"), want)
        log.debug("etcd lease %s granted, ttl %s s", self._lease_hex(), self._ttl)

    async def renew_session(self) -> None:
        lease = self._require_lease()
        try:
            reply = await self._post("/v3/lease/keepalive", {"ID": str(lease)}, idempotent=True)
        except _EtcdReplyError as exc:
            self._raise_session_error(exc)
            raise
        # an unknown (expired/revoked) lease is answered with no TTL (proto default 0)
        ttl = _int(reply.get("TTL"))
        if ttl <= 0:
            raise SessionLost(f"etcd lease {self._lease_hex()} expired or was revoked")
        self._ttl = ttl

    async def close_session(self) -> None:
        if self._lease is None:
            return
        try:
            await self._post("/v3/lease/revoke", {"ID": str(self._lease)}, idempotent=True)
        except _EtcdReplyError as exc:
            if not (exc.code == _GRPC_NOT_FOUND and "lease not found" in exc.etcd_message):
                raise
        self._lease = None

    # -- leader ---------------------------------------------------------------------------------
    async def acquire_leader(self, name: str) -> Leader | None:
        lease = self._require_lease()
        key = _b64(self.key("leader"))
        reply = await self._txn(
            {
                "compare": [
                    {"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
                ],
                "success": [
                    {"request_put": {"key": key, "value": _b64(name), "lease": str(lease)}}
                ],
                "failure": [{"request_range": {"key": key}}],
            }
        )
        if reply.get("succeeded"):
            return Leader(name, _int(reply.get("header", {}).get("revision")))
        kv = _first_kv(reply)
        if (
            kv is not None
            and _unb64(kv.get("value")) == name.encode()
            and _int(kv.get("lease")) == lease
        ):
            # we already hold it (e.g. a retry after a timeout whose put did go through)
            return Leader(name, _int(kv.get("mod_revision")))
        if kv is not None and _int(kv.get("lease")) == 0:
            # a leader key bound to no lease was not written by an agent (ours always carry
            # one): it is no lock and would never expire. Take it over, if it is still that key.
            reply = await self._put_if_unchanged(
                key, kv, {"request_put": {"key": key, "value": _b64(name), "lease": str(lease)}}
            )
            if reply.get("succeeded"):
                return Leader(name, _int(reply.get("header", {}).get("revision")))
        return None

    async def release_leader(self, name: str, term: int) -> bool:
        key = _b64(self.key("leader"))
        reply = await self._txn(
            {
                "compare": [
                    {"key": key, "target": "VALUE", "result": "EQUAL", "value": _b64(name)},
                    {"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": str(term)},
                ],
                "success": [{"request_delete_range": {"key": key}}],
            }
        )
        return bool(reply.get("succeeded"))

    # -- members --------------------------------------------------------------------------------
    async def register_member(self, name: str, data: dict[str, Any]) -> None:
        lease = self._require_lease()
        key = _b64(self.key("members", name))
        value = _b64(_dumps(data))
        put = {"request_put": {"key": key, "value": value, "lease": str(lease)}}
        # Bounded: each round only repeats when the key changed between our read and our write.
        for _ in range(5):
            reply = await self._txn(
                {
                    "compare": [
                        {"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
                    ],
                    "success": [put],
                    "failure": [{"request_range": {"key": key}}],
                }
            )
            if reply.get("succeeded"):
                return
            kv = _first_kv(reply)
            if kv is None:
                continue  # vanished meanwhile (its lease lapsed): try to create it again
            require_own_incarnation(name, self.key("members", name), _unb64(kv.get("value")), data)
            # our own previous incarnation: take the key over, bound to our lease from now on
            reply = await self._put_if_unchanged(key, kv, put)
            if reply.get("succeeded"):
                return
        raise DCSError(f"could not register member {name!r}: its key kept changing under us")

    async def put_member(self, name: str, data: dict[str, Any]) -> None:
        lease = self._require_lease()
        await self._put(self.key("members", name), _dumps(data), lease=lease)

    async def _put(self, key: str, value: bytes, lease: int | None = None) -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease is not None:
            body["lease"] = str(lease)
        try:
            await self._post("/v3/kv/put", body, idempotent=False)
        except _EtcdReplyError as exc:
            self._raise_session_error(exc)

    # -- initialize / config / commands --------------------------------------------------------
    async def try_initialize(self, name: str) -> bool:
        key = _b64(self.key("initialize"))
        reply = await self._txn(
            {
                "compare": [
                    {"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
                ],
                "success": [{"request_put": {"key": key, "value": _b64(name)}}],
            }
        )
        return bool(reply.get("succeeded"))

    async def cancel_initialize(self, name: str) -> bool:
        key = _b64(self.key("initialize"))
        reply = await self._txn(
            {
                "compare": [
                    {"key": key, "target": "VALUE", "result": "EQUAL", "value": _b64(name)}
                ],
                "success": [{"request_delete_range": {"key": key}}],
            }
        )
        return bool(reply.get("succeeded"))

    async def put_config(self, config: dict[str, Any]) -> None:
        await self._put(self.key("config"), _dumps(config))

    async def put_switchover(self, command: dict[str, Any]) -> None:
        await self._put(self.key("switchover"), _dumps(command))

    async def put_standby_promoted(self, record: dict[str, Any]) -> None:
        await self._put(self.key("standby_promoted"), _dumps(record))

    async def put_sync(self, state: dict[str, Any]) -> None:
        await self._put(self.key("sync"), _dumps(state))

    async def delete_switchover(self) -> None:
        await self._post(
            "/v3/kv/deleterange", {"key": _b64(self.key("switchover"))}, idempotent=True
        )

    # -- scheduled backups ----------------------------------------------------------------------
    async def read_backup_slot(self, kind: str) -> tuple[dict[str, Any] | None, int]:
        return await self._read_object(self.key("backup", kind))

    async def swap_backup_slot(self, kind: str, value: dict[str, Any], index: int) -> bool:
        return await self._compare_and_put(self.key("backup", kind), _dumps(value), index)

    async def read_sync(self) -> tuple[dict[str, Any] | None, int]:
        return await self._read_object(self.key("sync"))

    async def swap_sync(self, state: dict[str, Any], index: int) -> bool:
        return await self._compare_and_put(self.key("sync"), _dumps(state), index)

    async def _read_object(self, key: str) -> tuple[dict[str, Any] | None, int]:
        """(the JSON object at ``key``, its modify revision); (None, 0) when absent."""
        reply = await self._post("/v3/kv/range", {"key": _b64(key)}, idempotent=True)
        kvs = reply.get("kvs") or ()
        if not kvs:
            return None, 0
        value, _reason = decode_json_object(key, _unb64(kvs[0].get("value")))
        return value, _int(kvs[0].get("mod_revision"))

    async def _compare_and_put(self, key: str, value: bytes, index: int) -> bool:
        """Put ``value`` at ``key`` in one transaction, only if the key is absent (``index`` 0) or
        unchanged since modify revision ``index``; True if written."""
        k = _b64(key)
        compare = (
            {"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
            if index == 0
            else {"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": str(index)}
        )
        put = {"request_put": {"key": k, "value": _b64(value)}}
        reply = await self._txn({"compare": [compare], "success": [put]})
        return bool(reply.get("succeeded"))

    # -- the cluster's timeline counter ---------------------------------------------------------
    async def read_timeline(self) -> TimelineCounter:
        reply = await self._post(
            "/v3/kv/range", {"key": _b64(self.key("timeline"))}, idempotent=True
        )
        kvs = reply.get("kvs") or ()
        if not kvs:
            return TimelineCounter()
        value, mod_revision, _held = _entry(kvs[0])
        return TimelineCounter(decode_timeline(value) or 0, mod_revision)

    async def put_timeline(self, value: int, index: int) -> bool:
        return await self._compare_and_put(self.key("timeline"), str(value).encode(), index)

    # -- reading --------------------------------------------------------------------------------
    async def read_cluster(self) -> ClusterView:
        kvs, revision = await self._range_prefix()
        return self._view(kvs, revision)

    async def watch(self) -> AsyncIterator[ClusterView]:
        """See DCS.watch. Ends (without raising) once ``close()`` was called."""
        cache: dict[str, tuple[bytes, int, bool]] | None = None
        revision = 0
        backoff = WATCH_BACKOFF_START
        while not self._closed:
            reconnect_now = False
            try:
                if cache is None:
                    cache, revision = await self._range_prefix()
                    self.watch_stats["full_reads"] += 1
                    yield self._view(cache, revision)
                # resume right after the last revision we applied: nothing in between is lost
                async with contextlib.aclosing(self._watch_stream(revision + 1)) as stream:
                    async for reply in stream:
                        compact_revision = _int(reply.get("compact_revision"))
                        if reply.get("canceled") or compact_revision > 0:
                            # compacted past our revision (or canceled by the server): the events
                            # we missed are gone, so re-read everything
                            log.info(
                                "etcd watch of %s canceled (compact_revision=%s, reason=%r): "
                                "full re-read",
                                self.base,
                                compact_revision,
                                reply.get("cancel_reason"),
                            )
                            cache = None
                            reconnect_now = compact_revision > 0
                            if "invalid auth token" in str(reply.get("cancel_reason", "")):
                                self._token = None  # expired: the re-read authenticates anew
                                reconnect_now = True
                            break
                        if reply.get("created"):
                            backoff = WATCH_BACKOFF_START
                        events = reply.get("events")
                        if events:
                            revision = self._apply_events(cache, events, revision)
                            yield self._view(cache, revision)
            except asyncio.CancelledError:
                raise
            except aiohttp.SocketTimeoutError:
                # silent for watch_idle_timeout: re-open at once from the same revision
                log.debug("etcd watch of %s idle: re-opening", self.base)
                reconnect_now = True
            except Exception as exc:  # never raise out of watch (its contract): retry instead
                log.info("etcd watch of %s interrupted: %s", self.base, _describe(exc))
            if self._closed:
                return
            if not reconnect_now:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, WATCH_BACKOFF_CAP)

    def _apply_events(
        self, cache: dict[str, tuple[bytes, int, bool]], events: list[dict[str, Any]], revision: int
    ) -> int:
        """Apply one watch batch to ``cache``; return the new last revision. The revision comes
        from the events, not the reply header: a catching-up watch may send a header revision
        beyond the events it has delivered so far."""
        for event in events:
            kv = event.get("kv") or {}
            mod_revision = _int(kv.get("mod_revision"))
            revision = max(revision, mod_revision)
            rel = self._rel(kv.get("key", ""))
            if rel is None:
                continue
            if event.get("type") == "DELETE":  # PUT is the enum default, hence omitted
                cache.pop(rel, None)
            else:
                cache[rel] = _entry(kv)
        return revision

    async def _watch_stream(self, start_revision: int) -> AsyncGenerator[dict[str, Any], None]:
        """One /v3/watch request: yields each ``result`` message until the stream ends."""
        http = self._session()
        headers = {**_REQUIRE_LEADER, **(await self._auth_headers())}
        body = {
            "create_request": {
                "key": _b64(self.base),
                "range_end": _b64(self._range_end),
                "start_revision": str(start_revision),
                "progress_notify": True,
            }
        }
        # no read timeout here: the silence is judged below (see WATCH_SILENCE_CAP)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=None)
        last_error = ""
        resp: aiohttp.ClientResponse | None = None
        idx = self._current
        for idx in self._endpoint_order():
            try:
                resp = await http.post(
                    self._endpoints[idx] + "/v3/watch", json=body, headers=headers, timeout=timeout
                )
            except _TLS_ERRORS as exc:
                raise _tls_error(self._endpoints[idx], exc) from None
            except _TRANSPORT_ERRORS as exc:
                if _is_tls_failure(exc):
                    raise _tls_error(self._endpoints[idx], exc) from None
                last_error = f"{self._endpoints[idx]}: {_describe(exc)}"
                self._current = (idx + 1) % len(self._endpoints)
                continue
            self._current = idx
            break
        if resp is None:
            raise DCSError(f"etcd watch failed: no endpoint answered ({last_error})")
        self._watch_responses[resp] = idx
        self.watch_stats["streams"] += 1
        try:
            if resp.status != 200:
                _decode_reply("/v3/watch", resp.status, await resp.read())
                raise DCSError(f"etcd watch answered HTTP {resp.status}")
            buffer = b""
            heard = time.monotonic()
            idle = self._watch_idle_timeout
            while True:
                try:
                    # in slices, so that a member that stops answering is noticed one idle
                    # timeout after its last answer, as it was before the watch stayed open
                    chunk = await bounded(resp.content.readany(), idle / 4)
                except TimeoutError:
                    now = time.monotonic()
                    answered = self._answered_at.get(idx)
                    if now - heard < idle or (
                        answered is not None
                        and now - answered < idle
                        and now - heard < WATCH_SILENCE_CAP * idle
                    ):
                        continue
                    raise aiohttp.SocketTimeoutError("etcd watch silent") from None
                if not chunk:
                    break
                heard = time.monotonic()
                buffer += chunk
                if len(buffer) > MAX_MESSAGE_BYTES:
                    raise DCSError("etcd watch message too large")
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        message = json.loads(line)
                        if "error" in message:
                            error = message["error"]
                            code = _int(error.get("grpc_code") or error.get("code"))
                            if code == _GRPC_UNAUTHENTICATED:
                                self._token = None
                            elif code == _GRPC_UNAVAILABLE:
                                # e.g. "no leader": this member is cut off, reconnect elsewhere
                                self._current = (idx + 1) % len(self._endpoints)
                            raise DCSError(f"etcd watch error: {error.get('message', error)}")
                        yield message.get("result", message)
        finally:
            self._watch_responses.pop(resp, None)
            resp.close()

    # -- test hooks (used by tests/contract/test_dcs_contract.py; every backend implements them) ---------
    async def _drop_watch_connection(self) -> None:
        """Break the connection of every running watch, as a network failure would."""
        for resp in list(self._watch_responses):
            resp.close()

    async def _put_raw(self, key: str, value: bytes) -> None:
        """Write ``value`` verbatim under the full store ``key`` (no lease)."""
        await self._put(key, value)

    async def _delete_prefix(self) -> None:
        """Delete every key of this cluster (test cleanup)."""
        await self._post(
            "/v3/kv/deleterange",
            {"key": _b64(self.base), "range_end": _b64(self._range_end)},
            idempotent=True,
        )


def _entry(kv: Mapping[str, Any]) -> tuple[bytes, int, bool]:
    """(value, mod_revision, held): ``held`` says the key is bound to a lease. Every key an agent
    writes is; the leader key without one is no lock (see build_view)."""
    return _unb64(kv.get("value")), _int(kv.get("mod_revision")), _int(kv.get("lease")) != 0


def _first_kv(txn_reply: Mapping[str, Any]) -> dict[str, Any] | None:
    for response in txn_reply.get("responses") or ():
        kvs = (response.get("response_range") or {}).get("kvs") or ()
        if kvs:
            return dict(kvs[0])
    return None


def _ssl_context(settings: EtcdSettings) -> ssl.SSLContext | None:
    """The client side of TLS for https:// endpoints: etcd's CA (else the system's) and our
    client certificate. None when no endpoint is https:// and no TLS file is set."""
    tls_files = (settings.ca_cert, settings.client_cert, settings.client_key)
    if not any(e.lower().startswith("https://") for e in settings.endpoints):
        if any(f is not None for f in tls_files):
            raise ConfigError(
                "dcs.etcd.ca_cert/client_cert/client_key are set but no endpoint is https://: "
                "use https:// endpoints (or remove the TLS files)"
            )
        return None
    return client_context(
        settings.ca_cert,
        settings.client_cert,
        settings.client_key,
        ca_setting="dcs.etcd.ca_cert",
        cert_setting="dcs.etcd.client_cert",
        key_setting="dcs.etcd.client_key",
    )


# a TLS handshake that failed (a certificate not trusted, ours refused): no other endpoint
# would do better with the same settings, and retrying hides the cause
_TLS_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientSSLError, ssl.SSLError)


def _is_tls_failure(exc: BaseException) -> bool:
    """A TLS alert from the server arrives after the handshake looked done on our side (TLS 1.3
    sends the verdict on our certificate with the first read): aiohttp reports it as a
    ClientOSError whose cause is an SSLError."""
    if isinstance(exc, _TLS_ERRORS):
        return True
    cause = getattr(exc, "__cause__", None) or getattr(exc, "__context__", None)
    return isinstance(cause, ssl.SSLError) or "[SSL:" in str(exc)


def _tls_error(endpoint: str, exc: BaseException) -> DCSError:
    cause = getattr(exc, "os_error", None) or getattr(exc, "certificate_error", None) or exc
    reason = tls_reason(cause)
    lowered = str(cause).lower()
    if isinstance(exc, aiohttp.ClientConnectorCertificateError) or "certificate verify" in lowered:
        return DCSError(
            f"etcd {endpoint}: TLS: the server's certificate is not trusted ({reason}); set "
            f"dcs.etcd.ca_cert to the CA that signed it, and check that it names the host"
        )
    if "certificate required" in lowered or "bad certificate" in lowered or "unknown ca" in lowered:
        return AuthError(
            f"etcd {endpoint}: TLS: the server refused our client certificate ({reason}); set "
            f"dcs.etcd.client_cert and dcs.etcd.client_key to a certificate its "
            f"--trusted-ca-file signed"
        )
    return DCSError(
        f"etcd {endpoint}: TLS handshake failed ({reason}); check dcs.etcd.ca_cert, "
        f"dcs.etcd.client_cert and dcs.etcd.client_key"
    )


def _describe(exc: BaseException) -> str:
    # aiohttp's messages name the host and port, never a request body (where a password may be)
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}" if text != exc.__class__.__name__ else text


def _decode_reply(path: str, status: int, raw: bytes) -> dict[str, Any]:
    if status == 400 and raw.startswith(b"CommonName of client"):
        raise AuthError(
            f"etcd {path}: the gateway refuses a client certificate with a CommonName while "
            f"authentication is on; issue dcs.etcd.client_cert without a CommonName (names in "
            f"subjectAltName only)"
        )
    try:
        reply = json.loads(raw) if raw else {}
    except ValueError:
        raise DCSError(f"etcd {path}: HTTP {status}, not JSON: {raw[:200]!r}") from None
    if not isinstance(reply, dict):
        raise DCSError(f"etcd {path}: HTTP {status}, unexpected reply {raw[:200]!r}")
    error = reply.get("error")
    if status != 200 or error:
        if isinstance(error, dict):  # streaming calls wrap errors as {"error": {...}}
            message = str(error.get("message", error))
            code = _int(error.get("grpc_code") or error.get("code"))
        else:
            message = str(reply.get("message") or error or f"HTTP {status}")
            code = _int(reply.get("code"))
        if code in (_GRPC_UNAUTHENTICATED, _GRPC_PERMISSION_DENIED) or (
            code == _GRPC_INVALID_ARGUMENT
            and ("authentication failed" in message or "user name is empty" in message)
        ):
            if code == _GRPC_UNAUTHENTICATED and "invalid auth token" in message:
                # an expired token: _post retries once with a fresh one
                raise _EtcdReplyError(message, code)
            raise AuthError(
                f"etcd {path} refused our credentials: {message}; check dcs.etcd.username and "
                f"dcs.etcd.password, and the user's role on the key prefix"
            )
        raise _EtcdReplyError(f"etcd {path}: {message}", code)
    if "result" in reply and isinstance(reply["result"], dict):
        return dict(reply["result"])
    return reply
