"""A local cluster whose members each live in their own network namespace (for partition faults).

Layout (``k`` is a random third octet chosen so that no address on this machine collides):

    root namespace                                   member namespace pgsc-<tag>-<name>
    ------------------------------------------       -------------------------------------
    bridge pgsc<tag>br  10.213.k.1/24  <-- veth -->   eth0  10.213.k.(10+i)/24   the cluster link
      etcd listens here (and on 127.0.0.1)
    pgsc<tag>o<i>       10.214.k.(4i+1)/30 <-veth->   obs0  10.214.k.(4i+2)/30   the observer link
    127.0.0.1:<pg port>, 127.0.0.1:<api port>         PostgreSQL and the agent's API listen on
      forwarded (a TCP relay in this process)         0.0.0.0 inside the namespace
      to the member's observer address

Why two links: a partition cuts the *cluster* link (``ip link set pgsc<tag>c<i> down``): the member
loses etcd and its peers, exactly like a real network split. The test harness (writer, prober,
status) must still see the cut-off member, or it could not notice a partitioned master that keeps
accepting writes; it talks to it over the observer link, which a partition leaves alone. The
observer links are point-to-point and the root namespace does not forward (members have no
default route), so members cannot reach each other through them.

Why a relay on 127.0.0.1: the harness code (``LocalCluster.dsn``, ``api_status``, the workload's
multi-host DSN) addresses members as 127.0.0.1:<port>; relaying those ports keeps all of it
unchanged. The relay adds no failure of its own: a refused or hung member connection is passed on
as a closed or hung client connection.

Members are started with ``nsenter --net=/run/netns/<ns>``, which enters the namespace and execs
the agent (same pid, so agent.pid stays right); PostgreSQL, pg_basebackup and pg_rewind inherit
the namespace from the agent. Kafka and Consul are not supported here (the partition faults need
neither). Only one process may drive a netns cluster at a time: the relay lives in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import signal
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from events import netloc
from pgsidecar.lab.local import (
    LocalCluster,
    LocalClusterError,
    MemberInfo,
    _which,
    etcd_argv,
    set_dotted,
)
from pgsidecar.procutil import pid_alive, read_pid, terminate

CLUSTER_NET = 213  # 10.213.k.0/24: the cluster links, on a bridge
OBSERVER_NET = 214  # 10.214.k.0/24: point-to-point /30s, harness <-> member
NETNS_DIR = Path("/run/netns")


class NetnsError(LocalClusterError):
    pass


def _ip(*args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _used_octets() -> set[int]:
    """Third octets of 10.213.x / 10.214.x addresses already on this machine (another cluster's)."""
    used: set[int] = set()
    out = _ip("-4", "-o", "addr", "show", check=False).stdout
    for line in out.splitlines():
        for word in line.split():
            if word.startswith(("10.213.", "10.214.")):
                with contextlib.suppress(ValueError, IndexError):
                    used.add(int(word.split(".")[2]))
    return used


@dataclass(frozen=True)
class NetPlan:
    """Names and addresses of one cluster's namespaces and links (kept in cluster.json)."""

    tag: str
    octet: int

    @property
    def bridge(self) -> str:
        return f"pgsc{self.tag}br"

    @property
    def bridge_ip(self) -> str:
        return f"10.{CLUSTER_NET}.{self.octet}.1"

    @property
    def cluster_net(self) -> str:
        return f"10.{CLUSTER_NET}.{self.octet}.0/24"

    @property
    def observer_net(self) -> str:
        return f"10.{OBSERVER_NET}.{self.octet}.0/24"

    def netns(self, index: int) -> str:
        return f"pgsc-{self.tag}-{index}"

    def cluster_veth(self, index: int) -> str:
        """The root-namespace end of member ``index``'s cluster link: the one a partition cuts."""
        return f"pgsc{self.tag}c{index}"

    def observer_veth(self, index: int) -> str:
        return f"pgsc{self.tag}o{index}"

    def member_ip(self, index: int) -> str:
        return f"10.{CLUSTER_NET}.{self.octet}.{10 + index}"

    def observer_root_ip(self, index: int) -> str:
        return f"10.{OBSERVER_NET}.{self.octet}.{4 * index + 1}"

    def observer_member_ip(self, index: int) -> str:
        return f"10.{OBSERVER_NET}.{self.octet}.{4 * index + 2}"

    @classmethod
    def choose(cls) -> NetPlan:
        used = _used_octets()
        free = [k for k in range(1, 255) if k not in used]
        if not free:
            raise NetnsError("no free 10.213.x.0/24 network for a netns cluster")
        k = random.choice(free)
        return cls(tag=f"{random.getrandbits(16):04x}", octet=k)


class TcpRelay:
    """127.0.0.1:<port> -> <host>:<port> for a set of ports, on an event loop in a daemon thread."""

    def __init__(self, routes: dict[int, str], connect_timeout: float = 3.0) -> None:
        self.routes = routes
        self.connect_timeout = connect_timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="netns-relay", daemon=True
        )
        self._servers: list[asyncio.base_events.Server] = []
        self._conns: set[asyncio.StreamWriter] = set()

    def start(self) -> None:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(timeout=10)

    async def _start(self) -> None:
        for port, host in self.routes.items():
            server = await asyncio.start_server(
                functools.partial(self._serve, host=host, port=port),
                "127.0.0.1",
                port,
                reuse_address=True,
            )
            self._servers.append(server)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int
    ) -> None:
        self._conns.add(writer)
        try:
            try:
                ur, uw = await asyncio.wait_for(
                    asyncio.open_connection(host, port), self.connect_timeout
                )
            except (OSError, TimeoutError):
                return  # the member is down or unreachable: the client sees a closed connection
            self._conns.add(uw)
            try:
                await asyncio.gather(self._pump(reader, uw), self._pump(ur, writer))
            finally:
                self._conns.discard(uw)
                with contextlib.suppress(Exception):
                    uw.close()
        finally:
            self._conns.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            # either side closing ends the pair: PostgreSQL and HTTP/1.1 need no half-close
            with contextlib.suppress(Exception):
                dst.close()

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            for s in self._servers:
                s.close()
            for w in list(self._conns):
                with contextlib.suppress(Exception):
                    w.close()
            for s in self._servers:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(s.wait_closed(), 2)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


class NetnsLocalCluster(LocalCluster):
    """A LocalCluster whose members run in their own network namespaces (see the module doc).

    Lifecycle: ``create`` (plans the network), ``up`` / ``start_etcd`` / ``start_member`` (build
    it on first use), ``partition`` / ``heal`` (the cluster link of one member), ``down`` (stops
    every process, then removes the namespaces, links and relay). Must run as root."""

    def __init__(self, dir: Path) -> None:
        super().__init__(dir)
        net = self.meta.get("netns")
        self.plan: NetPlan | None = NetPlan(**net) if net else None
        self._relay: TcpRelay | None = None
        self._net_built = False

    # -- creation --------------------------------------------------------------------------------

    def create(self, *args: Any, **kwargs: Any) -> None:
        if os.geteuid() != 0:
            raise NetnsError("network namespaces need root")
        if kwargs.get("kafka"):
            raise NetnsError("a netns cluster runs without Kafka (the broker listens on loopback)")
        if kwargs.get("dcs", "etcd") != "etcd" or kwargs.get("dcs_url"):
            raise NetnsError("a netns cluster runs its own etcd")
        _which("ip", "install iproute2")
        _which("nsenter", "install util-linux")
        self.plan = NetPlan.choose()
        super().create(*args, **kwargs)
        self.meta["netns"] = asdict(self.plan)
        self.meta_path.write_text(json.dumps(self.meta, indent=2))

    def _index(self, name: str) -> int:
        for i, m in enumerate(self.members, start=1):
            if m.name == name:
                return i
        raise NetnsError(f"no member {name!r}")

    def _require_plan(self) -> NetPlan:
        if self.plan is None:
            raise NetnsError(f"{self.dir} is not a netns cluster (no netns plan in cluster.json)")
        return self.plan

    def _agent_config(self, m: MemberInfo, extra: dict[str, Any]) -> dict[str, Any]:
        cfg = super()._agent_config(m, {})
        plan = self._require_plan()
        ip = plan.member_ip(self._index_from_meta(m.name))
        pg = cfg["postgresql"]
        # inside the namespace: every interface; peers use the cluster address, the agent itself
        # 127.0.0.1 (the namespace's own loopback), the harness the observer address (relayed)
        pg["listen"] = "0.0.0.0"
        pg["connect_address"] = ip
        pg["hba_networks"] = ["127.0.0.1/32", plan.cluster_net, plan.observer_net]
        cfg["api"]["listen"] = "0.0.0.0"
        cfg["api"]["connect_url"] = netloc.url("http", ip, m.api_port)
        cfg["dcs"] = {
            "type": "etcd",
            "etcd": {
                "endpoints": [netloc.url("http", plan.bridge_ip, self.meta["etcd"]["client_port"])]
            },
        }
        for key, value in extra.items():
            set_dotted(cfg, key, value)
        return cfg

    def _index_from_meta(self, name: str) -> int:
        # during create() the members are known from meta already (written before the configs)
        names = [m["name"] for m in self.meta.get("members", [])]
        return names.index(name) + 1

    # -- the network -----------------------------------------------------------------------------

    def member_ip(self, name: str) -> str:
        return self._require_plan().member_ip(self._index(name))

    def netns_name(self, name: str) -> str:
        return self._require_plan().netns(self._index(name))

    def net_up(self) -> None:
        """Build the bridge, namespaces, links and the relay (idempotent within this process)."""
        if self._net_built:
            return
        plan = self._require_plan()
        try:
            if _ip("link", "show", plan.bridge, check=False).returncode != 0:
                _ip("link", "add", plan.bridge, "type", "bridge", "forward_delay", "0")
                _ip("addr", "add", f"{plan.bridge_ip}/24", "dev", plan.bridge)
                _ip("link", "set", plan.bridge, "up")
            for i, _m in enumerate(self.members, start=1):
                self._member_net_up(plan, i)
            routes: dict[int, str] = {}
            for i, m in enumerate(self.members, start=1):
                routes[m.pg_port] = plan.observer_member_ip(i)
                routes[m.api_port] = plan.observer_member_ip(i)
            self._relay = TcpRelay(routes)
            self._relay.start()
        except Exception:
            self.net_down()
            raise
        self._net_built = True

    def _member_net_up(self, plan: NetPlan, i: int) -> None:
        ns = plan.netns(i)
        if not (NETNS_DIR / ns).exists():
            _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        pairs = (
            (plan.cluster_veth(i), f"pgsc{plan.tag}p{i}", "eth0"),
            (plan.observer_veth(i), f"pgsc{plan.tag}q{i}", "obs0"),
        )
        for host_end, tmp, inner in pairs:
            if _ip("link", "show", host_end, check=False).returncode == 0:
                continue
            _ip("link", "add", host_end, "type", "veth", "peer", "name", tmp)
            _ip("link", "set", tmp, "netns", ns)
            _ip("-n", ns, "link", "set", tmp, "name", inner)
        _ip("link", "set", plan.cluster_veth(i), "master", plan.bridge)
        _ip("link", "set", plan.cluster_veth(i), "up")
        _ip("-n", ns, "addr", "replace", f"{plan.member_ip(i)}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("addr", "replace", f"{plan.observer_root_ip(i)}/30", "dev", plan.observer_veth(i))
        _ip("link", "set", plan.observer_veth(i), "up")
        _ip("-n", ns, "addr", "replace", f"{plan.observer_member_ip(i)}/30", "dev", "obs0")
        _ip("-n", ns, "link", "set", "obs0", "up")

    def partition(self, name: str) -> None:
        """Cut ``name`` from etcd and its peers (its cluster link goes down); the harness still
        reaches it over the observer link."""
        _ip("link", "set", self._require_plan().cluster_veth(self._index(name)), "down")

    def heal(self, name: str) -> None:
        _ip("link", "set", self._require_plan().cluster_veth(self._index(name)), "up")

    def netns_pids(self) -> list[int]:
        """Every process still inside one of this cluster's namespaces."""
        pids: list[int] = []
        if self.plan is None:
            return pids
        for i, _m in enumerate(self.members, start=1):
            out = _ip("netns", "pids", self.plan.netns(i), check=False).stdout
            pids += [int(x) for x in out.split() if x.isdigit()]
        return pids

    def net_down(self) -> None:
        """Remove the relay, links and namespaces. Kills (by pid) whatever still runs inside the
        namespaces first, so nothing is left holding one. Safe to call twice."""
        if self._relay is not None:
            self._relay.stop()
            self._relay = None
        plan = self.plan
        if plan is None:
            return
        for pid in self.netns_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            terminate(pid, signal.SIGKILL, timeout=5)
        for i, _m in enumerate(self.members, start=1):
            # deleting the root end of a veth deletes both ends
            _ip("link", "del", plan.cluster_veth(i), check=False)
            _ip("link", "del", plan.observer_veth(i), check=False)
            _ip("netns", "del", plan.netns(i), check=False)
        _ip("link", "del", plan.bridge, check=False)
        self._net_built = False

    # -- processes -------------------------------------------------------------------------------

    def up(self, detach: bool = False, timeout: float = 180) -> list[dict[str, Any]]:
        if detach:
            raise NetnsError("a netns cluster cannot be detached: its relay lives in this process")
        self.net_up()
        return super().up(detach=False, timeout=timeout)

    def start_etcd(self, detach: bool = False) -> None:
        """etcd in the root namespace, on 127.0.0.1 (for tools here) and on the bridge address
        (for the members)."""
        self.net_up()
        e = self.meta["etcd"]
        d = self.dir / "etcd"
        d.mkdir(exist_ok=True)
        pid = read_pid(d / "etcd.pid")
        if pid and pid_alive(pid):
            return
        plan = self._require_plan()
        local = f"http://127.0.0.1:{e['client_port']}"
        bridged = netloc.url("http", plan.bridge_ip, e["client_port"])
        peer = f"http://127.0.0.1:{e['peer_port']}"
        argv = etcd_argv("local", d / "data", f"{local},{bridged}", bridged, peer, f"local={peer}")
        self._spawn(argv, d / "etcd.log", d / "etcd.pid", "etcd", detach)
        self._wait_http(f"{local}/health", 30, "etcd")

    def start_member(self, name: str, detach: bool = False) -> int:
        self.net_up()
        m = self.member(name)
        pid = self.agent_pid(name)
        if pid:
            return pid
        # nsenter execs the agent after entering the namespace: the pid we record is the agent's
        argv = [
            _which("nsenter", "install util-linux"),
            f"--net={NETNS_DIR / self.netns_name(name)}",
            "--",
            sys.executable,
            "-m",
            "pgsidecar",
            "run",
            "--config",
            str(self.config_path(name)),
        ]
        return self._spawn(argv, m.dir / "agent.log", m.dir / "agent.pid", name, detach)

    def down(self) -> None:
        try:
            if self._net_built:
                # heal every link first: a member cut off would otherwise wait out its timeouts
                for m in self.members:
                    with contextlib.suppress(NetnsError):
                        self.heal(m.name)
            super().down()
        finally:
            self.net_down()
