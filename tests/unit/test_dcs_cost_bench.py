"""`pgsidecar bench dcs-cost`: the arithmetic on etcd's metrics."""

from __future__ import annotations

from typing import Any

import pytest

from pgsidecar.lab.dcscost import EtcdCounters, idle_cost, parse_etcd_metrics, window_cost

METRICS = """\
# HELP grpc_server_handled_total Total number of RPCs completed on the server, regardless of success or failure.
# TYPE grpc_server_handled_total counter
grpc_server_handled_total{grpc_code="OK",grpc_method="LeaseKeepAlive",grpc_service="etcdserverpb.Lease",grpc_type="bidi_stream"} %(keepalive)s
grpc_server_handled_total{grpc_code="Unavailable",grpc_method="LeaseKeepAlive",grpc_service="etcdserverpb.Lease",grpc_type="bidi_stream"} 1
grpc_server_handled_total{grpc_code="OK",grpc_method="Put",grpc_service="etcdserverpb.KV",grpc_type="unary"} %(put)s
grpc_server_handled_total{grpc_code="OK",grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 7
# HELP grpc_server_started_total Total number of RPCs started on the server.
# TYPE grpc_server_started_total counter
grpc_server_started_total{grpc_method="Put",grpc_service="etcdserverpb.KV",grpc_type="unary"} 999
# HELP etcd_network_client_grpc_sent_bytes_total The total number of bytes sent to grpc clients.
# TYPE etcd_network_client_grpc_sent_bytes_total counter
etcd_network_client_grpc_sent_bytes_total %(sent)s
# HELP etcd_network_client_grpc_received_bytes_total The total number of bytes received from grpc clients.
# TYPE etcd_network_client_grpc_received_bytes_total counter
etcd_network_client_grpc_received_bytes_total %(received)s
# HELP go_goroutines Number of goroutines that currently exist.
# TYPE go_goroutines gauge
go_goroutines 42
"""


def metrics(**v: Any) -> str:
    return METRICS % {"keepalive": 10, "put": 5, "sent": 1000, "received": 500, **v}


def test_the_counters_are_read_by_method_across_codes() -> None:
    c = parse_etcd_metrics(metrics())
    assert c.calls == {
        "etcdserverpb.Lease/LeaseKeepAlive": 11.0,
        "etcdserverpb.KV/Put": 5.0,
        "etcdserverpb.KV/Range": 7.0,
    }, "handled calls only (not started), every grpc_code summed"
    assert c.total_calls == 23.0
    assert (c.sent_bytes, c.received_bytes) == (1000.0, 500.0)


def test_idle_cost_is_per_member_and_per_second() -> None:
    before = parse_etcd_metrics(metrics())
    after = parse_etcd_metrics(metrics(keepalive=70, put=11, sent="1.3e+06", received=2900))
    cost = idle_cost(before, after, seconds=20.0, members=3)
    assert cost["calls_per_second_per_member"] == pytest.approx((60 + 6) / 60)
    assert cost["sent_bytes_per_second_per_member"] == pytest.approx((1_300_000 - 1000) / 60, 0.01)
    assert cost["received_bytes_per_second_per_member"] == pytest.approx(40.0)
    assert cost["calls_per_second_per_member_by_method"] == {
        "Lease/LeaseKeepAlive": 1.0,
        "KV/Put": 0.1,
    }, "methods that did not move are left out"
    with pytest.raises(ValueError):
        idle_cost(before, after, seconds=0, members=3)


def test_a_window_is_counted_in_total_and_above_idle() -> None:
    before = EtcdCounters({"a/X": 100}, 1000, 100)
    after = EtcdCounters({"a/X": 160, "a/Y": 4}, 9000, 700)
    idle = {
        "members": 3,
        "calls_per_second_per_member": 0.5,
        "sent_bytes_per_second_per_member": 10.0,
        "received_bytes_per_second_per_member": 5.0,
    }
    w = window_cost(before, after, 20.0, idle)
    assert (w["calls"], w["sent_bytes"], w["received_bytes"]) == (64, 8000, 600)
    assert (w["calls_above_idle"], w["sent_bytes_above_idle"]) == (64 - 30, 8000 - 600)
    assert w["received_bytes_above_idle"] == 600 - 300
