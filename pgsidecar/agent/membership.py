"""What the agent publishes about itself beside the machine: its member key, the master's
replication slots for the members, its Consul service registration, its pod's role label and the
pod killer. None of it decides anything; each runs as a task beside the loop."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import structlog

from events import netloc
from events.dcs import DCS, DCSError
from events.tasks import bounded
from fsm.machine import Role, standby_mode
from fsm.snapshot import Snapshot
from pgsidecar.agent.ports import Clock, PostgresPort
from pgsidecar.agent.state import NodeState, Post, TaskSet
from pgsidecar.config import AgentConfig, KubernetesSettings

log = structlog.get_logger("pgsidecar.agent")

# how long the master keeps the replication slot of a member whose key has vanished
SLOT_GRACE = 1800.0

# The member key is written only when something a peer acts on changes (every write fans out to
# every watcher of the cluster). The position is the one field that moves on its own: on an idle
# cluster PostgreSQL still writes a few records (checkpoints, running-transaction snapshots), and
# a replica replays them. Peers use a published position in two ways: candidates compare the
# fresh positions announced for an election (written by the announce effect whatever this says),
# and the master's is the reference for maximum_lag_on_failover. So a position is news when it
# moved by a step that the lag check can notice, a fraction of maximum_lag_on_failover (every
# byte when that is 0), at most LSN_STEP_MAX; and a replica's position is news when it reaches
# the master's published one (`pgsidecar list` shows a replica that caught up with lag 0).
LSN_STEP_FRACTION = 8
LSN_STEP_MAX = 1024 * 1024


_ABSENT = object()


def _equal_but_lsn(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """``a`` and ``b`` without their "lsn" are equal dicts (compared in place: this runs on
    every probe, and two filtered copies cost more than the comparison)."""
    if len(a) - ("lsn" in a) != len(b) - ("lsn" in b):
        return False
    for key, value in a.items():
        if key == "lsn":
            continue
        other = b.get(key, _ABSENT)
        if other is not value and other != value:
            return False
    return True


class Membership:
    """Our member key (published when what it says changes in a way a peer acts on), the
    master's replication slots, and the Consul service registration."""

    def __init__(
        self,
        cfg: AgentConfig,
        state: NodeState,
        dcs: DCS,
        pg: PostgresPort,
        tasks: TaskSet,
        clock: Clock,
        instance_id: str,
        ttl: float,
    ) -> None:
        self.cfg = cfg
        self.state = state
        self.dcs = dcs
        self.pg = pg
        self.tasks = tasks
        self.clock = clock
        self.instance_id = instance_id
        self.ttl = ttl  # the local config's (the DCS config may change the machine's)
        # what the member key takes from the config, computed once: the key is rebuilt on
        # every probe, and the API URL's address parsing was most of that work
        self._api_url = cfg.api.url
        self._tags = cfg.tags.model_dump()
        self._last: dict[str, Any] | None = None
        self._member_last_seen: dict[str, float] = {}
        # the members whose slots the last *successful* sync kept (None: none yet, or it failed)
        self._slot_members: set[str] | None = None

    # -- member key ------------------------------------------------------------------------------

    def member_data(self, **override: Any) -> dict[str, Any]:
        s = self.state.snapshot
        pg = s.pg
        cfg = self.cfg
        data = {
            "instance_id": self.instance_id,
            "role": self.state.role.value,
            "state": "running" if pg.running else "stopped",
            "running": pg.running,
            "streaming": pg.receiver_streaming,
            "timeline": pg.timeline,
            "lsn": pg.lsn,
            "host": cfg.postgresql.host,
            "port": cfg.postgresql.port,
            "api_url": self._api_url,
            "nofailover": cfg.tags.nofailover,
            "failover_priority": cfg.tags.failover_priority,
            "tags": dict(self._tags),
            "election": s.announced_term,
            "pending_restart": bool(self.state.pending_restart),
            "pending_restart_reason": self.state.pending_restart,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
        }
        if self.state.standby_source and standby_mode(s):
            # a standby cluster's member: the source it follows, for `list` and promote-cluster
            data["standby_source"] = ",".join(
                netloc.host_port(h, p) for h, p in self.state.standby_source
            )
        data.update(override)
        return data

    def published(self, data: dict[str, Any]) -> None:
        """``data`` was written to our member key by someone else (an effect, the renewal)."""
        self._last = data

    def forget_published(self) -> None:
        """Our member key is gone (with our session): the next publish writes it whatever."""
        self._last = None

    def lsn_step(self) -> int:
        """How far our position must move before it is worth a write on its own."""
        max_lag = self.state.snapshot.settings.maximum_lag_on_failover
        return min(LSN_STEP_MAX, max(0, max_lag) // LSN_STEP_FRACTION)

    def is_news(self, data: dict[str, Any]) -> bool:
        """Does ``data`` tell a peer something the last member key we wrote did not?"""
        last = self._last
        if last is None:
            return True
        if not _equal_but_lsn(data, last):
            return True
        new, old = data.get("lsn"), last.get("lsn")
        if new == old:
            return False
        if not isinstance(new, int) or not isinstance(old, int):
            return True
        if abs(new - old) >= max(1, self.lsn_step()):
            return True
        dcs = self.state.snapshot.dcs
        master_lsn = dcs.last_leader_lsn
        return (
            data.get("role") != Role.MASTER.value
            and master_lsn is not None
            and data.get("timeline") == dcs.last_leader_timeline
            and old < master_lsn <= new
        )

    def publish(self, **override: Any) -> None:
        data = self.member_data(**override)
        if not self.is_news(data):
            return
        self._last = data
        self.tasks.spawn(self._put(data), "put_member")

    async def _put(self, data: dict[str, Any]) -> None:
        try:
            await bounded(
                self.dcs.put_member(self.state.name, data),
                max(1.0, self.ttl / 3),
            )
        except (TimeoutError, DCSError) as exc:
            self._last = None  # try again on the next probe
            log.debug("member_publish_failed", error=str(exc))

    # -- replication slots (master) ----------------------------------------------------------------

    def on_master_view(self, s: Snapshot) -> None:
        """A view of the DCS while master and idle: keep a slot per member."""
        names = set(s.dcs.members) - {self.state.name}
        now = self.clock.monotonic()
        for n in names:
            self._member_last_seen[n] = now
        if names != self._slot_members:
            # marked done at once (one sync at a time); a failed sync clears it, so the next
            # view tries again: a member without its slot could never stream from us
            self._slot_members = names
            self.tasks.spawn(self.sync_slots(), "sync_slots")

    async def sync_slots(self) -> None:
        """Keep a physical slot for every member, and for a member that vanished for
        SLOT_GRACE seconds more (a restarting member must find its slot and the WAL it needs)."""
        now = self.clock.monotonic()
        for n in self.state.snapshot.dcs.members:
            if n != self.state.name:
                self._member_last_seen[n] = now
        keep = {n for n, seen in self._member_last_seen.items() if now - seen < SLOT_GRACE}
        try:
            await self.pg.ensure_slots(keep)
        except Exception as exc:
            self._slot_members = None  # retried on the next view of the DCS
            log.warning("slot_sync_failed", error=str(exc))

    # -- Consul service registration ---------------------------------------------------------------

    def register_service(self) -> None:
        """Consul: keep our PostgreSQL registered as service <cluster> tagged master or replica,
        with an HTTP check on /primary or /replica, so master.<cluster>.service.consul resolves
        to the master. Other backends have no such thing."""
        cfg = self.cfg
        register = getattr(self.dcs, "register_service", None)
        if register is None or cfg.dcs.type != "consul" or not cfg.dcs.consul.register_service:
            return
        master = self.state.role is Role.MASTER
        tag = "master" if master else "replica"
        check = f"{cfg.api.url}/{'primary' if master else 'replica'}"

        async def go() -> None:
            try:
                await bounded(
                    register(
                        cfg.cluster,
                        [tag],
                        cfg.postgresql.port,
                        check,
                        address=cfg.postgresql.host,
                    ),
                    5,
                )
            except Exception as exc:
                log.warning("service_registration_failed", error=str(exc))

        self.tasks.spawn(go(), "register_service")


class KubernetesGlue:
    """Pod events become inputs; our pod's role label follows the machine; the master may
    delete a long-unhealthy member's pod (off by default). Without a service-account token
    or API server the agent runs DCS-only: the watcher says so once and retries; nothing
    here ever blocks a failover."""

    def __init__(
        self,
        settings: KubernetesSettings,
        cluster: str,
        name: str,
        post: Post,
        record_action: Callable[[dict[str, Any]], None],
    ) -> None:
        self.settings = settings
        self.cluster = cluster
        self.name = name
        self.post = post
        self.record_action = record_action
        self.tasks = TaskSet()
        self.kube: Any = None
        self.labeler: Any = None
        self.pod_killer: Any = None
        self.pod_watcher: Any = None

    def start(self, role: Role) -> None:
        from events.k8s import KubeApi, PodKiller, PodLabeler, PodWatcher

        k = self.settings
        self.kube = KubeApi(k)
        self.labeler = PodLabeler(k, log, api=self.kube)
        self.pod_killer = PodKiller(k, log, own_member=self.name, api=self.kube)
        self.pod_watcher = PodWatcher(k, self._pod_event, log, api=self.kube, cluster=self.cluster)
        self.pod_watcher.start()
        self.labeler.start()
        self.label_role(role)

    def _pod_event(self, ev: Any) -> None:
        self.labeler.observe(ev)
        self.pod_killer.observe_pod(ev)
        self.post("pod", **ev.to_input()["data"])

    def label_role(self, role: Role) -> None:
        """The label follows the lease, never the other way round: master only while we are
        master; a demoting master loses its label as the transition's first step."""
        if self.labeler is None:
            return
        self.labeler.set_role(
            "master"
            if role is Role.MASTER
            else "replica"
            if role in (Role.REPLICA, Role.STANDBY_LEADER)
            else None
        )

    def on_view(self, s: Snapshot, role: Role) -> None:
        if self.pod_killer is None:
            return
        health = {
            n: m.running and (m.role == "master" or m.streaming or m.role in ("init", "rewinding"))
            for n, m in s.dcs.members.items()
        }
        self.pod_killer.observe_health(health)
        if role is Role.MASTER and self.settings.kill_unhealthy_pods:

            async def kill() -> None:
                body = await self.pod_killer.maybe_kill(is_master=True)
                if body is not None:
                    self.record_action(body)

            self.tasks.spawn(kill(), "pod_killer")

    async def close(self) -> None:
        await self.tasks.cancel_all()
        for closer in (self.pod_watcher, self.labeler, self.kube):
            if closer is not None:
                try:
                    await bounded(closer.close(), 3)
                except Exception as exc:
                    log.debug("kubernetes_close_failed", error=str(exc))
