"""The agent's REST API (aiohttp).

Health checks answer with the meaning load balancers expect (200 = serve traffic here, 503 =
do not): /primary is 200 only on the master while its PostgreSQL runs and the lease is held (on
the watchdog's clock, so it turns 503 the moment the fencing deadline passes, even before the
machine has processed it); /replica is 200 only on a streaming replica. Endpoints that change
something require the API token (``Authorization: Bearer <token>``).
"""

from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from fsm.machine import Role

if TYPE_CHECKING:
    from pgsidecar.agent import Agent


class ApiServer:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.token = agent.cfg.api.resolve_token()
        self.registry = CollectorRegistry()
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
        self.app = web.Application()
        self.app.add_routes(
            [
                web.get("/health", self.health),
                web.get("/liveness", self.health),
                web.get("/primary", self.primary),
                web.get("/master", self.primary),
                web.get("/read-write", self.primary),
                web.get("/replica", self.replica),
                web.get("/readiness", self.readiness),
                web.get("/status", self.status),
                web.get("/metrics", self.metrics),
                web.post("/switchover", self.switchover),
            ]
        )
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        cfg = self.agent.cfg.api
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.listen, cfg.port, reuse_address=True)
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- facts -----------------------------------------------------------------------------------

    def is_primary(self) -> bool:
        a = self.agent
        return (
            a.machine.role is Role.MASTER
            and a.snapshot.lease.held
            and a.watchdog.armed_and_valid()
            and a.pg.running
            and a.snapshot.pg.in_recovery is False
        )

    def is_streaming_replica(self) -> bool:
        a = self.agent
        s = a.snapshot
        return a.machine.role is Role.REPLICA and a.pg.running and s.pg.receiver_streaming

    def status_dict(self) -> dict[str, Any]:
        a = self.agent
        s = a.snapshot
        leader = s.dcs.leader
        lag = None
        if (
            s.dcs.last_leader_lsn is not None
            and s.pg.lsn is not None
            and a.machine.role is not Role.MASTER
        ):
            lag = max(0, s.dcs.last_leader_lsn - s.pg.lsn)
        return {
            "name": a.name,
            "cluster": a.cfg.cluster,
            "role": a.machine.role.value,
            "term": a._term(),
            "timeline": s.pg.timeline,
            "lsn": s.pg.lsn,
            "lag_bytes": lag if a.machine.role is not Role.MASTER else 0,
            "leader": leader.name if leader else None,
            "pg_running": a.pg.running,
            "in_recovery": s.pg.in_recovery,
            "streaming": s.pg.receiver_streaming,
            "upstream": s.upstream,
            "lease_held": s.lease.held,
            "dcs_reachable": s.dcs.reachable,
            "paused": s.dcs.paused,
            "busy": s.busy,
            "last_error": a.last_error,
            "uptime": round(time.time() - a.start_time, 1),
            "counters": dict(a.counters),
        }

    # -- handlers ----------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"state": "alive", "role": self.agent.machine.role.value})

    async def primary(self, request: web.Request) -> web.Response:
        return web.json_response(self.status_dict(), status=200 if self.is_primary() else 503)

    async def replica(self, request: web.Request) -> web.Response:
        return web.json_response(
            self.status_dict(), status=200 if self.is_streaming_replica() else 503
        )

    async def readiness(self, request: web.Request) -> web.Response:
        ok = self.is_primary() or self.is_streaming_replica()
        return web.json_response(self.status_dict(), status=200 if ok else 503)

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status_dict())

    async def metrics(self, request: web.Request) -> web.Response:
        a = self.agent
        st = self.status_dict()
        for r in Role:
            self._role.labels(role=r.value).set(1 if a.machine.role is r else 0)
        self._lag.set(st["lag_bytes"] or 0)
        self._term.set(st["term"] or 0)
        self._tl.set(st["timeline"] or 0)
        self._running.set(1 if st["pg_running"] else 0)
        self._lease.set(1 if st["lease_held"] else 0)
        self._inputs.set(a.counters["inputs"])
        self._trans.set(a.counters["transitions"])
        self._malformed.set(a.counters["malformed_dcs_values"])
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _authorized(self, request: web.Request) -> bool:
        if not self.token:
            return False  # no token configured: changes through the API are disabled
        got = request.headers.get("Authorization", "")
        prefix = "Bearer "
        return got.startswith(prefix) and hmac.compare_digest(got[len(prefix) :], self.token)

    async def switchover(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response(
                {"error": "missing or wrong API token (Authorization: Bearer <api.token>)"},
                status=401,
            )
        try:
            body = await request.json()
        except Exception:
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        target = body.get("to")
        if target is not None and not isinstance(target, str):
            return web.json_response({"error": "'to' must be a member name"}, status=400)
        from pgsidecar.ops import SwitchoverError, request_switchover

        try:
            cmd = await request_switchover(self.agent.dcs, target)
        except SwitchoverError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        return web.json_response({"accepted": cmd}, status=202)
