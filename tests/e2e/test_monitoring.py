"""deploy/monitoring/ checked with Prometheus' own tool and against the code: the alerting rules
pass `promtool check rules`, the unit tests of deploy/monitoring/tests/ pass `promtool test
rules` and make every alert both fire and stay quiet, and every metric the rules and the Grafana
dashboard query is one the agent defines (read from its source, so a renamed metric fails here),
one of postgres_exporter's listed below, or Prometheus' own `up` (names read by the tokenizer of
tests/support/promql.py). That a running cluster exports them all is checked live by
tests/e2e/test_monitoring_e2e.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from events.kafka import kafka_metrics
from tests.support.promql import PromQLError, metric_names, tokens

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "prometheusrule.yaml"
PODMONITOR = MONITORING / "podmonitor.yaml"
DASHBOARD = MONITORING / "dashboards" / "pgsidecar.json"
UNIT_TESTS = sorted((MONITORING / "tests").glob("*.yaml"))
STATEFULSET = ROOT / "deploy" / "kubernetes" / "statefulset.yaml"
# where the shipped agent defines its metrics (the lab never runs in a member)
AGENT_SOURCES = [ROOT / "pgsidecar", ROOT / "events"]
LAB = ROOT / "pgsidecar" / "lab"

# postgres_exporter's metrics the rules and the dashboard use: the same names in the image's
# 0.19.1 (pg_up, the stat_database collector, the built-in pg_stat_archiver query) and in
# Debian's 0.11 (built-in queries), which the live test runs
EXPORTER_METRICS = frozenset(
    {
        "pg_up",
        "pg_stat_archiver_archived_count",
        "pg_stat_archiver_failed_count",
        "pg_stat_database_xact_commit",
        "pg_stat_database_numbackends",
    }
)
# Prometheus' own series for each target
PROMETHEUS_METRICS = frozenset({"up"})

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    promtool is None,
    reason="promtool not installed (Debian's prometheus package: scripts/setup.sh)",
)


def rule_spec() -> dict[str, Any]:
    doc = yaml.safe_load(RULES.read_text())
    assert doc["kind"] == "PrometheusRule" and doc["apiVersion"] == "monitoring.coreos.com/v1"
    spec: dict[str, Any] = doc["spec"]
    return spec


def alerts() -> list[dict[str, Any]]:
    return [r for g in rule_spec()["groups"] for r in g["rules"] if "alert" in r]


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    """The rule groups as the plain rule file promtool reads, beside copies of the unit tests
    (which name it ``pgsidecar.rules.yaml``)."""
    (tmp_path / "pgsidecar.rules.yaml").write_text(yaml.safe_dump(rule_spec(), sort_keys=False))
    for f in UNIT_TESTS:
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert promtool is not None
    return subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


# ------------------------------------------------------------------ promtool


@needs_promtool
def test_promtool_check_rules(rules_dir: Path) -> None:
    out = run_promtool("check", "rules", "pgsidecar.rules.yaml", cwd=rules_dir)
    assert out.returncode == 0, out.stdout + out.stderr
    total = sum(len(g["rules"]) for g in rule_spec()["groups"])
    assert f"SUCCESS: {total} rules found" in out.stdout + out.stderr


@needs_promtool
def test_promtool_unit_tests_pass(rules_dir: Path) -> None:
    assert UNIT_TESTS
    out = run_promtool("test", "rules", *[f.name for f in UNIT_TESTS], cwd=rules_dir)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_unit_tests_can_fail(rules_dir: Path) -> None:
    """A rule that no longer fires where a test expects it fails the unit tests: with the
    KafkaDown threshold made unreachable, audit.yaml must fail."""
    spec = rule_spec()
    for group in spec["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "PgsidecarKafkaDown":
                rule["expr"] = "pgsidecar_kafka_up < 0"
    (rules_dir / "pgsidecar.rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = run_promtool("test", "rules", "audit.yaml", cwd=rules_dir)
    assert out.returncode != 0
    assert "PgsidecarKafkaDown" in out.stdout + out.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for f in UNIT_TESTS:
        doc = yaml.safe_load(f.read_text())
        assert doc["rule_files"] == ["pgsidecar.rules.yaml"], f.name
        for test in doc["tests"]:
            for case in test.get("alert_rule_test") or []:
                (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names - fired == set(), "alerts no unit test makes fire"
    assert names - quiet == set(), "alerts no unit test keeps quiet"
    assert fired | quiet <= names, "unit tests of alerts that do not exist"


def test_the_alerts_the_issue_asks_for_exist() -> None:
    names = {a["alert"] for a in alerts()}
    for alert in (
        "PgsidecarNoMaster",
        "PgsidecarMultipleMasters",
        "PgsidecarMasterWithoutLease",  # lease renewals failing
        "PgsidecarLeaderChurn",
        "PgsidecarReplicaLagging",
        "PgsidecarSpoolGrowing",
        "PgsidecarKafkaDown",
        "PostgresArchiveFailing",
        "PgsidecarBackupTooOld",
    ):
        assert alert in names
    for a in alerts():
        assert a["labels"]["severity"] in ("critical", "warning"), a["alert"]
        assert a["annotations"]["summary"] and a["annotations"]["description"], a["alert"]


# ------------------------------------------------------------------ metric names


def defined_agent_metrics() -> set[str]:
    """The series names the agent's code exports: every prometheus_client metric constructed
    in pgsidecar/ and events/ (outside the lab), with the suffixes the exposition adds."""
    pattern = re.compile(
        r"\b(Gauge|Counter|Histogram|Summary|Info|Enum|GaugeMetricFamily)\(\s*\"([a-zA-Z_:][a-zA-Z0-9_:]*)\"",
        re.S,
    )
    names: set[str] = set()
    for top in AGENT_SOURCES:
        for f in top.rglob("*.py"):
            if f.is_relative_to(LAB):
                continue
            for kind, name in pattern.findall(f.read_text()):
                if kind == "Counter":
                    base = name.removesuffix("_total")
                    names |= {f"{base}_total", f"{base}_created"}
                elif kind in ("Histogram", "Summary"):
                    names |= {name, f"{name}_sum", f"{name}_count", f"{name}_created"}
                    if kind == "Histogram":
                        names.add(f"{name}_bucket")
                elif kind == "Info":
                    names.add(f"{name}_info")
                else:
                    names.add(name)
    return names


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets") or []]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["definition"])
            assert m, var["definition"]
            exprs.append(m.group(1))
    return exprs


def undefined(exprs: list[str], defined: set[str]) -> dict[str, set[str]]:
    known = defined | EXPORTER_METRICS | PROMETHEUS_METRICS
    out = {}
    for expr in exprs:
        missing = metric_names(expr) - known
        if missing:
            out[expr] = missing
    return out


def test_the_source_reading_finds_what_the_code_registers() -> None:
    """The grep of the source agrees with what prometheus_client registers for the Kafka
    sink's metrics (built here for real), so the reading cannot silently find nothing."""
    registry = CollectorRegistry()
    kafka_metrics(registry)
    exported = {s.name for metric in registry.collect() for s in metric.samples}
    defined = defined_agent_metrics()
    assert exported <= defined, exported - defined
    for name in ("pgsidecar_role", "pgsidecar_lease_held", "pgsidecar_term"):
        assert name in defined


def test_the_extractor_sees_each_metric() -> None:
    expr = (
        'count by (namespace, cluster) (pgsidecar_role{role="master"} == 1)'
        " unless on (namespace, pod) rate(pgsidecar_records_sent_total[5m])"
        " and changes(max by (cluster) (pgsidecar_term)[30m:30s]) > 3"
    )
    assert metric_names(expr) == {
        "pgsidecar_role",
        "pgsidecar_records_sent_total",
        "pgsidecar_term",
    }
    # a renamed or invented metric is reported
    assert undefined(["pgsidecar_leases_total > 0"], defined_agent_metrics()) == {
        "pgsidecar_leases_total > 0": {"pgsidecar_leases_total"}
    }


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        # label names in matchers, grouping and vector matching are not metrics
        (
            'sum without (pod) (a{role="master", b="x"}) / ignoring (pod) group_left (c) d',
            {"a", "d"},
        ),
        ("sum(rate(a_total[5m])) by (pod) > bool 0", {"a_total"}),
        # an aggregation's grouping before its parentheses; keywords in any case
        ("max BY (pod) (a) UNLESS ON (pod) b", {"a", "b"}),
        # durations in ranges, subqueries and offsets, Grafana's interval variable
        (
            "rate(a[$__rate_interval]) + deriv(b[1h30m:1m] offset 5m) + c offset -1d",
            {"a", "b", "c"},
        ),
        # numbers, Inf/NaN, scientific and hex numbers, strings with PromQL words in them
        ('a > 1e3 and b < 0x1F or c != Inf and d{l="x unless y by (z)"} != NaN', set("abcd")),
        # the selector by __name__, and names with colons (recording rules)
        ('{__name__="pg_up", pod=~"p.*"} + job:rate:sum5m', {"pg_up", "job:rate:sum5m"}),
        # functions with several arguments, @ modifiers, histogram_quantile on a bucket
        (
            'histogram_quantile(0.9, sum by (le) (rate(x_bucket[5m]))) @ start() + label_replace(y, "a", "$1", "b", "(.*)")',
            {"x_bucket", "y"},
        ),
    ],
)
def test_the_tokenizer_tells_metric_names_from_every_other_word(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_the_tokenizer_refuses_what_it_cannot_read() -> None:
    with pytest.raises(PromQLError):
        metric_names("a ? b")
    with pytest.raises(PromQLError):
        metric_names("sum by (pod (a)")
    assert ("duration", "30m") in tokens("a[30m]") and ("number", "30") in tokens("a > 30")


def test_rules_and_dashboard_use_only_defined_metrics() -> None:
    defined = defined_agent_metrics()
    rule_exprs = [r["expr"] for g in rule_spec()["groups"] for r in g["rules"]]
    assert undefined(rule_exprs, defined) == {}
    assert undefined(dashboard_exprs(), defined) == {}
    # and each exporter metric listed here is used somewhere, so the list stays the truth
    used = set().union(*(metric_names(e) for e in rule_exprs + dashboard_exprs()))
    assert used >= EXPORTER_METRICS


def test_dashboard_is_grafana_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "namespace", "cluster"} <= variables
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            # every query is scoped to the chosen cluster
            assert 'namespace="$namespace"' in t["expr"] and 'cluster="$cluster"' in t["expr"]


# ------------------------------------------------------------------ the PodMonitor


def test_podmonitor_scrapes_the_agent_and_the_exporter() -> None:
    pm = yaml.safe_load(PODMONITOR.read_text())
    sts = yaml.safe_load(STATEFULSET.read_text())
    template = sts["spec"]["template"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    ports = {
        p["name"]: c["name"] for c in template["spec"]["containers"] for p in c.get("ports") or []
    }
    endpoints = {e["port"]: e for e in pm["spec"]["podMetricsEndpoints"]}
    assert ports[next(iter(endpoints))] == "pgsidecar"
    assert {ports[p] for p in endpoints} == {"pgsidecar", "postgres-exporter"}
    for e in endpoints.values():
        assert e["path"] == "/metrics"
        # the rules group by cluster: every endpoint sets it from the pod's instance label
        assert {
            "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
            "targetLabel": "cluster",
        } in e["relabelings"]
    # the agent-down alert names the agent's container
    down = next(a for a in alerts() if a["alert"] == "PgsidecarAgentDown")
    assert 'container="pgsidecar"' in down["expr"]
    api_source = (ROOT / "pgsidecar" / "api.py").read_text()
    assert '"/metrics"' in api_source
