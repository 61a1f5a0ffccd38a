"""The agent's REST API (aiohttp).

Health checks speak the paths, query parameters and status codes that Patroni documents, so an
HAProxy, Consul or Kubernetes configuration written for Patroni works unchanged: 200 = send this
kind of traffic here, 503 = do not. GET answers with the member's status as JSON (and, on 503,
a ``reason``); HEAD and OPTIONS answer with the status code only (HAProxy's ``option httpchk``
sends OPTIONS by default).

| path | 200 when |
|---|---|
| ``/``, ``/primary``, ``/read-write``, ``/master`` | master, lease held and valid on the watchdog's clock, PostgreSQL running and not in recovery |
| ``/leader`` | this member holds the leader lease (valid on the watchdog's clock), whatever its PostgreSQL does |
| ``/standby-leader`` | never: pgsidecar has no standby clusters (a cluster replicating from another cluster) |
| ``/replica`` | a running replica whose WAL receiver streams, not tagged ``noloadbalance`` (``?lag=``, ``?replication_state=``, ``?tag_<key>=<value>``) |
| ``/read-only`` | ``/primary`` or ``/replica`` (same query parameters) |
| ``/synchronous``, ``/sync`` | a ``/replica`` that is in the synchronous set the current master recorded in the DCS (synchronous_mode on/strict) |
| ``/read-only-sync`` | ``/primary`` or ``/synchronous`` |
| ``/asynchronous``, ``/async`` | a ``/replica`` that is not in the synchronous set |
| ``/health`` | PostgreSQL is running (any role) |
| ``/liveness`` | the agent's loop and its input sources are alive (no SQL, no DCS call) |
| ``/readiness`` | ``/primary``, or a streaming replica within ``?lag=`` (default ``maximum_lag_on_failover``) of the master's last published position; ``?mode=apply`` (default) or ``write`` |

Deliberate differences from Patroni, each toward "do not route traffic here":

* ``/primary`` is stricter: Patroni answers 200 on the holder of the leader lock; we also
  require the watchdog's fencing deadline to be in the future, so the check turns 503 the
  moment the master must stop accepting writes, before the machine has even processed it.
* ``/replica`` requires the WAL receiver to stream (Patroni's ``?replication_state=streaming``
  is therefore always in force): a standby that lost its upstream may be arbitrarily stale.
  Streaming means messages still arrive from the sender, not only pg_stat_wal_receiver's
  status, which stays 'streaming' for wal_receiver_timeout after a partition (ARCHITECTURE.md,
  "The stream guard").
* A malformed ``?lag=`` or ``?mode=`` answers 400 naming the problem; Patroni ignores a lag it
  cannot parse (no limit), which would silently route reads to a lagging replica.
* Tags are the member's configured tags (``nofailover``, ``noloadbalance``, ``clonefrom``,
  ``nosync``, ``failover_priority``); booleans compare as ``true``/``false``, as in Patroni.

Endpoints that change something require the API token (``Authorization: Bearer <token>``); with
no token configured they are disabled. They are also refused (403) to clients outside
``api.command_networks``, whatever token they send.

With ``api.tls.enabled`` the server speaks only TLS on its port (a plain HTTP request fails the
handshake and gets no answer), and with ``api.tls.client_auth: required`` a client without a
certificate from ``api.tls.ca_file`` cannot connect at all.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from fsm.machine import Role
from fsm.snapshot import Snapshot
from pgsidecar.config import ApiSettings
from pgsidecar.postgres.conf import parse_size


class AgentStatus(Protocol):
    """What the API reads of the agent and the commands it sends it
    (pgsidecar.agent.loop.AgentApi is the real one)."""

    @property
    def name(self) -> str: ...

    @property
    def cluster(self) -> str: ...

    def role(self) -> Role: ...

    def snapshot(self) -> Snapshot: ...

    def lease_valid(self) -> bool:
        """The fencing deadline has not passed (our own clock)."""
        ...

    def pg_running(self) -> bool: ...

    def fencing_margin(self) -> float | None:
        """Seconds before the fencing deadline of the lease we hold (None: none held)."""
        ...

    def term(self) -> int | None: ...

    def last_error(self) -> str | None: ...

    def uptime(self) -> float: ...

    def counters(self) -> Mapping[str, int]: ...

    def tags(self) -> dict[str, Any]: ...

    def own_member_key(self) -> Mapping[str, Any]:
        """Our member key as the DCS last showed it."""
        ...

    def alive(self) -> tuple[bool, str]:
        """The loop and its input sources run; else why not."""
        ...

    def backup_health(self) -> dict[str, Any] | None:
        """Archiving and the last backup (Archiving.health); None without a backup section."""
        ...

    def command(self, name: str) -> None:
        """Post an operator's command (restart, reinit) to the machine."""
        ...

    async def request_switchover(self, target: str | None) -> dict[str, Any]:
        """Validate and write a switchover command; raises ops.SwitchoverError."""
        ...


class QueryError(ValueError):
    """A health-check query parameter that cannot be honoured (answered with 400)."""


def parse_lag(text: str) -> int:
    """``1048576``, ``1024kB``, ``10MB``, ``1.5GB`` -> bytes. Raises QueryError."""
    try:
        return parse_size(text)
    except ValueError:
        raise QueryError(
            f"lag={text!r} is not a size: give bytes (1048576) or a number with a unit "
            "(B, kB, MB, GB, TB), e.g. lag=10MB"
        ) from None


@dataclass(frozen=True)
class HealthFacts:
    """What the health checks decide on, read from the agent at one instant."""

    role: Role
    primary: bool  # the strict /primary meaning (see the module docstring)
    lease_valid: bool  # holds the lease and its fencing deadline has not passed
    pg_running: bool
    streaming: bool
    replayed_lsn: int | None
    received_lsn: int | None
    leader_lsn: int | None  # the master's last published position (DCS)
    tags: Mapping[str, Any]
    synchronous: bool  # this member is in the recorded synchronous set
    maximum_lag_on_failover: int
    alive: bool
    alive_reason: str = ""


@dataclass(frozen=True)
class Verdict:
    code: int
    reason: str = ""


OK = Verdict(200)


def _first(query: Mapping[str, str], key: str) -> str | None:
    return query.get(key)


def _lag_of(f: HealthFacts, mode: str) -> int | None:
    """Bytes this member is behind the master's last published position (None: unknown)."""
    mine = f.received_lsn if mode == "write" else f.replayed_lsn
    if f.leader_lsn is None:
        return 0  # nothing published to compare with: Patroni counts that as not lagging
    if mine is None:
        return None
    return max(0, f.leader_lsn - mine)


def _replica_verdict(f: HealthFacts, query: Mapping[str, str]) -> Verdict:
    max_lag = None
    if (raw := _first(query, "lag")) is not None:
        max_lag = parse_lag(raw)
    if f.role is not Role.REPLICA:
        return Verdict(503, f"role is {f.role.value}, not replica")
    if not f.pg_running:
        return Verdict(503, "PostgreSQL is not running")
    if not f.streaming:
        return Verdict(503, "the WAL receiver is not streaming from the master")
    if f.tags.get("noloadbalance") is True:
        return Verdict(503, "tagged noloadbalance")
    state = _first(query, "replication_state")
    if state is not None and state != "streaming":
        return Verdict(503, f"replication_state is streaming, not {state!r}")
    if max_lag is not None:
        lag = _lag_of(f, "apply")
        if lag is None:
            return Verdict(503, "replay position unknown")
        if lag > max_lag:
            return Verdict(503, f"{lag} bytes behind the master, above lag={raw}")
    return OK


def _primary_verdict(f: HealthFacts) -> Verdict:
    if f.primary:
        return OK
    if f.role is not Role.MASTER:
        return Verdict(503, f"role is {f.role.value}, not master")
    if not f.lease_valid:
        return Verdict(503, "the leader lease is not held or its fencing deadline has passed")
    if not f.pg_running:
        return Verdict(503, "PostgreSQL is not running")
    return Verdict(503, "PostgreSQL is in recovery (not promoted yet)")


def _standby_leader_verdict(f: HealthFacts) -> Verdict:
    """A standby cluster's leader: it holds the lease and its PostgreSQL runs (read-only, from
    the source cluster)."""
    if f.role is not Role.STANDBY_LEADER:
        return Verdict(503, f"role is {f.role.value}, not standby_leader")
    if not f.lease_valid:
        return Verdict(503, "the leader lease is not held or its fencing deadline has passed")
    if not f.pg_running:
        return Verdict(503, "PostgreSQL is not running")
    return OK


def _tags_verdict(f: HealthFacts, query: Mapping[str, str]) -> Verdict:
    for key, wanted in query.items():
        if not key.startswith("tag_"):
            continue
        name = key[len("tag_") :]
        have = f.tags.get(name)
        if have is None:
            return Verdict(503, f"no tag {name!r} on this member")
        text = have if isinstance(have, str) else str(have).lower()
        if text != wanted:
            return Verdict(503, f"tag {name} is {text!r}, not {wanted!r}")
    return OK


# path -> kind of check; Patroni's spellings, including its aliases
CHECKS: dict[str, str] = {
    "/": "primary",
    "/primary": "primary",
    "/master": "primary",
    "/read-write": "primary",
    "/leader": "leader",
    "/standby-leader": "standby_leader",
    "/standby_leader": "standby_leader",
    "/replica": "replica",
    "/read-only": "read_only",
    "/synchronous": "sync",
    "/sync": "sync",
    "/read-only-sync": "read_only_sync",
    "/read-only-synchronous": "read_only_sync",
    "/asynchronous": "async",
    "/async": "async",
    "/health": "health",
    "/liveness": "liveness",
    "/readiness": "readiness",
}
# checks about holding the lease ignore ?tag_ (as Patroni does); the others apply them
_IGNORE_TAGS = frozenset({"primary", "leader", "standby_leader", "health", "liveness", "readiness"})


def evaluate(kind: str, f: HealthFacts, query: Mapping[str, str]) -> Verdict:
    """The status a health check answers. Pure: a function of the facts and the query.
    Raises QueryError for a parameter that cannot be honoured."""
    if kind == "primary":
        v = _primary_verdict(f)
    elif kind == "leader":
        v = OK if f.lease_valid else Verdict(503, "this member does not hold the leader lease")
    elif kind == "standby_leader":
        v = _standby_leader_verdict(f)
    elif kind == "replica":
        v = _replica_verdict(f, query)
    elif kind == "read_only":
        # the replica's checks run first so that a malformed ?lag= is refused on a master too
        rv = _replica_verdict(f, query)
        # a standby cluster's leader serves reads as its replicas do (it is never writable)
        v = OK if f.primary or _standby_leader_verdict(f) is OK else rv
    elif kind in ("sync", "async", "read_only_sync"):
        rv = _replica_verdict(f, query)
        if kind == "read_only_sync" and f.primary:
            v = OK
        elif kind == "async":
            v = (
                Verdict(503, "a synchronous standby, not an asynchronous one")
                if f.synchronous
                else rv
            )
        elif not f.synchronous:
            v = Verdict(
                503,
                "not a synchronous standby (the recorded synchronous set does not name us)",
            )
        else:
            v = rv
    elif kind == "health":
        v = OK if f.pg_running else Verdict(503, "PostgreSQL is not running")
    elif kind == "liveness":
        v = OK if f.alive else Verdict(503, f.alive_reason or "the agent loop is not running")
    elif kind == "readiness":
        mode = _first(query, "mode") or "apply"
        if mode not in ("apply", "write"):
            raise QueryError(f"mode={mode!r}: use mode=apply (replayed WAL) or mode=write")
        raw = _first(query, "lag")
        max_lag = parse_lag(raw) if raw is not None else f.maximum_lag_on_failover
        if f.primary or _standby_leader_verdict(f) is OK:
            v = OK
        elif f.role is not Role.REPLICA or not f.pg_running or not f.streaming:
            v = Verdict(503, "neither the master holding the lease nor a streaming replica")
        else:
            lag = _lag_of(f, mode)
            if lag is None:
                v = Verdict(503, "WAL position unknown")
            elif lag > max_lag:
                v = Verdict(503, f"{mode} lag {lag} bytes exceeds {max_lag}")
            else:
                v = OK
    else:
        raise KeyError(kind)
    if v.code == 200 and kind not in _IGNORE_TAGS:
        v = _tags_verdict(f, query)
    return v


def _names(value: Any) -> frozenset[str]:
    """A synchronous set as whatever shape the agent records it in: None, a name, an iterable of
    names, or an object with ``members``."""
    if value is None:
        return frozenset()
    members = getattr(value, "members", None)
    if members is not None and not isinstance(value, Mapping):
        value = members
    if isinstance(value, str):
        return frozenset({value})
    if isinstance(value, Mapping):
        value = value.get("members", value.keys())
    if isinstance(value, Iterable):
        return frozenset(v for v in value if isinstance(v, str))
    return frozenset()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiServer:
    def __init__(
        self,
        agent: AgentStatus,
        settings: ApiSettings,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.agent = agent
        self.settings = settings
        self.token = settings.resolve_token()
        # the agent's registry: the Kafka sink's metrics (records sent, spooled, dropped, Kafka
        # up) are in it too, so /metrics serves them
        self.registry: CollectorRegistry = registry if registry is not None else CollectorRegistry()
        self._role = Gauge(
            "pgsidecar_role", "1 for the member's current role", ["role"], registry=self.registry
        )
        self._lag = Gauge(
            "pgsidecar_lag_bytes",
            "bytes behind the master's last published LSN",
            registry=self.registry,
        )
        self._term = Gauge(
            "pgsidecar_term", "term of the current leader key", registry=self.registry
        )
        self._tl = Gauge("pgsidecar_timeline", "PostgreSQL timeline", registry=self.registry)
        self._running = Gauge(
            "pgsidecar_postgres_running", "1 if PostgreSQL runs", registry=self.registry
        )
        self._lease = Gauge(
            "pgsidecar_lease_held",
            "1 if this member holds the leader lease",
            registry=self.registry,
        )
        self._inputs = Gauge(
            "pgsidecar_inputs_total", "inputs processed by the machine", registry=self.registry
        )
        self._trans = Gauge(
            "pgsidecar_transitions_total", "transitions taken", registry=self.registry
        )
        self._malformed = Gauge(
            "pgsidecar_malformed_dcs_values_total",
            "DCS values skipped as malformed",
            registry=self.registry,
        )
        self._renewals = Gauge(
            "pgsidecar_lease_renewals_total",
            "successful renewals of the DCS session",
            registry=self.registry,
        )
        self._renewal_failures = Gauge(
            "pgsidecar_lease_renewal_failures_total",
            "renewals of the DCS session that failed (error or timeout)",
            registry=self.registry,
        )
        self._sessions_lost = Gauge(
            "pgsidecar_sessions_lost_total",
            "DCS sessions found lost (expired or invalidated) at renewal",
            registry=self.registry,
        )
        self._by_trigger = Gauge(
            "pgsidecar_transitions_by_trigger_total",
            "transitions taken, by trigger",
            ["trigger"],
            registry=self.registry,
        )
        self._margin = Gauge(
            "pgsidecar_fencing_margin_seconds",
            "seconds left before the fencing deadline of the lease held (NaN when none is held)",
            registry=self.registry,
        )
        self._paused = Gauge(
            "pgsidecar_paused",
            "1 if the cluster is paused (maintenance mode: no automatic action)",
            registry=self.registry,
        )
        self.app = web.Application()
        routes = []
        for path, kind in CHECKS.items():
            handler = self._check_handler(kind)
            # GET also answers HEAD (aiohttp strips the body); OPTIONS is what HAProxy sends
            routes.append(web.get(path, handler))
            routes.append(web.options(path, self._status_only(handler)))
        routes += [
            web.get("/status", self.status),
            web.get("/metrics", self.metrics),
            web.post("/switchover", self.switchover),
            web.post("/restart", self.restart),
            web.post("/reinit", self.reinit),
        ]
        self.app.add_routes(routes)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        cfg = self.settings
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        ssl_context = cfg.tls.server_context() if cfg.tls.enabled else None
        site = web.TCPSite(
            self._runner, cfg.listen, cfg.port, reuse_address=True, ssl_context=ssl_context
        )
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- facts -----------------------------------------------------------------------------------

    def is_primary(self) -> bool:
        a = self.agent
        s = a.snapshot()
        return (
            a.role() is Role.MASTER
            and s.lease.held
            and a.lease_valid()
            and a.pg_running()
            and s.pg.in_recovery is False
        )

    def sync_members(self) -> frozenset[str]:
        """The synchronous standbys the current master recorded (``snapshot.dcs.sync``, folded
        from the DCS ``sync`` key). Read defensively (a name, a collection of names, or an
        object or mapping with ``members``) so the checks never fail on a shape they do not
        know. Not in force, so empty: a set recorded by an earlier master, or any set while
        synchronous_mode is off."""
        s = self.agent.snapshot()
        if s.settings.synchronous_mode == "off":
            # the master requires no standby then, though its last record stays in the DCS
            return frozenset()
        dcs = s.dcs
        sync = dcs.sync
        recorded_by = getattr(sync, "leader", None)
        if (
            isinstance(recorded_by, str)
            and dcs.leader is not None
            and dcs.leader.name != recorded_by
        ):
            return frozenset()  # recorded by an earlier master: not the set now in force
        return _names(sync)

    def facts(self) -> HealthFacts:
        a = self.agent
        s = a.snapshot()
        alive, why = a.alive()
        lease_valid = bool(s.lease.held and a.lease_valid())
        return HealthFacts(
            role=a.role(),
            primary=self.is_primary(),
            lease_valid=lease_valid,
            pg_running=bool(a.pg_running()),
            streaming=s.pg.receiver_streaming,
            replayed_lsn=s.pg.replayed_lsn if s.pg.replayed_lsn is not None else s.pg.lsn,
            received_lsn=s.pg.received_lsn if s.pg.received_lsn is not None else s.pg.lsn,
            leader_lsn=s.dcs.last_leader_lsn,
            tags=a.tags(),
            synchronous=a.name in self.sync_members(),
            maximum_lag_on_failover=s.settings.maximum_lag_on_failover,
            alive=alive,
            alive_reason=why,
        )

    def status_dict(self) -> dict[str, Any]:
        a = self.agent
        s = a.snapshot()
        role = a.role()
        leader = s.dcs.leader
        lag = None
        if s.dcs.last_leader_lsn is not None and s.pg.lsn is not None and role is not Role.MASTER:
            lag = max(0, s.dcs.last_leader_lsn - s.pg.lsn)
        return {
            "name": a.name,
            "cluster": a.cluster,
            "role": role.value,
            "term": a.term(),
            "timeline": s.pg.timeline,
            "lsn": s.pg.lsn,
            "lag_bytes": lag if role is not Role.MASTER else 0,
            "leader": leader.name if leader else None,
            "pg_running": a.pg_running(),
            "in_recovery": s.pg.in_recovery,
            "streaming": s.pg.receiver_streaming,
            "upstream": s.upstream,
            "lease_held": s.lease.held,
            "dcs_reachable": s.dcs.reachable,
            "paused": s.dcs.paused,
            "busy": s.busy,
            "last_error": a.last_error(),
            "uptime": round(a.uptime(), 1),
            "counters": dict(a.counters()),
            "tags": a.tags(),
            "sync_standby": a.name in self.sync_members(),
            # set by the agent in its member key once it applies parameter changes
            "pending_restart": a.own_member_key().get("pending_restart") is True,
            # a standby cluster's member: the source it follows (as published), or promoted
            "standby_cluster": {
                "source": a.own_member_key().get("standby_source"),
                "promoted": s.dcs.standby_promoted,
            }
            if s.settings.standby_cluster
            else None,
            # archiving and backups (None without a backup section; on a replica its fields
            # are None: the master archives and reads the repository)
            "backup": a.backup_health(),
        }

    # -- handlers ----------------------------------------------------------------------------------

    def _check_handler(self, kind: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            try:
                verdict = evaluate(kind, self.facts(), request.query)
            except QueryError as exc:
                return web.json_response({"error": str(exc)}, status=400)
            if kind == "liveness":
                # light by design (Kubernetes calls it often): no status document
                body: dict[str, Any] = {"alive": verdict.code == 200}
            else:
                body = self.status_dict()
            if verdict.reason:
                body["reason"] = verdict.reason
            return web.json_response(body, status=verdict.code)

        return handler

    @staticmethod
    def _status_only(handler: Handler) -> Handler:
        async def status_only(request: web.Request) -> web.Response:
            resp = await handler(request)
            return web.Response(status=resp.status)

        return status_only

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status_dict())

    async def metrics(self, request: web.Request) -> web.Response:
        a = self.agent
        st = self.status_dict()
        role = a.role()
        for r in Role:
            self._role.labels(role=r.value).set(1 if role is r else 0)
        self._lag.set(st["lag_bytes"] or 0)
        self._term.set(st["term"] or 0)
        self._tl.set(st["timeline"] or 0)
        self._running.set(1 if st["pg_running"] else 0)
        self._lease.set(1 if st["lease_held"] else 0)
        self._paused.set(1 if st["paused"] else 0)
        counters = a.counters()
        self._inputs.set(counters.get("inputs", 0))
        self._trans.set(counters.get("transitions", 0))
        self._malformed.set(counters.get("malformed_dcs_values", 0))
        self._renewals.set(counters.get("lease_renewals", 0))
        self._renewal_failures.set(counters.get("lease_renewal_failures", 0))
        self._sessions_lost.set(counters.get("sessions_lost", 0))
        for key, n in counters.items():
            if key.startswith("transition:"):
                self._by_trigger.labels(trigger=key.split(":", 1)[1]).set(n)
        margin = a.fencing_margin()
        self._margin.set(float("nan") if margin is None else margin)
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _refusal(self, request: web.Request) -> web.Response | None:
        """Why a request that changes something is refused (None: it may go on): a client
        outside ``api.command_networks`` (403), then a missing or wrong token (401)."""
        if not self.settings.command_allowed(request.remote):
            return web.json_response(
                {
                    "error": "requests that change something are not allowed from this address "
                    "(api.command_networks)"
                },
                status=403,
            )
        if not self._token_ok(request):
            return web.json_response(
                {"error": "missing or wrong API token (Authorization: Bearer <api.token>)"},
                status=401,
            )
        return None

    def _token_ok(self, request: web.Request) -> bool:
        if not self.token:
            return False  # no token configured: changes through the API are disabled
        got = request.headers.get("Authorization", "")
        prefix = "Bearer "
        return got.startswith(prefix) and hmac.compare_digest(
            got[len(prefix) :].encode(), self.token.encode()
        )

    async def _member_command(self, request: web.Request, name: str) -> web.Response:
        """restart / reinit of this member: an input of its machine, recorded like any other."""
        if (refused := self._refusal(request)) is not None:
            return refused
        a = self.agent
        role = a.role()
        s = a.snapshot()
        if name == "reinit" and role is Role.MASTER:
            return web.json_response(
                {"error": f"{a.name} is the master: switch over first, then reinit it"}, status=409
            )
        if name == "reinit" and s.dcs.leader is None:
            return web.json_response({"error": "there is no master to clone from"}, status=409)
        if name == "restart" and not a.pg_running():
            return web.json_response(
                {"error": f"PostgreSQL of {a.name} is not running"}, status=409
            )
        if s.command is not None:
            return web.json_response({"error": f"a {s.command} is already in progress"}, status=409)
        a.command(name)
        return web.json_response(
            {"accepted": name, "member": a.name, "role": role.value}, status=202
        )

    async def restart(self, request: web.Request) -> web.Response:
        return await self._member_command(request, "restart")

    async def reinit(self, request: web.Request) -> web.Response:
        return await self._member_command(request, "reinit")

    async def switchover(self, request: web.Request) -> web.Response:
        if (refused := self._refusal(request)) is not None:
            return refused
        try:
            body = await request.json()
        except Exception:
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        target = body.get("to")
        if target is not None and not isinstance(target, str):
            return web.json_response({"error": "'to' must be a member name"}, status=400)
        from pgsidecar.ops import SwitchoverError

        try:
            cmd = await self.agent.request_switchover(target)
        except SwitchoverError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        return web.json_response({"accepted": cmd}, status=202)
