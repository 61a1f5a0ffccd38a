"""Helpers for tests that run a real local cluster: a writer that records acknowledged commits,
and a prober that checks every member for writability (to catch two masters at once)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from pgsidecar.lab.local import LocalCluster
from pgsidecar.lab.workload import Prober, Writer, multi_host_dsn

__all__ = [
    "Prober",
    "Writer",
    "clusters_dir",
    "local_cluster",
    "multi_host_dsn",
    "new_master",
    "repository_dir",
    "sql",
    "wait_for",
]


@contextlib.contextmanager
def consul_emulator_thread() -> Iterator[object]:
    """The Consul emulator (tests/support/consul_emulator.py) on its own event loop in a thread, for
    clusters of real agents (separate processes) that use Consul."""
    from tests.support.consul_emulator import ConsulEmulator

    loop = asyncio.new_event_loop()
    emu = ConsulEmulator(min_ttl=2)
    thread = threading.Thread(target=loop.run_forever, name="consul-emulator", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(emu.start(), loop).result(10)
        yield emu
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(emu.stop(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@contextlib.contextmanager
def local_cluster(
    nodes: int = 3,
    ttl: float = 5.0,
    extra: dict | None = None,
    dcs: str = "etcd",
    kafka: bool = False,
    host: str = "127.0.0.1",
) -> Iterator[LocalCluster]:
    """A fresh cluster in a temp dir that the postgres user can enter; everything it started is
    stopped (by pid) and the dir removed at exit, so a test can run twice in a row. With
    ``dcs="consul"`` the agents use the Consul emulator; ``host="::1"``: PostgreSQL and the agents'
    APIs on IPv6 loopback."""
    with contextlib.ExitStack() as stack:
        dcs_url = None
        if dcs == "consul":
            emu = stack.enter_context(consul_emulator_thread())
            dcs_url = emu.url  # type: ignore[attr-defined]
        d = Path(tempfile.mkdtemp(prefix="pgsc-", dir="/tmp"))
        os.chmod(d, 0o755)
        lc = LocalCluster(d / "c")
        try:
            lc.create(
                nodes=nodes, ttl=ttl, extra=extra, dcs=dcs, dcs_url=dcs_url, kafka=kafka, host=host
            )
            lc.up(detach=False, timeout=120)
            yield lc
        finally:
            stop_local_cluster(lc)
            shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def clusters_dir() -> Iterator[Path]:
    """A temp dir the postgres user can enter, for a test that makes its own clusters in it
    (`local up --dir ROOT/NAME`): at exit every cluster under it is stopped by pid, the one
    named "src" last (the others may follow it), and the dir is removed."""
    d = Path(tempfile.mkdtemp(prefix="pgsc-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        for sub in sorted(d.iterdir(), key=lambda p: p.name == "src"):
            if (sub / "cluster.json").exists():
                with contextlib.suppress(Exception):  # the others are stopped all the same
                    stop_local_cluster(LocalCluster(sub))
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def repository_dir() -> Iterator[Path]:
    """ROOT/backup, for a cluster's pgBackRest repository (the agent creates it, owned by
    PostgreSQL's OS user, so ROOT is open to it); at exit a file system a test mounted on ROOT
    is unmounted and ROOT removed."""
    d = Path(tempfile.mkdtemp(prefix="pgsc-repo-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d / "backup"
    finally:
        if os.path.ismount(d):
            subprocess.run(["umount", "-l", str(d)], check=False)
        shutil.rmtree(d, ignore_errors=True)


def sql(lc: LocalCluster, name: str, text: str) -> list[tuple[Any, ...]]:
    """Run ``text`` on member ``name`` (autocommit); its rows, [] for a statement without."""
    with psycopg.connect(lc.dsn(name), autocommit=True) as conn:
        cur = conn.execute(text)
        return cur.fetchall() if cur.description else []


def stop_local_cluster(lc: LocalCluster) -> None:
    """``local down``, then SIGKILL whatever agent or postmaster of it is still alive (by the
    pids it recorded), even when ``down`` failed: a test leaves no process behind."""
    try:
        lc.down()
    finally:
        for m in lc.members:
            for pid in (lc.agent_pid(m.name), lc.postmaster_pid(m.name)):
                if pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what} (last: {last!r})")


def new_master(lc: LocalCluster, old: str | None) -> str | None:
    m = lc.master()
    return m if m is not None and m != old else None
