"""A local cluster on IPv6 loopback (::1): PostgreSQL and the agents' APIs listen on ::1, the
members publish bracketed API URLs, replicas stream from the master over IPv6, and a switchover
through the CLI (which calls the members' APIs at those URLs) moves the master."""

from __future__ import annotations

import subprocess
import sys
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.support.clusterutil import local_cluster, new_master, wait_for
from tests.support.ipv6 import needs_ipv6_loopback

pytestmark = pytest.mark.integration


@needs_ipv6_loopback
def test_a_cluster_on_ipv6_loopback() -> None:
    with local_cluster(host="::1") as lc:
        view = lc.read_view()
        for m in lc.members:
            url = view.members[m.name]["api_url"]
            assert url == f"http://[::1]:{m.api_port}", url
            parts = urlsplit(url)
            assert (parts.hostname, parts.port) == ("::1", m.api_port)
        master = lc.master()
        assert master is not None
        with psycopg.connect(lc.dsn(master), autocommit=True) as c:
            assert c.execute("SELECT inet_server_addr()::text").fetchone() == ("::1/128",)
            rows = c.execute("SELECT client_addr::text, state FROM pg_stat_replication").fetchall()
        assert sorted(rows) == [("::1/128", "streaming")] * 2, rows

        sw = subprocess.run(
            [sys.executable, "-m", "pgsidecar", "switchover", "--dir", str(lc.dir), "--wait", "30"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert sw.returncode == 0, sw.stdout + sw.stderr
        new = wait_for(lambda: new_master(lc, master), 30, what="a new master")
        wait_for(
            lambda: (
                (st := lc.api_status(master)) is not None
                and st["role"] == "replica"
                and st["streaming"]
            ),
            60,
            what=f"{master} streaming from {new} over ::1",
        )
