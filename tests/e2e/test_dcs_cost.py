"""`pgsidecar bench dcs-cost`, the pgsidecar half, for a short window: what an idle member costs
etcd. The regression guard for the member key: an idle master's checkpoints move its position by
a record no client wrote, which once made every member write its key (and etcd send each write
to every watcher)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgsidecar.lab.dcscost import measure_pgsidecar

pytestmark = pytest.mark.integration

TTL = 5.0
WINDOW = 10.0


def checkpoint_on_the_master(lc: Any) -> None:
    master = lc.master()
    if master is not None:
        with psycopg.connect(lc.dsn(master), autocommit=True) as conn:
            conn.execute("CHECKPOINT")  # forced: a checkpoint record even on an idle server


def test_an_idle_member_costs_etcd_its_lease_renewals_and_little_else() -> None:
    line = measure_pgsidecar(
        WINDOW,
        TTL,
        switchover_window=8.0,
        settle=3.0,
        idle_activity=checkpoint_on_the_master,
    )
    idle = line["idle"]
    by_method = idle["calls_per_second_per_member_by_method"]
    # sane: the renewals are there, at most at the rate of whoever may lead (ttl/4)
    keepalive = by_method.get("Lease/LeaseKeepAlive", 0.0)
    assert 0 < keepalive <= 4 / TTL + 1 / WINDOW
    assert idle["sent_bytes_per_second_per_member"] > 0
    # the member keys: five checkpoints in the window were written by nobody (they were three
    # writes each before: the master's and each replica's once it replayed it)
    assert by_method.get("KV/Put", 0.0) < 1 / WINDOW, by_method
    # all in all: renewals (ttl/4 for the master, ttl/3 for the replicas), the watch re-opened
    # when silent, and one write per member at most; the old publishing alone made 0.5 per second
    bound = (4 + 3 + 3) / (3 * TTL) + 2 / WINDOW + 1 / WINDOW
    assert idle["calls_per_second_per_member"] < bound, idle
    sw = line["switchover"]
    assert sw["new_master"] not in (None, sw["old_master"])
    assert sw["calls_above_idle"] > 0, "a switchover writes: the keys, the leader, the positions"
