"""etcd fixtures: a real single-node etcd (Debian's /usr/bin/etcd) and a factory of EtcdDCS.

The server is session-scoped (starting etcd costs ~1 s); tests stay independent because every
``make_dcs`` factory works under its own random key prefix, which is deleted at teardown.

Every test that starts a real etcd is an ``integration`` test: ``pytest_collection_modifyitems``
below marks each test that uses one of ``ETCD_FIXTURES`` (directly or through another fixture)
or the "etcd" parameter of ``dcs_backend``, so ``-m "not integration"`` never starts etcd. And
``running_etcd``/``running_etcd_cluster`` refuse to start one for a test that is not marked, so
a new fixture that starts etcd cannot make the marker lie: add its name to ``ETCD_FIXTURES``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from events.dcs.etcd import EtcdDCS
from pgsidecar.config import EtcdSettings
from pgsidecar.procutil import free_port_range
from tests.support.childproc import ChildServer, started_in_tempdir

ETCD_BIN = shutil.which("etcd") or "/usr/bin/etcd"
# fixtures that start a real etcd process (the ones in tests/contract/test_etcd_backend.py included)
ETCD_FIXTURES = frozenset({"etcd_server", "etcd_with_auth", "etcd_cluster", "etcd_tls"})


def starts_etcd(item: pytest.Item) -> bool:
    names = set(getattr(item, "fixturenames", ()))
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec is not None else {}
    return bool(names & ETCD_FIXTURES) or params.get("dcs_backend") == "etcd"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if starts_etcd(item) and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration)


_running: list[pytest.Item] = []  # the test being set up or run


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _running[:] = [item]


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    _running.clear()


def _require_integration_marker() -> None:
    if _running and _running[0].get_closest_marker("integration") is None:
        raise AssertionError(
            f"{_running[0].nodeid} starts a real etcd but is not marked integration: mark it, or "
            "add the fixture that starts etcd to ETCD_FIXTURES in tests/support/fixtures_etcd.py"
        )


START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class EtcdServer(ChildServer):
    """One etcd member on loopback ports, as our child process. ``stop()``/``start()`` keep the
    data directory and ports, so a restart resumes the same store (same revisions).

    Alone it is a single-node cluster; ``EtcdCluster`` makes members of a larger one."""

    stop_timeout = STOP_TIMEOUT

    def __init__(
        self,
        base_dir: Path,
        extra_args: tuple[str, ...] = (),
        name: str = "test",
        ports: tuple[int, int] | None = None,
    ) -> None:
        self.base_dir = base_dir
        self.name = name
        self.what = f"etcd {name}"
        self.data_dir = base_dir / f"{name}.data"
        self.log_path = base_dir / f"{name}.log"
        self.extra_args = extra_args
        self.initial_cluster: str | None = None  # None: just this member
        self._set_ports(ports or self._free_ports())

    @staticmethod
    def _free_ports() -> tuple[int, int]:
        port = free_port_range(2)
        return port, port + 1

    def _set_ports(self, ports: tuple[int, int]) -> None:
        self.client_port, self.peer_port = ports
        self.endpoint = f"http://127.0.0.1:{self.client_port}"
        self.peer_url = f"http://127.0.0.1:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        # a fresh single node may retry on new ports (another process took ours meanwhile); a
        # restart or a cluster member must keep its ports, because others hold them
        attempts = 1 if self.data_dir.exists() or self.initial_cluster else 3
        for attempt in range(attempts):
            try:
                self.spawn()
                self.wait_healthy()
                return
            except RuntimeError:
                if attempt + 1 == attempts:
                    raise
                self._set_ports(self._free_ports())
                shutil.rmtree(self.data_dir, ignore_errors=True)

    def spawn(self) -> None:
        args = [
            ETCD_BIN,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.endpoint}",
            f"--advertise-client-urls={self.endpoint}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster or f'{self.name}={self.peer_url}'}",
            "--initial-cluster-state=new",
            "--logger=zap",
            "--log-level=warn",
            *self.extra_args,
        ]
        self.spawn_logged(args)

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        self.wait_ready(self.healthy, timeout, 0.05, "not healthy")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/health", timeout=0.5) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: the member keeps its sockets but answers nothing (a hung server)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def etcdctl(self, *args: str, env: dict[str, str] | None = None) -> str:
        out = subprocess.run(
            ["etcdctl", f"--endpoints={self.endpoint}", *args],
            capture_output=True,
            text=True,
            timeout=15,
            env={**os.environ, "ETCDCTL_API": "3", **(env or {})},
            check=True,
        )
        return out.stdout

    def metric(self, name: str) -> float | None:
        """A gauge/counter from /metrics (e.g. etcd_debugging_mvcc_watcher_total)."""
        with urllib.request.urlopen(self.endpoint + "/metrics", timeout=2) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return None


class EtcdCluster:
    """``size`` etcd members forming one cluster, each an EtcdServer (stop/start/kill one)."""

    def __init__(self, base_dir: Path, size: int = 3) -> None:
        ports = free_port_range(2 * size)
        self.members = [
            EtcdServer(base_dir, name=f"m{i}", ports=(ports + 2 * i, ports + 2 * i + 1))
            for i in range(size)
        ]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = initial

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self) -> None:
        for m in self.members:  # all first: none is healthy before a quorum runs
            m.spawn()
        for m in self.members:
            m.wait_healthy()

    def stop(self) -> None:
        for m in self.members:
            m.stop()

    def followers(self) -> list[EtcdServer]:
        """Members that are not the raft leader now (pausing one does not force an election)."""
        out = []
        for m in self.members:
            if m.proc is None:
                continue
            req = urllib.request.Request(m.endpoint + "/v3/maintenance/status", data=b"{}")
            with urllib.request.urlopen(req, timeout=2) as resp:
                status = json.loads(resp.read())
            if status.get("leader") != status.get("header", {}).get("member_id"):
                out.append(m)
        return out


def _tmp_root() -> str | None:
    # /dev/shm (tmpfs) makes etcd's fsyncs free: lease and txn latency do not depend on the disk
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@contextlib.contextmanager
def running_etcd(extra_args: tuple[str, ...] = ()) -> Iterator[EtcdServer]:
    """Start an etcd in a fresh temp dir; stop it by pid and remove the dir afterwards."""
    _require_integration_marker()
    with started_in_tempdir(
        lambda base: EtcdServer(base, extra_args), "pgsidecar-etcd-", _tmp_root()
    ) as server:
        yield server


@contextlib.contextmanager
def running_etcd_cluster(size: int = 3) -> Iterator[EtcdCluster]:
    _require_integration_marker()
    with started_in_tempdir(
        lambda base: EtcdCluster(base, size), "pgsidecar-etcd-", _tmp_root()
    ) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    if not os.path.exists(ETCD_BIN):
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    with running_etcd() as server:
        yield server


MakeDcs = Callable[..., EtcdDCS]


@pytest.fixture
async def etcd_dcs_factory(etcd_server: EtcdServer) -> AsyncIterator[MakeDcs]:
    """``make_dcs(cluster=None, **kwargs) -> EtcdDCS`` (not yet connected). Every DCS of one
    test shares a random key prefix, so equal cluster names meet inside a test but never across
    tests or runs. At teardown: sessions revoked, keys deleted, connections closed."""
    prefix = f"pgsidecar-test-{uuid.uuid4().hex[:10]}"
    made: list[EtcdDCS] = []

    def make_dcs(cluster: str | None = None, **kwargs: object) -> EtcdDCS:
        settings = EtcdSettings(endpoints=[etcd_server.endpoint])
        dcs = EtcdDCS(
            settings,
            cluster=cluster or f"c-{uuid.uuid4().hex[:8]}",
            prefix=prefix,
            **kwargs,  # type: ignore[arg-type]
        )
        made.append(dcs)
        return dcs

    make_dcs.min_ttl = 2.0  # type: ignore[attr-defined]
    make_dcs.server = etcd_server  # type: ignore[attr-defined]
    yield make_dcs

    if etcd_server.proc is None:
        etcd_server.start()  # a restart test failed half-way: later tests need the server
    for dcs in made:
        with contextlib.suppress(Exception):
            await dcs.close_session()
        await dcs.close()
    # remove this test's keys (one fresh client per cluster name the test used)
    for cluster in sorted({dcs.cluster for dcs in made}):
        cleaner = EtcdDCS(EtcdSettings(endpoints=[etcd_server.endpoint]), cluster, prefix=prefix)
        with contextlib.suppress(Exception):
            await cleaner._delete_prefix()
        await cleaner.close()
