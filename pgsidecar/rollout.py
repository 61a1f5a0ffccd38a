"""A rollout of an OnDelete StatefulSet, one member at a time, replicas first, the master last.

With ``updateStrategy: OnDelete`` the StatefulSet controller recreates a pod on the new revision
only when the pod is deleted. ``plan_rollout`` (pure) decides the order from the StatefulSet and
its pods: every replica behind ``status.updateRevision``, then (if the master is behind) a
switchover to an updated replica, then the old master. ``Rollout`` carries the plan out through
two ports: ``KubePort`` (the StatefulSet and its pods) and ``ClusterPort`` (the members as their
agents and the DCS see them). It stops at the first member that does not come back healthy in
time and says which and why (``RolloutError``).

A member is back when its pod is a new pod (another uid) on the update revision, Ready, and its
agent's /status says: a replica streaming from the master, or the master answering /primary
(writable). The switchover is the one `pgsidecar switchover` requests (``ops.request_switchover``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

REVISION_LABEL = "controller-revision-hash"
# a pod may name its member explicitly; otherwise the member is the pod (as events/k8s.py reads it)
MEMBER_LABEL = "pgsidecar.io/member"


class RolloutError(Exception):
    """The rollout cannot start, or stopped; the message names the member and the reason."""


# -- what the plan is made from ----------------------------------------------------------------


@dataclass(frozen=True)
class PodInfo:
    name: str
    member: str
    uid: str
    revision: str | None
    ready: bool
    deleting: bool

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> PodInfo:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        conditions = (pod.get("status") or {}).get("conditions") or []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        return cls(
            name=str(meta.get("name")),
            member=str(labels.get(MEMBER_LABEL) or meta.get("name")),
            uid=str(meta.get("uid") or ""),
            revision=labels.get(REVISION_LABEL),
            ready=ready,
            deleting=bool(meta.get("deletionTimestamp")),
        )


@dataclass(frozen=True)
class StatefulSetInfo:
    name: str
    strategy: str
    update_revision: str | None
    selector: str  # the pods' label selector (spec.selector.matchLabels)

    @classmethod
    def from_object(cls, sts: Mapping[str, Any]) -> StatefulSetInfo:
        spec = sts.get("spec") or {}
        match = (spec.get("selector") or {}).get("matchLabels") or {}
        return cls(
            name=str((sts.get("metadata") or {}).get("name")),
            strategy=str((spec.get("updateStrategy") or {}).get("type") or "RollingUpdate"),
            update_revision=(sts.get("status") or {}).get("updateRevision"),
            selector=",".join(f"{k}={v}" for k, v in sorted(match.items())),
        )


def ordinal(pod_name: str) -> int:
    """A StatefulSet pod's ordinal (pg-2 -> 2); -1 for a name without one."""
    tail = pod_name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


# -- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """``update``: delete the pod, wait until it is back on the new revision and healthy.
    ``switchover``: move the master to one of ``targets`` (the most advanced at that moment)."""

    action: Literal["update", "switchover"]
    member: str  # update: the member; switchover: the master it moves away from
    pod: str = ""
    role: Literal["replica", "master"] = "replica"
    targets: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.action == "switchover":
            return (
                f"switch over from {self.member} to the most advanced of {', '.join(self.targets)}"
            )
        was = " (the old master, now a replica)" if self.role == "master" else ""
        return f"delete pod {self.pod}, wait for {self.member}{was} back as a streaming replica"


@dataclass(frozen=True)
class Plan:
    statefulset: str
    revision: str
    steps: tuple[Step, ...]
    up_to_date: tuple[str, ...] = ()  # members already on the revision

    def describe(self) -> list[str]:
        head = f"rollout of statefulset {self.statefulset} to revision {self.revision}"
        if not self.steps:
            return [f"{head}: every member is on it already; nothing to do"]
        lines = [f"{head}:"]
        lines += [f"  {i}. {s.describe()}" for i, s in enumerate(self.steps, 1)]
        if self.up_to_date:
            lines.append(f"  already on the revision: {', '.join(self.up_to_date)}")
        return lines


def plan_rollout(sts: StatefulSetInfo, pods: Sequence[PodInfo], leader: str | None) -> Plan:
    """The order of a rollout: outdated replicas (highest ordinal first, as the StatefulSet
    controller updates), then, if the master is outdated, a switchover to an updated replica and
    the old master. Refuses (RolloutError) what it cannot do safely."""
    if sts.strategy != "OnDelete":
        raise RolloutError(
            f"statefulset {sts.name} has updateStrategy {sts.strategy}: the controller rolls it "
            "out itself; `pgsidecar rollout` is for updateStrategy OnDelete"
        )
    if not sts.update_revision:
        raise RolloutError(f"statefulset {sts.name} reports no status.updateRevision yet")
    if leader is None:
        raise RolloutError("the cluster has no master now; a rollout starts from a healthy cluster")
    by_member = {p.member: p for p in pods}
    if leader not in by_member:
        raise RolloutError(
            f"the master {leader} is not a pod of statefulset {sts.name} "
            f"(pods: {', '.join(sorted(p.name for p in pods)) or 'none'})"
        )
    busy = sorted(p.name for p in pods if p.deleting)
    if busy:
        raise RolloutError(f"pod(s) being deleted already: {', '.join(busy)}; wait and run again")
    rev = sts.update_revision
    ordered = sorted(pods, key=lambda p: (-ordinal(p.name), p.name))
    outdated = [p for p in ordered if p.revision != rev and p.member != leader]
    updated = [p.member for p in ordered if p.revision == rev and p.member != leader]
    steps = [Step("update", p.member, p.name, "replica") for p in outdated]
    master = by_member[leader]
    if master.revision != rev:
        targets = tuple(updated + [p.member for p in outdated])
        if not targets:
            raise RolloutError(
                f"{leader} is the only member: there is no replica to switch over to; "
                f"deleting pod {master.name} means downtime, do it yourself if you accept that"
            )
        steps.append(Step("switchover", leader, master.name, "master", targets))
        steps.append(Step("update", leader, master.name, "master"))
    return Plan(
        statefulset=sts.name,
        revision=rev,
        steps=tuple(steps),
        up_to_date=tuple(sorted(p.member for p in pods if p.revision == rev)),
    )


# -- the ports ---------------------------------------------------------------------------------


class KubePort(Protocol):
    async def get_statefulset(self, name: str) -> dict[str, Any]: ...

    async def list_pods(self, selector: str) -> dict[str, Any]: ...

    async def delete_pod(self, name: str, uid: str | None) -> dict[str, Any]: ...


class ClusterPort(Protocol):
    async def leader(self) -> str | None:
        """The member holding the leader key now."""

    async def member_status(self, member: str) -> dict[str, Any] | None:
        """The member's /status (its agent's REST API), or None when it does not answer."""

    async def writable(self, member: str) -> bool:
        """Whether the member's /primary check answers 200 (it leads and accepts writes)."""

    async def most_advanced(self, members: Sequence[str]) -> str | None:
        """Of ``members``, the running, streaming replica with the most WAL received."""

    async def switchover(self, master: str, target: str, within: float) -> str | None:
        """Ask for a switchover to ``target``; the new leader's name, None if none in time."""


def replica_healthy(st: Mapping[str, Any] | None, leader: str | None) -> str | None:
    """None if ``st`` (a member's /status) is a healthy streaming replica of ``leader``, else
    what is wrong, in words."""
    if st is None:
        return "its agent's API does not answer"
    if st.get("busy"):
        return f"its agent is busy ({st.get('busy')})"
    if not st.get("pg_running"):
        return "its PostgreSQL is not running"
    if st.get("role") != "replica":
        return f"its role is {st.get('role')}, not replica"
    if not st.get("streaming"):
        return "it is not streaming from the master"
    if leader is not None and st.get("leader") not in (None, leader):
        return f"it follows {st.get('leader')}, not the master {leader}"
    return None


# -- carrying it out ---------------------------------------------------------------------------


@dataclass
class Rollout:
    kube: KubePort
    cluster: ClusterPort
    statefulset: str
    member_timeout: float = 600.0
    switchover_timeout: float = 60.0
    poll: float = 1.0
    say: Callable[[str], None] = print
    clock: Callable[[], float] = time.monotonic
    done: list[str] = field(default_factory=list)  # members updated by this run

    async def read(self) -> tuple[StatefulSetInfo, list[PodInfo]]:
        sts = StatefulSetInfo.from_object(await self.kube.get_statefulset(self.statefulset))
        if not sts.selector:
            raise RolloutError(f"statefulset {sts.name} has no spec.selector.matchLabels")
        listed = await self.kube.list_pods(sts.selector)
        pods = [PodInfo.from_pod(p) for p in listed.get("items") or []]
        return sts, pods

    async def plan(self) -> Plan:
        sts, pods = await self.read()
        return plan_rollout(sts, pods, await self.cluster.leader())

    async def run(self, plan: Plan) -> None:
        for i, step in enumerate(plan.steps, 1):
            self.say(f"[{i}/{len(plan.steps)}] {step.describe()}")
            if step.action == "switchover":
                await self._switchover(step)
            else:
                await self._update(step, plan.revision)
                self.done.append(step.member)

    async def _switchover(self, step: Step) -> None:
        leader = await self.cluster.leader()
        if leader != step.member:
            raise RolloutError(
                f"stopped before the switchover: the master is {leader}, not {step.member} "
                "as planned; run the rollout again"
            )
        # the choice reads the members' keys in the DCS, which a member rewrites on its next
        # probe after its /status (what the step before waited on) shows it streaming: wait
        # for the keys to catch up, bounded, before calling the replicas unfit
        deadline = self.clock() + self.switchover_timeout
        while (target := await self.cluster.most_advanced(step.targets)) is None:
            if self.clock() > deadline:
                raise RolloutError(
                    f"stopped before the switchover: none of {', '.join(step.targets)} is a "
                    f"running, streaming replica (in its DCS member key) after "
                    f"{self.switchover_timeout:g} s"
                )
            await asyncio.sleep(self.poll)
        new = await self.cluster.switchover(step.member, target, self.switchover_timeout)
        if new != target:
            got = f"{new} leads instead" if new else "no new master"
            raise RolloutError(
                f"stopped at the switchover from {step.member} to {target}: {got} "
                f"within {self.switchover_timeout:g} s"
            )
        deadline = self.clock() + self.switchover_timeout
        while not await self.cluster.writable(target):
            if self.clock() > deadline:
                raise RolloutError(
                    f"stopped at the switchover: {target} holds the leader key but does not "
                    f"accept writes (/primary) after {self.switchover_timeout:g} s"
                )
            await asyncio.sleep(self.poll)
        self.say(f"  {target} is the master and accepts writes")

    async def _update(self, step: Step, revision: str) -> None:
        _, pods = await self.read()
        pod = next((p for p in pods if p.name == step.pod), None)
        if pod is None:
            raise RolloutError(f"stopped at {step.member}: pod {step.pod} is gone")
        if await self.cluster.leader() == step.member:
            raise RolloutError(
                f"stopped at {step.member}: it is the master now, and the plan deletes only "
                "replicas' pods; run the rollout again"
            )
        await self.kube.delete_pod(pod.name, pod.uid)
        deadline = self.clock() + self.member_timeout
        # the pod first: a new one (another uid) on the revision, not being deleted, Ready
        why = f"pod {pod.name} was not recreated"
        while True:
            _, pods = await self.read()
            new = next((p for p in pods if p.name == pod.name), None)
            if new is not None and new.uid != pod.uid and not new.deleting:
                if new.revision != revision:
                    raise RolloutError(
                        f"stopped at {step.member}: pod {pod.name} came back on revision "
                        f"{new.revision}, not {revision} (was the StatefulSet changed during "
                        "the rollout?)"
                    )
                if new.ready:
                    break
                why = f"pod {pod.name} is on revision {revision} but not Ready"
            if self.clock() > deadline:
                raise RolloutError(
                    f"stopped at {step.member}: {why} within {self.member_timeout:g} s"
                )
            await asyncio.sleep(self.poll)
        # then the agent: a streaming replica of the current master
        while True:
            leader = await self.cluster.leader()
            problem = replica_healthy(await self.cluster.member_status(step.member), leader)
            if problem is None:
                break
            if self.clock() > deadline:
                raise RolloutError(
                    f"stopped at {step.member}: not back as a healthy replica within "
                    f"{self.member_timeout:g} s: {problem}"
                )
            await asyncio.sleep(self.poll)
        self.say(f"  {step.member} is on revision {revision} and streams from {leader}")


# -- the real ports ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KubeAccess:
    """How the command reaches the API server: an explicit URL and token file, a kubeconfig
    (its current context, or ``context``), or the pod's service account."""

    namespace: str
    api_url: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    kubeconfig: str | None = None
    context: str | None = None


class KubeClient:
    """The three calls a rollout makes (kubernetes-asyncio), as JSON objects. deploy/rollout's
    Role grants exactly these: get statefulsets, list and delete pods."""

    def __init__(self, access: KubeAccess, request_timeout: float = 15.0) -> None:
        self.access = access
        self.request_timeout = request_timeout
        self._client: Any = None

    async def _api(self) -> Any:
        if self._client is not None:
            return self._client
        from kubernetes_asyncio import client, config

        a = self.access
        conf = client.Configuration()
        if a.api_url is not None:
            conf.host = a.api_url
            if a.ca_file:
                conf.ssl_ca_cert = a.ca_file
            if a.token_file:
                token = await asyncio.to_thread(Path(a.token_file).read_text)
                conf.api_key["BearerToken"] = token.strip()
                conf.api_key_prefix["BearerToken"] = "Bearer"
        elif a.kubeconfig is not None:
            await config.load_kube_config(
                config_file=a.kubeconfig, context=a.context, client_configuration=conf
            )
        else:
            config.load_incluster_config(client_configuration=conf)  # type: ignore[no-untyped-call]
        self._client = client.ApiClient(configuration=conf)
        return self._client

    async def close(self) -> None:
        c, self._client = self._client, None
        if c is not None:
            await c.close()

    async def _json(self, what: str, call: Callable[[Any], Any]) -> dict[str, Any]:
        import json

        from kubernetes_asyncio.client.exceptions import ApiException

        api = await self._api()
        try:
            resp = await call(api)
            body = await resp.read()
            resp.release()
        except ApiException as exc:
            raise RolloutError(
                f"{what}: the API server answered {exc.status}: {exc.reason}"
            ) from exc
        except (OSError, TimeoutError) as exc:
            raise RolloutError(f"{what}: the API server is unreachable: {exc!r}") from exc
        if not 200 <= resp.status < 300:
            try:
                message = json.loads(body).get("message", "")
            except (ValueError, AttributeError):
                message = body[:200].decode("utf-8", "replace")
            raise RolloutError(f"{what}: the API server answered {resp.status}: {message}")
        data = json.loads(body)
        if not isinstance(data, dict):
            raise RolloutError(f"{what}: the answer is not a JSON object")
        return data

    async def get_statefulset(self, name: str) -> dict[str, Any]:
        from kubernetes_asyncio import client

        ns = self.access.namespace
        return await self._json(
            f"get statefulset {ns}/{name}",
            lambda api: client.AppsV1Api(api).read_namespaced_stateful_set(
                name, ns, _preload_content=False, _request_timeout=self.request_timeout
            ),
        )

    async def list_pods(self, selector: str) -> dict[str, Any]:
        from kubernetes_asyncio import client

        ns = self.access.namespace
        return await self._json(
            f"list pods in {ns}",
            lambda api: client.CoreV1Api(api).list_namespaced_pod(
                ns,
                label_selector=selector,
                _preload_content=False,
                _request_timeout=self.request_timeout,
            ),
        )

    async def delete_pod(self, name: str, uid: str | None) -> dict[str, Any]:
        from kubernetes_asyncio import client

        ns = self.access.namespace
        # the uid precondition: never delete a pod recreated since it was looked at
        body: Any = {"preconditions": {"uid": uid}} if uid else {}
        return await self._json(
            f"delete pod {ns}/{name}",
            lambda api: client.CoreV1Api(api).delete_namespaced_pod(
                name,
                ns,
                body=body,
                _preload_content=False,
                _request_timeout=self.request_timeout,
            ),
        )


class DcsCluster:
    """The members as the DCS and their agents' REST APIs see them."""

    def __init__(self, dcs: Any, ssl_context: Any = None, request_timeout: float = 5.0) -> None:
        self.dcs = dcs
        self.ssl_context = ssl_context
        self.request_timeout = request_timeout

    async def leader(self) -> str | None:
        view = await self.dcs.read_cluster()
        return view.leader.name if view.leader is not None else None

    async def _get(self, member: str, path: str) -> tuple[int, dict[str, Any]]:
        import aiohttp

        view = await self.dcs.read_cluster()
        raw = view.members.get(member)
        url = raw.get("api_url") if isinstance(raw, dict) else None
        if not isinstance(url, str):
            return 0, {}
        timeout = aiohttp.ClientTimeout(total=self.request_timeout)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as http,
                http.get(url.rstrip("/") + path, ssl=self.ssl_context) as resp,
            ):
                body = await resp.json(content_type=None) if path == "/status" else {}
                return resp.status, body if isinstance(body, dict) else {}
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError):
            return 0, {}

    async def member_status(self, member: str) -> dict[str, Any] | None:
        code, body = await self._get(member, "/status")
        return body if code == 200 else None

    async def writable(self, member: str) -> bool:
        code, _ = await self._get(member, "/primary")
        return code == 200

    async def most_advanced(self, members: Sequence[str]) -> str | None:
        from fsm.inputs import member_view

        view = await self.dcs.read_cluster()
        best: tuple[Any, str] | None = None
        for name in members:
            m = member_view(name, view.members.get(name) or {})
            if m is None or not m.running or not m.streaming or m.nofailover:
                continue
            if best is None or m.position > best[0]:
                best = (m.position, name)
        return best[1] if best else None

    async def switchover(self, master: str, target: str, within: float) -> str | None:
        from pgsidecar.ops import SwitchoverError, request_switchover, wait_for_leader

        try:
            await request_switchover(self.dcs, target)
        except SwitchoverError as exc:
            raise RolloutError(f"stopped at the switchover to {target}: refused: {exc}") from exc
        view = await wait_for_leader(self.dcs, master, within)
        return view.leader.name if view is not None and view.leader is not None else None
