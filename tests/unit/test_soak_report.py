"""The soak's report arithmetic (pgsidecar/lab/soak.py): the memory slope, distributions, the
renewal-latency histogram read back from /metrics, false failovers from a leader series, pgbench's
output, and the stress schedule drawn from a seed. The run itself is tests/e2e/test_soak_e2e.py."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from pgsidecar.agent.sources import renewal_latency_histogram
from pgsidecar.lab.soak import (
    STRESS_KINDS,
    Children,
    LeaderChange,
    Pgbench,
    distribution,
    draw_schedule,
    histogram_summary,
    leader_changes,
    leaderless_seconds,
    merge_buckets,
    parse_progress,
    parse_summary,
    pgbench_report,
    renewal_buckets,
    slope_per_hour,
)

# -- memory and CPU over time --------------------------------------------------------------------


def test_the_slope_is_per_hour_and_sees_through_noise() -> None:
    # 0.5 MB per minute = 30 MB per hour, with a sawtooth of +-0.2 MB around the line
    samples = [(t, 60.0 + 0.5 * t / 60 + (0.2 if t % 20 else -0.2)) for t in range(0, 600, 5)]
    slope = slope_per_hour(samples)
    assert slope is not None
    assert slope == pytest.approx(30.0, abs=1.0)


def test_a_flat_series_has_no_slope_and_one_sample_none() -> None:
    assert slope_per_hour([(t, 66.0) for t in range(10)]) == pytest.approx(0.0)
    assert slope_per_hour([(1.0, 66.0)]) is None
    assert slope_per_hour([(1.0, 66.0), (1.0, 70.0)]) is None, "one instant: no line"
    falling = slope_per_hour([(0.0, 70.0), (1800.0, 69.0)])
    assert falling == pytest.approx(-2.0)


def test_distribution_by_nearest_rank() -> None:
    d = distribution(float(x) for x in range(1, 101))
    assert d["count"] == 100
    assert (d["min"], d["p50"], d["p90"], d["p99"], d["max"]) == (1, 50, 90, 99, 100)
    assert d["mean"] == pytest.approx(50.5)
    assert distribution([])["p50"] is None and distribution([])["count"] == 0
    assert distribution([3.0])["p99"] == 3.0


# -- lease renewals ------------------------------------------------------------------------------


def _histogram_text(observations: list[float]) -> str:
    """/metrics as an agent serves it, with these renewal latencies observed."""
    registry = CollectorRegistry()
    observe = renewal_latency_histogram(registry)
    for x in observations:
        observe(x)
    return generate_latest(registry).decode()


def test_late_renewals_and_quantiles_from_the_agents_histogram() -> None:
    text = _histogram_text([0.003] * 90 + [0.04] * 7 + [0.3, 0.7, 1.5])
    summary = histogram_summary(renewal_buckets(text))
    assert summary["count"] == 100
    assert summary["late"] == {"over 0.1 s": 3, "over 0.5 s": 2, "over 1 s": 1}
    assert summary["p50_at_most"] == 0.005
    assert summary["p99_at_most"] == 1.0
    assert summary["max_at_most"] == 2.0
    assert summary["buckets"]["le 0.005"] == 90
    assert summary["buckets"]["le 0.05"] == 7
    assert summary["buckets"]["le 2"] == 1
    assert sum(summary["buckets"].values()) == 100


def test_a_renewal_beyond_the_last_bound_is_late_and_unbounded() -> None:
    summary = histogram_summary(renewal_buckets(_histogram_text([0.01, 7.0])))
    assert summary["late"]["over 1 s"] == 1
    assert summary["max_at_most"] == math.inf


def test_no_renewals_is_an_empty_summary() -> None:
    summary = histogram_summary([])
    assert summary["count"] == 0 and summary["p50_at_most"] is None
    assert summary["late"] == {"over 0.1 s": 0, "over 0.5 s": 0, "over 1 s": 0}


def test_the_agents_histograms_add_up() -> None:
    a = renewal_buckets(_histogram_text([0.003, 0.7]))
    b = renewal_buckets(_histogram_text([0.003, 0.003, 1.5]))
    merged = histogram_summary(merge_buckets([a, b]))
    assert merged["count"] == 5
    assert merged["late"] == {"over 0.1 s": 2, "over 0.5 s": 2, "over 1 s": 1}


# -- false failovers -----------------------------------------------------------------------------


def test_a_steady_leader_is_no_failover_even_across_unanswered_samples() -> None:
    series = [(0.0, "pg1", 7), (1.0, None, None), (2.0, None, None), (3.0, "pg1", 7)]
    assert leader_changes(series) == []
    assert leaderless_seconds(series) == pytest.approx(2.0)


def test_every_new_leader_or_new_term_is_a_change() -> None:
    series = [
        (0.0, "pg1", 7),
        (1.0, "pg1", 7),
        (2.0, None, None),  # the key lapsed
        (3.0, "pg1", 12),  # the same member won it again: an election all the same
        (4.0, "pg2", 15),
        (5.0, "pg2", 15),
    ]
    assert leader_changes(series) == [
        LeaderChange(3.0, "pg1", 7, "pg1", 12),
        LeaderChange(4.0, "pg1", 12, "pg2", 15),
    ]
    assert leaderless_seconds(series) == pytest.approx(1.0)


def test_no_leader_ever_seen_is_no_change() -> None:
    assert leader_changes([(0.0, None, None), (1.0, None, None)]) == []
    assert leader_changes([]) == []


# -- pgbench -------------------------------------------------------------------------------------

PROGRESS_15 = "progress: 12.0 s, 481.9 tps, lat 8.214 ms stddev 3.002, 0 failed\n"
SUMMARY_15 = """pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: <builtin: TPC-B (sort of)>
scaling factor: 4
query mode: simple
number of clients: 4
number of threads: 2
maximum number of tries: 1
duration: 10 s
number of transactions actually processed: 4841
number of failed transactions: 0 (0.000%)
latency average = 8.240 ms
latency stddev = 3.100 ms
initial connection time = 12.345 ms
tps = 484.100000 (without initial connection time)
"""


def test_pgbench_progress_and_summary_lines() -> None:
    assert parse_progress(PROGRESS_15) == (12.0, 481.9, 8.214)
    assert parse_progress("progress: 3.0 s, 0.0 tps, lat NaN ms stddev NaN, 0 failed") == (
        3.0,
        0.0,
        None,
    )
    assert parse_progress("starting vacuum...end.") is None
    assert parse_summary(SUMMARY_15) == {
        "transactions": 4841,
        "failed": 0,
        "latency_ms": 8.24,
        "tps": 484.1,
    }


def _run(progress: list[tuple[float, float, float | None]], stdout: str = "") -> Pgbench:
    run = Pgbench(Children(), [], {})
    run.progress = progress
    run.stdout = [stdout] if stdout else []
    return run


def test_pgbench_report_takes_the_summary_of_a_finished_run() -> None:
    report = pgbench_report([_run([(1.0, 400.0, 9.0), (2.0, 500.0, 30.0)], SUMMARY_15)], 10.0)
    assert report["transactions"] == 4841
    assert report["tps"] == pytest.approx(484.1)
    assert report["latency_ms_mean"] == pytest.approx(8.24)
    assert report["progress_latency_ms_max"] == 30.0
    assert report["progress_tps"]["min"] == 400.0


def test_pgbench_report_counts_an_interrupted_run_from_its_progress() -> None:
    # no summary (stopped with SIGINT): 1 s at 400 tps, 1 s at 500, then 2 s at 100
    report = pgbench_report([_run([(1.0, 400.0, 9.0), (2.0, 500.0, 7.0), (4.0, 100.0, None)])], 4)
    assert report["transactions"] == 400 + 500 + 200
    assert report["latency_ms_mean"] == pytest.approx(8.0)
    assert pgbench_report([], 0)["tps"] is None


# -- the schedule --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_a_short_run_sees_every_stress_one_at_a_time(seed: int) -> None:
    ttl = 5.0
    sched = draw_schedule(seed, 72.0, ttl)
    assert {s.kind for s in sched} == set(STRESS_KINDS)
    for a, b in zip(sched, sched[1:], strict=False):
        assert a.start + a.seconds < b.start, "stresses do not overlap"
    assert all(0 < s.start and s.start + s.seconds <= 72.0 - 1 for s in sched)
    # a replica's agent is stopped for less than a TTL: its session never lapses
    assert all(s.seconds < ttl for s in sched if s.kind == "sigstop")


def test_the_schedule_replays_from_its_seed_and_scales_with_the_run() -> None:
    assert draw_schedule(42, 3600, 5.0) == draw_schedule(42, 3600, 5.0)
    assert draw_schedule(42, 3600, 5.0) != draw_schedule(43, 3600, 5.0)
    hour = draw_schedule(42, 3600, 5.0)
    assert 8 <= len(hour) <= 20
    assert max(s.seconds for s in hour if s.kind != "sigstop") <= 30
