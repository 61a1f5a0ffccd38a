"""``pgsidecar local up --tls`` (the CLI, as a user runs it) with 2 members: TLS on every link.
The DSNs of ``local status --json`` carry sslmode=verify-full and the cluster's CA, and the
master is writable over one (over TLS: pg_stat_ssl); the replica streams over TLS; the API
answers over https to a client with the CA and the client certificate, and not to plain HTTP;
etcd refuses a client without a certificate."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgsidecar.lab.local import LocalCluster
from tests.support.clusterutil import wait_for


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgsidecar", "local", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


@pytest.fixture
def tls_cluster() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pgsc-tls-", dir="/tmp"))
    os.chmod(d, 0o755)
    cdir = d / "c"
    try:
        up = cli("up", "--tls", "--nodes", "2", "--ttl", "5", "--no-kafka", "--dir", str(cdir))
        assert up.returncode == 0, up.stdout + up.stderr
        yield cdir
    finally:
        cli("down", "--dir", str(cdir), timeout=120)
        lc = LocalCluster(cdir)
        for m in lc.members if lc.meta else []:
            for pid in (lc.agent_pid(m.name), lc.postmaster_pid(m.name)):
                if pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
        if lc.meta:
            lc.stop_etcd()
        shutil.rmtree(d, ignore_errors=True)


def test_local_up_tls(tls_cluster: Path) -> None:
    status = cli("status", "--json", "--dir", str(tls_cluster))
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)
    ca = tls_cluster.resolve() / "tls" / "ca.crt"
    for row in rows:
        assert "sslmode=verify-full" in row["dsn"] and f"sslrootcert={ca}" in row["dsn"]
        assert row["api_url"].startswith("https://")
    master = next(r for r in rows if r["role"] == "master")
    replica = next(r for r in rows if r["role"] == "replica")

    with psycopg.connect(master["dsn"], autocommit=True) as conn:
        conn.execute("CREATE TABLE tls_probe (v int)")
        conn.execute("INSERT INTO tls_probe VALUES (1)")
        used_ssl = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert used_ssl.fetchone() == (True,)

        def replica_streams_over_tls() -> bool:
            row = conn.execute(
                "SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s ON s.pid = r.pid "
                "WHERE r.application_name = %s AND r.state = 'streaming'",
                (replica["name"],),
            ).fetchone()
            return row == (True,)

        wait_for(replica_streams_over_tls, 30, what="the replica to stream over TLS")

    with psycopg.connect(replica["dsn"], autocommit=True) as conn:
        wait_for(
            lambda: (
                conn.execute("SELECT to_regclass('tls_probe') IS NOT NULL").fetchone() == (True,)
            ),
            30,
            what="the write to reach the replica",
        )

    # the API: https with the CA and the client certificate; nothing without them
    lc = LocalCluster(tls_cluster)
    ctx = lc.client_ssl_context()
    with urllib.request.urlopen(f"{master['api_url']}/primary", context=ctx, timeout=5) as r:
        assert r.status == 200
    plain = master["api_url"].replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(f"{plain}/primary", timeout=5)
    bare = ssl.create_default_context(cafile=str(ca))
    with pytest.raises((urllib.error.URLError, OSError, ssl.SSLError)):
        urllib.request.urlopen(f"{master['api_url']}/primary", context=bare, timeout=5).read()

    # etcd: https with a client certificate only
    etcd = f"https://127.0.0.1:{lc.meta['etcd']['client_port']}/health"
    with urllib.request.urlopen(etcd, context=ctx, timeout=5) as r:
        assert r.status == 200
    with pytest.raises((urllib.error.URLError, OSError, ssl.SSLError)):
        urllib.request.urlopen(etcd, context=bare, timeout=5).read()
