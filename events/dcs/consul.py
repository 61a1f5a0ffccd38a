"""Consul backend of the DCS interface, over py-consul's asyncio client (``consul.aio``).

py-consul is the maintained fork of python-consul (same ``consul`` import; python-consul's last
release dates from 2018 and has no asyncio client that works with current aiohttp). We use its
endpoint wrappers and response callbacks, and give it our own transport (``_Transport``): one
aiohttp session with an explicit TLS context and a bounded timeout on every request, so that no
call can hang and the deprecated aiohttp arguments py-consul passes are never used.

How the DCS semantics (events/dcs/base.py) map onto Consul, and why:

Session. Each agent creates one Consul session and binds its member key and, when it wins, the
leader key to it (``?acquire=<session>``). The session is created with:

* ``Behavior: delete`` - when the session is invalidated, the keys it holds are *deleted*, not
  merely unlocked, so a dead agent's member key and leader key vanish and every watcher sees the
  deletion (the interface's "keys bound to the session disappear with it").
* ``LockDelay: 0s`` - Consul's default of 15 s refuses any ``?acquire=`` of a key for 15 s after
  its holder's session was invalidated: it would add 15 s to every failover. Lock-delay is a
  heuristic against a holder that does not know it lost the lock; our safety instead comes from
  fencing: a master that cannot renew demotes itself, on its own clock, before its lease can
  have lapsed on the Consul side (see the TTL arithmetic below). (The API page says "greater
  than 0", Consul's code accepts 0 and only skips the delay; Patroni sends 1 ms for the same
  reason.)
* no health checks (``NodeChecks: []``, and the pre-1.7 spelling ``Checks: []``). By default a
  session is tied to the node's ``serfHealth`` check, and one missed gossip probe (a GC pause, a
  loaded network) invalidates it and drops the leader key of a perfectly healthy master - a known
  Patroni-on-Consul failure. Liveness is the TTL's job, which we control.
* ``TTL`` from the configured ``ttl`` (below).

TTL arithmetic. Consul's contract is that the TTL is a *lower bound*: a session is never
invalidated before TTL has passed since its last renewal, but Consul may take longer - in
practice the server arms its timer at 2 x TTL, to absorb clock skew and request latency. With
``ttl`` the configured cluster TTL and ``session_ttl_min`` the server's minimum (10 s by
default, Consul's ``session_ttl_min``)::

    session_ttl       = max(ceil(ttl / 2), session_ttl_min)   TTL sent to Consul (whole s)
    master lease      = session_ttl after the moment it *sent* its last successful renew
    worst_case_expiry = 2 x session_ttl after the master's last renew  (= ttl when ttl >= 20)

For example ``ttl = 20`` gives a 10 s session; the master may write for at most 10 s after it
sent its last successful renewal (it fences earlier, with margin: the agent computes its fencing
deadline from ``session_ttl``); a replica must assume the key of a dead master can survive up
to 20 s = ttl. With ``ttl`` below 2 x session_ttl_min the session is session_ttl_min and the
worst case is 2 x session_ttl_min. That 2x is the cost of Consul's contract: a hard
kill of the master is detected within ``worst_case_expiry`` (an agent that stops cleanly
destroys its session and the key goes at once). ``session_ttl`` and ``worst_case_expiry`` are
both exposed as properties. A renewal answer with a larger TTL (Consul asks loaded clients to
renew less often) raises ``session_ttl`` accordingly; it is still a valid lower bound.

Agent restart. Sessions belong to the node of the agent that created them: when the local agent
restarts, its node leaves (and a ``-dev`` agent loses all state), and every session created
through it is invalidated - keys deleted. The next renew answers 404, which raises SessionLost: a
master fences at once. (Replicas then see the leader key vanish; the agent's own rule - do not
race while the old master's WAL is still streaming to you - is what keeps them from promoting
under a still-running master.) An agent that crashes without leaving does not invalidate a
session without checks; the session then lapses with its TTL, since nobody can renew it through
a dead agent - the same case as a dead master.

Leader and term. ``acquire_leader`` reads the key first (we may hold it already: the call is
idempotent, it does not rewrite the key) and then ``PUT ?acquire=``, which is Consul's atomic
"lock if free". The term is the leader key's ModifyIndex, a value of Consul's raft index: every
acquisition writes the key, so a new leader always gets a larger term, and our code never writes
the key while it holds it. ``release_leader`` reads the key (it must still hold our name at our
term) and deletes it with ``DELETE ?cas=<term>``, which is atomic: it fails if anything changed
the key since we acquired it. (A ``?release=`` first would leave a window in which the key exists
with no session - orphaned forever if we die in between - and Consul attaches no lock-delay to a
delete, so the key is free at once.) A leader key without a Session (released by someone else's
tool) is read as "no leader".

Members. ``register_member`` acquires ``members/<name>`` with our session. If another session
holds it, its ``instance_id`` decides: the same id is our own previous incarnation, whose session
may still be alive until its TTL, so we delete the key with ``?cas=<its ModifyIndex>`` and
acquire it again; a different id raises DuplicateMember. ``put_member`` re-acquires (for the
holder, Consul updates the value without changing LockIndex); if another session holds the key
(a newer incarnation took it over) it raises DuplicateMember rather than write past the lock.

Watch. Blocking queries: ``GET <prefix>/<cluster>/?recurse&index=N&wait=...`` returns as soon as
anything under the prefix changed (X-Consul-Index > N) or after ``wait``; we then yield the
whole new view. Consul's documented rules are followed: the index is resumed from the last
X-Consul-Index, so a reconnect loses nothing (changes in between are coalesced into the next
view); if the index goes backwards (snapshot restore, tombstones reaped) it is reset to 0 and a
full read follows; an index of 0 is replaced by 1 so that the next request blocks; the loop is
rate limited with a token bucket (burst 10, then 20 reads/s), which never delays a rare change
but stops a misbehaving server from turning the watch into a busy loop; errors back off
(50 ms doubling to 2 s). Each request is bounded by ``wait`` plus Consul's jitter (wait/16) plus
a margin, which also bounds how long a half-open connection can hide a change.

Credentials. The ACL token (``dcs.consul.token`` or ``dcs.consul.token_file``) travels only in
the ``X-Consul-Token`` header - never in a URL, a log line or an exception message (messages are
scrubbed as well). The environment variables py-consul would otherwise read
(``CONSUL_HTTP_TOKEN``, ``CONSUL_HTTP_ADDR``, ``CONSUL_HTTP_SSL*``) are ignored: the config is the
only source. A 403 raises AuthError naming the setting. With an ``https://`` url: ``ca_cert``
verifies the server, ``client_cert``/``client_key`` authenticate us, ``verify: false`` turns
verification off (tests only).

Service registration (beyond the interface; the agent calls it when present):
``register_service(name, tags, port, check_url)`` registers the member's PostgreSQL with the local
agent as service ``name`` (the cluster), id ``<name>-<member>``, with an HTTP check on
``check_url`` (/primary for the master, /replica otherwise), replacing earlier checks; calling it
again on every role change keeps the tag current, so ``master.<cluster>.service.consul`` resolves
to the master only. ``dcs.consul.register_service: false`` turns both methods into no-ops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import consul.aio
import consul.base
from consul.callback import CB
from consul.check import Check
from consul.exceptions import ACLDisabled, ACLPermissionDenied, ConsulException, NotFound

from events.dcs.base import (
    DCS,
    AuthError,
    ClusterView,
    DCSError,
    DuplicateMember,
    Leader,
    SessionLost,
    TimelineCounter,
    build_view,
    decode_json_object,
    decode_timeline,
    require_own_incarnation,
)
from events.settings import ConfigError, ConsulSettings, resolve_secret

log = logging.getLogger(__name__)

T = TypeVar("T")

# Consul's session_ttl_min default and its fixed maximum
DEFAULT_SESSION_TTL_MIN = 10.0
SESSION_TTL_MAX = 86400.0
# how much later than the TTL Consul may invalidate a session (its server arms 2 x TTL)
CONSUL_TTL_FACTOR = 2.0
LOCK_DELAY = "0s"
# upper bound of one ordinary request; a third of the session TTL when that is smaller, so a
# master gets several renewal attempts before its lease lapses
MAX_REQUEST_TIMEOUT = 2.0
DEFAULT_WATCH_WAIT = 10.0
# Consul adds up to wait/16 to a blocking query; then the answer still has to travel
WATCH_MARGIN = 2.0
WATCH_BACKOFF_START = 0.05
WATCH_BACKOFF_CAP = 2.0
WATCH_BURST = 10
WATCH_RATE = 20.0  # blocking reads per second once the burst is spent
REGISTER_ATTEMPTS = 5
SERVICE_CHECK_INTERVAL = "5s"
SERVICE_CHECK_TIMEOUT = "2s"


class _WatchDropped(Exception):
    """The in-flight blocking query was cut (``_drop_watch_connection`` or ``close``)."""


class _NotFound(DCSError):
    """Consul answered 404 where the endpoint treats it as an error (session renew)."""


class _Transport(consul.aio.HTTPClient):  # type: ignore[misc]  # py-consul has no types
    """py-consul's asyncio HTTP client with our own aiohttp session: explicit TLS context, a
    bounded timeout on every request, created lazily inside the running loop."""

    def __init__(
        self,
        host: str,
        port: int,
        scheme: str,
        ssl_context: ssl.SSLContext | None,
        timeout: Callable[[], float],
    ) -> None:
        # deliberately not consul.aio.HTTPClient.__init__: it builds a connector with arguments
        # aiohttp deprecated (verify_ssl, ssl_context) and no timeout
        consul.base.HTTPClient.__init__(self, host, port, scheme, verify=True, cert=None)
        self._ssl = ssl_context
        self._timeout = timeout
        self._http: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=32, ssl=self._ssl if self._ssl is not None else True
                ),
            )
        return self._http

    async def _request(
        self,
        callback: Callable[[consul.base.Response], T],
        method: str,
        uri: str,
        headers: dict[str, str] | None,
        data: str | bytes | None = None,
        connections_timeout: float | None = None,
        raw: bool = False,
    ) -> T:
        timeout = aiohttp.ClientTimeout(total=connections_timeout or self._timeout())
        async with self._client().request(
            method, uri, headers=headers, data=data, timeout=timeout
        ) as resp:
            body: str | bytes = (
                await resp.read() if raw else await resp.text(encoding="utf-8", errors="replace")
            )
            return callback(consul.base.Response(resp.status, resp.headers, body))

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


class _Client(consul.aio.Consul):  # type: ignore[misc]  # py-consul has no types
    """consul.aio.Consul on our transport; the token comes from our config only."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        scheme: str,
        token: str | None,
        ssl_context: ssl.SSLContext | None,
        timeout: Callable[[], float],
    ) -> None:
        self._ssl_context = ssl_context
        self._timeout_fn = timeout
        super().__init__(host=host, port=port, scheme=scheme, token=token, verify=True)
        # py-consul lets CONSUL_HTTP_TOKEN override an explicit token: not with us
        self.token = token

    def http_connect(
        self, host: str, port: int, scheme: str, verify: bool | str = True, cert: Any = None
    ) -> _Transport:
        return _Transport(host, port, scheme, self._ssl_context, self._timeout_fn)


class _TokenBucket:
    """Lets ``burst`` calls through at once, then ``rate`` per second."""

    def __init__(self, burst: int, rate: float) -> None:
        self.capacity = float(burst)
        self.tokens = float(burst)
        self.rate = rate
        self.stamp = time.monotonic()

    async def take(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            await asyncio.sleep((1.0 - self.tokens) / self.rate)
            self.stamp = time.monotonic()
            self.tokens = 1.0
        self.tokens -= 1.0


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _parse_duration(text: Any) -> float | None:
    """Seconds of a Go duration string as Consul prints them ("10s", "1m0s"); None if not one."""
    if not isinstance(text, str) or not text:
        return None
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if m is None:
            return None
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return total


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")


def _describe(exc: BaseException) -> str:
    # aiohttp's messages name host and port; request headers (the token) never appear in them
    text = str(exc)
    name = exc.__class__.__name__
    return f"{name}: {text}" if text and text != name else name


def _resolve_token(settings: ConsulSettings) -> str | None:
    token = resolve_secret(settings.token, settings.token_file, "dcs.consul.token_file")
    return (token.strip() or None) if token is not None else None


def _build_ssl(settings: ConsulSettings, scheme: str) -> ssl.SSLContext | None:
    tls_files = {
        "ca_cert": settings.ca_cert,
        "client_cert": settings.client_cert,
        "client_key": settings.client_key,
    }
    if scheme != "https":
        given = [f"dcs.consul.{k}" for k, v in tls_files.items() if v is not None]
        if given:
            raise ConfigError(
                f"{', '.join(given)} set but dcs.consul.url is not https://: use an https URL"
            )
        return None
    if settings.client_key is not None and settings.client_cert is None:
        raise ConfigError("dcs.consul.client_key is set without dcs.consul.client_cert")
    try:
        ctx = ssl.create_default_context(
            cafile=str(settings.ca_cert) if settings.ca_cert is not None else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load dcs.consul.ca_cert {settings.ca_cert}: {exc}") from None
    if settings.client_cert is not None:
        try:
            ctx.load_cert_chain(
                str(settings.client_cert),
                str(settings.client_key) if settings.client_key is not None else None,
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load dcs.consul.client_cert/client_key "
                f"({settings.client_cert}, {settings.client_key}): {exc}"
            ) from None
    if not settings.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class ConsulDCS(DCS):
    def __init__(
        self,
        settings: ConsulSettings,
        cluster: str,
        prefix: str = "pgsidecar",
        *,
        watch_wait: float = DEFAULT_WATCH_WAIT,
        request_timeout: float | None = None,
    ) -> None:
        super().__init__(cluster, prefix)
        parts = urlsplit(settings.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"dcs.consul.url must look like http://host:8500 or https://host:8501, "
                f"got {settings.url!r}"
            )
        if parts.path not in ("", "/") or parts.query:
            raise ConfigError(f"dcs.consul.url must not carry a path or query: {settings.url!r}")
        self._url = f"{parts.scheme}://{parts.netloc}"
        self._tls_without_cert = parts.scheme == "https" and settings.client_cert is None
        self._token = _resolve_token(settings)
        self._min_ttl = float(settings.session_ttl_min)
        self._register_enabled = settings.register_service
        self._watch_wait = watch_wait
        self._request_timeout = request_timeout
        host = parts.hostname
        port = parts.port or (8501 if parts.scheme == "https" else 8500)
        self._client = _Client(
            host=f"[{host}]" if ":" in host else host,
            port=port,
            scheme=parts.scheme,
            token=self._token,
            ssl_context=_build_ssl(settings, parts.scheme),
            timeout=lambda: self.timeout,
        )
        self._session_id: str | None = None
        self._ttl = 0.0
        self._member: str | None = None
        self._service_id: str | None = None
        self._closed = False
        self._watch_requests: set[asyncio.Future[Any]] = set()

    def __repr__(self) -> str:  # never shows the token
        return f"ConsulDCS(cluster={self.cluster!r}, prefix={self.prefix!r}, url={self._url!r})"

    # -- TTL arithmetic (see the module docstring) ----------------------------------------------
    @property
    def session_ttl(self) -> float:
        """The TTL of our session: the lease a master can rely on after its last renew."""
        return self._ttl if self._session_id is not None else 0.0

    @property
    def worst_case_expiry(self) -> float:
        """How long the keys of our session may survive our last renew: Consul may take up to
        twice the TTL to invalidate a lapsed session."""
        return CONSUL_TTL_FACTOR * self.session_ttl

    @property
    def min_session_ttl(self) -> float:
        return self._min_ttl

    def session_ttl_for(self, ttl: float) -> float:
        """The session TTL that ``open_session(ttl)`` asks Consul for: half the configured ttl,
        because Consul may take up to twice the session TTL to invalidate a lapsed session. The
        master relies on the session TTL (it fences on it); a replica waits out at most
        2 x session TTL = ttl. Consul's minimum session TTL (10 s by default) wins over this."""
        return float(min(SESSION_TTL_MAX, max(math.ceil(ttl / CONSUL_TTL_FACTOR), self._min_ttl)))

    @property
    def timeout(self) -> float:
        if self._request_timeout is not None:
            return self._request_timeout
        ttl = self._ttl or MAX_REQUEST_TIMEOUT * 3
        return min(ttl / 3.0, MAX_REQUEST_TIMEOUT)

    # -- plumbing -------------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        if self._token:
            text = text.replace(self._token, "***")
        return text

    async def _call(self, what: str, coro: Awaitable[T]) -> T:
        """Await one py-consul call; translate every failure into DCSError/AuthError. The
        translated error is raised outside the ``except`` block, so it carries no ``__context__``:
        the original exception (whose request_info holds the token header, and whose text may echo
        a server's error body) cannot reach a traceback or an error reporter."""
        try:
            return await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure becomes a DCSError below
            error = self._translate(what, exc)
        raise error

    def _translate(self, what: str, exc: Exception) -> DCSError:
        if isinstance(exc, ACLPermissionDenied):
            detail = self._scrub(str(exc)) or "403"
            hint = (
                "check the dcs.consul.token (or dcs.consul.token_file) setting and the token's "
                "policy (key:write on the prefix, session:write, service:write)"
                if self._token
                else "Consul requires an ACL token: set dcs.consul.token or dcs.consul.token_file"
            )
            return AuthError(f"Consul refused {what} (403 {detail}); {hint}")
        if isinstance(exc, NotFound):
            return _NotFound(f"Consul {what}: 404 {self._scrub(str(exc))[:300]}")
        if isinstance(exc, ACLDisabled):
            return DCSError(f"Consul {what}: 401 {self._scrub(str(exc))[:300]}")
        if isinstance(exc, aiohttp.ClientSSLError):
            return AuthError(
                f"TLS with Consul failed during {what} ({self._scrub(_describe(exc))}): check "
                f"dcs.consul.ca_cert, dcs.consul.client_cert/client_key and dcs.consul.verify"
            )
        if isinstance(exc, (aiohttp.ClientError, TimeoutError, OSError)):
            hint = ""
            if isinstance(exc, aiohttp.ServerDisconnectedError) and self._tls_without_cert:
                # with TLS 1.3 a server that requires a client certificate hangs up only after
                # the handshake: it looks like any disconnect, so say what it may be
                hint = (
                    "; if Consul requires client certificates (verify_incoming), set "
                    "dcs.consul.client_cert and dcs.consul.client_key"
                )
            return DCSError(
                f"Consul {what} failed ({self._url}: {self._scrub(_describe(exc))}){hint}"
            )
        if isinstance(exc, ConsulException):
            return DCSError(f"Consul {what}: {self._scrub(str(exc))[:300]}")
        if isinstance(exc, DCSError):
            return exc
        # garbage instead of the JSON Consul documents (ValueError, TypeError, KeyError, ...)
        return DCSError(f"Consul {what}: unexpected answer ({exc.__class__.__name__})")

    def _require_session(self) -> str:
        if self._session_id is None:
            raise SessionLost(
                "no Consul session: open_session was not called or the session was closed"
            )
        return self._session_id

    def _session_gone(self, exc: DCSError) -> bool:
        # Consul answers an acquire with a session that no longer exists with a 500 naming it
        return "invalid session" in str(exc).lower()

    async def _get(self, key: str) -> dict[str, Any] | None:
        _index, entry = await self._call(f"read of {key}", self._client.kv.get(key))
        if entry is not None and not isinstance(entry, dict):
            raise DCSError(f"Consul read of {key}: unexpected answer")
        return entry

    async def _put(self, what: str, key: str, value: bytes, **params: Any) -> bool:
        result = await self._call(what, self._client.kv.put(key, value, **params))
        if not isinstance(result, bool):
            raise DCSError(f"Consul {what}: expected true/false, got {type(result).__name__}")
        return result

    async def _delete(self, what: str, key: str, **params: Any) -> bool:
        result = await self._call(what, self._client.kv.delete(key, **params))
        if not isinstance(result, bool):
            raise DCSError(f"Consul {what}: expected true/false, got {type(result).__name__}")
        return result

    async def _acquire(self, what: str, key: str, value: bytes) -> bool:
        sid = self._require_session()
        try:
            return await self._put(what, key, value, acquire=sid)
        except DCSError as exc:
            if self._session_gone(exc):
                raise SessionLost(f"Consul session {sid} no longer exists ({what})") from None
            raise

    def _view(self, entries: list[dict[str, Any]] | None, index: int) -> ClusterView:
        rows: list[tuple[str, bytes, int, bool]] = []
        for entry in entries or ():
            key = entry.get("Key")
            if not isinstance(key, str):
                continue
            value = entry.get("Value") or b""
            if isinstance(value, str):
                value = value.encode("utf-8")
            rows.append((key, value, int(entry.get("ModifyIndex", 0)), bool(entry.get("Session"))))
        return build_view(self.base, rows, index)

    async def _read_prefix(
        self, index: int = 0, wait: float | None = None
    ) -> tuple[int, list[dict[str, Any]]]:
        kwargs: dict[str, Any] = {"recurse": True}
        if index and wait is not None:
            kwargs.update(
                index=str(index),
                wait=f"{int(wait * 1000)}ms",
                connections_timeout=wait + wait / 16 + WATCH_MARGIN,
            )
        raw_index, entries = await self._call(
            f"read of {self.base}", self._client.kv.get(self.base, **kwargs)
        )
        try:
            new_index = int(raw_index)
        except (TypeError, ValueError):
            raise DCSError(
                f"Consul read of {self.base}: bad X-Consul-Index {raw_index!r}"
            ) from None
        if entries is None:
            return new_index, []
        # garbage must end here as a DCSError, never as a view or a crash in watch()
        if not isinstance(entries, list) or not all(
            isinstance(e, dict)
            and isinstance(e.get("Key"), str)
            and isinstance(e.get("ModifyIndex"), int)
            for e in entries
        ):
            raise DCSError(f"Consul read of {self.base}: unexpected answer")
        return new_index, entries

    # -- lifecycle ------------------------------------------------------------------------------
    async def connect(self) -> None:
        self._closed = False
        leader = await self._call("status/leader", self._client.status.leader())
        if not leader:
            raise DCSError(f"Consul at {self._url} has no raft leader (yet)")
        # a KV read checks the token too (status endpoints need none)
        await self._get(self.key("leader"))

    async def close(self) -> None:
        self._closed = True
        for req in list(self._watch_requests):
            req.cancel()
        await self._client.close()

    # -- session --------------------------------------------------------------------------------
    async def open_session(self, ttl: float) -> None:
        if self._session_id is not None:
            # one session per agent: a new one replaces the old (whose keys go with it)
            with contextlib.suppress(DCSError):
                await self.close_session()
        want = self.session_ttl_for(ttl)
        body = {
            "Name": f"pgsidecar-{self.cluster}-{socket.gethostname()}"[:128],
            "LockDelay": LOCK_DELAY,
            "Behavior": "delete",
            "TTL": f"{want:g}s",
            "NodeChecks": [],
            "Checks": [],
        }
        # raw call: py-consul's session.create insists on 10 <= ttl and cannot send NodeChecks
        create = self._client.http.put(
            CB.json(is_id=True),
            "/v1/session/create",
            params=[],
            headers=self._client.prepare_headers(),
            data=json.dumps(body),
        )
        try:
            sid = await self._call(f"session create (TTL {want:g} s)", create)
        except DCSError as exc:
            if "Invalid Session TTL" not in str(exc):
                raise
            error = DCSError(
                f"{exc}; the Consul servers' session_ttl_min is above {want:g} s: raise the "
                f"cluster ttl, or set dcs.consul.session_ttl_min to the servers' value"
            )
            raise error from None
        if not isinstance(sid, str) or not sid:
            raise DCSError("Consul session create: no session ID in the answer")
        self._session_id = sid
        self._ttl = want
        log.debug("Consul session %s created, ttl %g s", sid, want)

    async def renew_session(self) -> None:
        sid = self._require_session()
        try:
            info = await self._call("session renew", self._client.session.renew(sid))
        except _NotFound:
            raise SessionLost(
                f"Consul session {sid} no longer exists (expired or invalidated)"
            ) from None
        if info is None:
            raise SessionLost(f"Consul session {sid} no longer exists")
        # Consul may answer with a larger TTL (a loaded server asking for fewer renewals); it is
        # still a lower bound of the lease, so session_ttl follows it
        granted = _parse_duration(info.get("TTL")) if isinstance(info, dict) else None
        if granted is not None and granted > self._ttl:
            self._ttl = granted

    async def close_session(self) -> None:
        sid = self._session_id
        if sid is None:
            return
        await self._call("session destroy", self._client.session.destroy(sid))
        self._session_id = None
        self._ttl = 0.0

    # -- leader ---------------------------------------------------------------------------------
    async def acquire_leader(self, name: str) -> Leader | None:
        sid = self._require_session()
        key = self.key("leader")
        entry = await self._get(key)
        if entry is not None and entry.get("Session"):
            if entry.get("Session") == sid and (entry.get("Value") or b"") == name.encode():
                return Leader(name, int(entry["ModifyIndex"]))
            return None
        if not await self._acquire("acquire of the leader key", key, name.encode()):
            return None
        entry = await self._get(key)
        if entry is None or entry.get("Session") != sid:
            # acquired, then lost before we could read it back: our session is gone
            raise SessionLost(f"Consul session {sid} lost the leader key right after acquiring")
        return Leader(name, int(entry["ModifyIndex"]))

    async def release_leader(self, name: str, term: int) -> bool:
        key = self.key("leader")
        entry = await self._get(key)
        if entry is None or int(entry.get("ModifyIndex", -1)) != term:
            return False
        if (entry.get("Value") or b"") != name.encode():
            return False
        return await self._delete("release of the leader key", key, cas=term)

    # -- members --------------------------------------------------------------------------------
    async def register_member(self, name: str, data: dict[str, Any]) -> None:
        sid = self._require_session()
        key = self.key("members", name)
        value = _dumps(data)
        self._member = name
        for _ in range(REGISTER_ATTEMPTS):
            if await self._acquire(f"registration of member {name}", key, value):
                return
            entry = await self._get(key)
            if entry is None or not entry.get("Session"):
                continue  # vanished or unlocked meanwhile: try again
            if entry.get("Session") == sid:
                continue  # cannot happen (we would have succeeded); retry rather than assume
            require_own_incarnation(name, key, entry.get("Value") or b"", data)
            # our previous incarnation, whose session may live on until its TTL: take the key
            await self._delete(
                f"takeover of member {name}", key, cas=int(entry.get("ModifyIndex", 0))
            )
        raise DCSError(f"could not register member {name!r}: its key kept changing under us")

    async def put_member(self, name: str, data: dict[str, Any]) -> None:
        self._member = name
        key = self.key("members", name)
        if not await self._acquire(f"update of member {name}", key, _dumps(data)):
            raise DuplicateMember(
                f"members/{name} is held by another session: another agent registered this name"
            )

    # -- initialize / config / commands --------------------------------------------------------
    async def try_initialize(self, name: str) -> bool:
        return await self._put("initialize", self.key("initialize"), name.encode(), cas=0)

    async def cancel_initialize(self, name: str) -> bool:
        key = self.key("initialize")
        entry = await self._get(key)
        if entry is None or (entry.get("Value") or b"") != name.encode():
            return False
        return await self._delete("cancel of initialize", key, cas=int(entry.get("ModifyIndex", 0)))

    async def put_config(self, config: dict[str, Any]) -> None:
        await self._put("write of config", self.key("config"), _dumps(config))

    async def put_switchover(self, command: dict[str, Any]) -> None:
        await self._put("write of switchover", self.key("switchover"), _dumps(command))

    async def put_standby_promoted(self, record: dict[str, Any]) -> None:
        await self._put("write of standby_promoted", self.key("standby_promoted"), _dumps(record))

    async def put_sync(self, state: dict[str, Any]) -> None:
        await self._put("write of sync", self.key("sync"), _dumps(state))

    async def delete_switchover(self) -> None:
        await self._delete("delete of switchover", self.key("switchover"))

    # -- scheduled backups ----------------------------------------------------------------------
    async def read_backup_slot(self, kind: str) -> tuple[dict[str, Any] | None, int]:
        return await self._read_object(self.key("backup", kind))

    async def read_sync(self) -> tuple[dict[str, Any] | None, int]:
        return await self._read_object(self.key("sync"))

    async def swap_sync(self, state: dict[str, Any], index: int) -> bool:
        # ?cas=0 creates only if absent; ?cas=N writes only if ModifyIndex is still N
        return await self._put("swap of sync", self.key("sync"), _dumps(state), cas=index)

    async def _read_object(self, key: str) -> tuple[dict[str, Any] | None, int]:
        """(the JSON object at ``key``, its ModifyIndex); (None, 0) when absent."""
        entry = await self._get(key)
        if entry is None:
            return None, 0
        value, _reason = decode_json_object(key, entry.get("Value") or b"")
        return value, int(entry.get("ModifyIndex", 0))

    async def swap_backup_slot(self, kind: str, value: dict[str, Any], index: int) -> bool:
        # Consul's ?cas=0 is "only if absent", ?cas=N "only if ModifyIndex is still N"
        return await self._put(
            f"swap of backup/{kind}", self.key("backup", kind), _dumps(value), cas=index
        )

    # -- the cluster's timeline counter ---------------------------------------------------------
    async def read_timeline(self) -> TimelineCounter:
        entry = await self._get(self.key("timeline"))
        if entry is None:
            return TimelineCounter()
        value = decode_timeline(entry.get("Value"))
        return TimelineCounter(value or 0, int(entry.get("ModifyIndex", 0)))

    async def put_timeline(self, value: int, index: int) -> bool:
        # ?cas=0 creates only if absent; ?cas=N writes only if ModifyIndex is still N
        return await self._put(
            "write of timeline", self.key("timeline"), str(value).encode(), cas=index
        )

    # -- reading --------------------------------------------------------------------------------
    async def read_cluster(self) -> ClusterView:
        index, entries = await self._read_prefix()
        return self._view(entries, index)

    async def _watch_read(self, index: int) -> tuple[int, list[dict[str, Any]]]:
        req = asyncio.ensure_future(self._read_prefix(index, self._watch_wait))
        self._watch_requests.add(req)
        try:
            return await req
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if req.cancelled() and task is not None and task.cancelling() == 0:
                raise _WatchDropped from None  # cut by a hook or close(), not by our caller
            raise
        finally:
            self._watch_requests.discard(req)

    async def watch(self) -> AsyncIterator[ClusterView]:
        """See DCS.watch and the module docstring. Ends (without raising) after close()."""
        index = 0
        backoff = WATCH_BACKOFF_START
        bucket = _TokenBucket(WATCH_BURST, WATCH_RATE)
        while not self._closed:
            await bucket.take()
            try:
                new_index, entries = await self._watch_read(index)
                view = self._view(entries, max(new_index, 1))
            except _WatchDropped:
                if self._closed:
                    return
                log.info("Consul watch of %s: connection dropped, resuming", self.base)
                continue
            except Exception as exc:  # never raise out of watch (its contract): retry instead
                if self._closed:
                    return
                log.info("Consul watch of %s failed: %s", self.base, self._scrub(str(exc)))
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, WATCH_BACKOFF_CAP)
                continue
            backoff = WATCH_BACKOFF_START
            # Consul's rule: an index must be at least 1 (blocking on 0 would not block at all)
            new_index = max(new_index, 1)
            if index and new_index < index:
                # Consul's rule: an index that goes backwards resets the loop to a full read
                log.info(
                    "Consul watch of %s: index went back (%d -> %d), full re-read",
                    self.base,
                    index,
                    new_index,
                )
                index = 0
                continue
            changed = index == 0 or new_index > index
            index = new_index
            if changed:
                yield view

    # -- service registration (beyond the interface) --------------------------------------------
    async def register_service(
        self,
        name: str,
        tags: list[str],
        port: int,
        check_url: str,
        *,
        address: str | None = None,
        check_interval: str = SERVICE_CHECK_INTERVAL,
        check_timeout: str = SERVICE_CHECK_TIMEOUT,
        deregister_after: str | None = None,
    ) -> None:
        """Register (or update) our PostgreSQL as service ``name`` with ``tags`` and an HTTP
        check on ``check_url``. Idempotent: call it on every role change."""
        if not self._register_enabled:
            return
        member = self._member or socket.gethostname()
        service_id = f"{name}-{member}"
        if self._service_id is not None and self._service_id != service_id:
            await self.deregister_service()
        ok = await self._call(
            f"registration of service {service_id}",
            self._client.agent.service.register(
                name,
                service_id=service_id,
                address=address,
                port=port,
                tags=list(tags),
                meta={"member": member, "cluster": self.cluster},
                check=Check.http(
                    check_url, check_interval, timeout=check_timeout, deregister=deregister_after
                ),
                replace_existing_checks=True,
            ),
        )
        if not ok:
            raise DCSError(f"Consul refused the registration of service {service_id}")
        self._service_id = service_id

    async def deregister_service(self) -> None:
        if not self._register_enabled or self._service_id is None:
            return
        await self._call(
            f"deregistration of service {self._service_id}",
            self._client.agent.service.deregister(self._service_id),
        )
        self._service_id = None

    # -- test hooks (used by tests/contract/test_dcs_contract.py; every backend implements them) ---------
    async def _drop_watch_connection(self) -> None:
        """Cut the connection of every running watch, as a network failure would."""
        for req in list(self._watch_requests):
            req.cancel()

    async def _put_raw(self, key: str, value: bytes) -> None:
        """Write ``value`` verbatim under the full store ``key`` (no session)."""
        await self._put(f"raw write of {key}", key, value)

    async def _delete_prefix(self) -> None:
        """Delete every key of this cluster (test cleanup)."""
        await self._delete(f"delete of {self.base}", self.base, recurse=True)
