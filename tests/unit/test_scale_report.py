"""`pgsidecar bench scale`: the report's arithmetic (rates, CPU, latencies, slopes, checks)."""

from __future__ import annotations

from typing import Any

import pytest

from pgsidecar.lab.dcscost import EtcdCounters
from pgsidecar.lab.scale import (
    cluster_healthy,
    figures,
    format_report,
    idle_figures,
    latency_summary,
    one_master_each,
    parse_clusters,
    slopes,
)

KEEPALIVE = "etcdserverpb.Lease/LeaseKeepAlive"
PUT = "etcdserverpb.KV/Put"


def test_idle_figures_are_totals_and_per_member_rates_and_cpu_percent() -> None:
    before = EtcdCounters({KEEPALIVE: 100, PUT: 10}, sent_bytes=1000, received_bytes=500)
    after = EtcdCounters({KEEPALIVE: 400, PUT: 40}, sent_bytes=7000, received_bytes=2300)
    out = idle_figures(before, after, 10.0, 6, agents_cpu_seconds=0.3, etcd_cpu_seconds=0.12)
    assert out["calls_per_second"] == 33.0  # (300 + 30) / 10 s
    assert out["calls_per_second_per_member"] == 5.5  # / 6 members
    assert out["sent_bytes_per_second"] == 600.0
    assert out["sent_bytes_per_second_per_member"] == 100.0
    assert out["received_bytes_per_second"] == 180.0
    assert out["received_bytes_per_second_per_member"] == 30.0
    assert out["calls_per_second_by_method"] == {"Lease/LeaseKeepAlive": 30.0, "KV/Put": 3.0}
    assert out["agents_cpu_percent"] == 3.0
    assert out["agents_cpu_percent_per_member"] == 0.5
    assert out["etcd_cpu_percent"] == 1.2


def test_latency_summary_in_milliseconds_counts_the_missed() -> None:
    out = latency_summary([0.001 * i for i in range(1, 21)] + [None])
    assert out["watchers"] == 21 and out["missed"] == 1
    assert out["p50_ms"] == 10.5
    assert out["max_ms"] == 20.0
    assert 19.0 <= out["p95_ms"] <= 20.0
    assert latency_summary([0.004]) == {
        "watchers": 1,
        "missed": 0,
        "p50_ms": 4.0,
        "p95_ms": 4.0,
        "max_ms": 4.0,
    }
    assert latency_summary([None, None])["p50_ms"] is None


def run(n: int, calls: float, failover: float | None) -> dict[str, Any]:
    return {
        "clusters": n,
        "members": 3 * n,
        "ok": True,
        "findings": [],
        "idle": {"calls_per_second": calls, "calls_per_second_per_member": calls / (3 * n)},
        "fanout": {"p50_ms": 2.0 + n, "p95_ms": None, "max_ms": 9.0},
        "failover": {"seconds_to_promoted": failover},
    }


def test_slopes_are_least_squares_lines_against_the_number_of_clusters() -> None:
    runs = [run(1, 2.0, 11.0), run(5, 10.0, 11.5), run(10, 20.0, None), run(20, 40.0, 12.5)]
    out = slopes(runs)
    assert out["calls_per_second"] == {"per_cluster": 2.0, "at_zero": 0.0}
    assert out["fanout_p50_ms"] == {"per_cluster": 1.0, "at_zero": 2.0}
    assert out["fanout_max_ms"] == {"per_cluster": 0.0, "at_zero": 9.0}
    # the run whose failover was not measured is left out of that line, not counted as 0
    line = out["failover_seconds"]
    assert line is not None and 0.07 < line["per_cluster"] < 0.08
    assert out["fanout_p95_ms"] is None  # no point at all
    assert slopes([run(3, 1.0, 1.0)])["calls_per_second"] is None  # one N: no slope
    assert figures(runs[0])["failover_seconds"] == 11.0
    table = format_report({"runs": runs, "slopes": out})
    assert "calls_per_second: 2.0" in table


def status(**kw: Any) -> dict[str, Any]:
    base = {
        "cluster": "scale-001",
        "leader": "m1",
        "term": 7,
        "writable": ["m1"],
        "streaming": ["m2", "m3"],
        "alive": ["m1", "m2", "m3"],
    }
    return {**base, **kw}


def test_a_cluster_is_healthy_with_one_master_holding_the_key_and_the_others_streaming() -> None:
    assert cluster_healthy(status())
    assert cluster_healthy(status(alive=["m1", "m3"], streaming=["m3"]))  # m2 killed
    assert not cluster_healthy(status(streaming=["m2"]))
    assert not cluster_healthy(status(writable=[]))
    assert not cluster_healthy(status(writable=["m1", "m2"]))
    assert not cluster_healthy(status(leader="m2"))
    assert one_master_each([status(), status(cluster="scale-002", streaming=[])])
    assert not one_master_each([status(), status(writable=["m1", "m2"])])
    assert not one_master_each([])


def test_the_cluster_counts_are_positive_numbers() -> None:
    assert parse_clusters("1, 5,10") == [1, 5, 10]
    for bad in ("", "0", "1,x"):
        with pytest.raises(SystemExit):
            parse_clusters(bad)
