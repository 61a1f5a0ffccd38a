"""deploy/helm/pgsidecar checked with the real helm (a local binary, no cluster): `helm lint`
passes, `helm template` renders with each option, the chart renders the same objects as the
kustomize base for the same settings (compared object by object, normalised), every pod passes
the Pod Security "restricted" check of test_deploy_manifests.py, the agent config it writes is a
valid AgentConfig for either DCS, and each value changes what it says."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgsidecar.api import parse_lag
from tests.unit.test_deploy_manifests import (
    BASE,
    DEPLOY,
    POD_KILLING,
    SAMPLE,
    Doc,
    Pod,
    agent_config,
    by_kind,
    container_env,
    ingress_allowed,
    kubectl_render,
    one,
    pod_of,
    pod_spec,
    restricted_violations,
)

CHART = DEPLOY / "helm" / "pgsidecar"
MONITORING = DEPLOY / "monitoring"
NAMESPACE = "pgsidecar"
RELEASE = "pg"  # the kustomize base's cluster name
KUBE_VERSION = "1.30.0"
# labels Helm's conventions add to the chart's objects, which kustomize's do not carry
HELM_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")


def find_helm() -> str | None:
    """helm on PATH, or where scripts/setup.sh builds it (`go install` into GOPATH/bin)."""
    found = shutil.which("helm")
    if found:
        return found
    gopath = os.environ.get("GOPATH") or str(Path.home() / "go")
    candidate = Path(gopath) / "bin" / "helm"
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


HELM = find_helm()
pytestmark = pytest.mark.skipif(
    HELM is None, reason="helm not installed (scripts/setup.sh builds it with Go)"
)

ETCD = {"dcs": {"type": "etcd", "etcd": {"endpoints": ["http://etcd-0.etcd:2379"]}}}
PGBOUNCER = {"pgbouncer": {"enabled": True, "authSecret": "pg-pooler-users"}}
MONITORING_ON = {
    "monitoring": {
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "dashboard": {"enabled": True},
    }
}
EVERYTHING = {**ETCD, **PGBOUNCER, **MONITORING_ON, "podKilling": {"enabled": True}}
VARIANTS = {
    "default": {},
    "pod-killing": {"podKilling": {"enabled": True}},
    "etcd": ETCD,
    "pgbouncer": PGBOUNCER,
    "monitoring": MONITORING_ON,
    "no-exporter": {"exporter": {"enabled": False}},
    "everything": EVERYTHING,
}


def run_helm(*args: str, values: dict[str, Any] | None = None, tmp: Path | None = None) -> Any:
    assert HELM is not None
    cmd = [HELM, *args]
    if values:
        assert tmp is not None
        f = tmp / "values.yaml"
        f.write_text(yaml.safe_dump(values))
        cmd += ["--values", str(f)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def template(values: dict[str, Any], tmp_path: Path) -> list[Doc]:
    out = run_helm(
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
        values=values,
        tmp=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


# ------------------------------------------------------------------ helm itself


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint(variant: str, tmp_path: Path) -> None:
    out = run_helm("lint", str(CHART), "--strict", values=VARIANTS[variant], tmp=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_template_renders(variant: str, tmp_path: Path) -> None:
    docs = template(VARIANTS[variant], tmp_path)
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Service", "ConfigMap", "Role", "NetworkPolicy"} <= kinds
    for d in docs:
        assert d["metadata"]["namespace"] == NAMESPACE, d["metadata"]["name"]
    assert not by_kind(docs, "Secret"), "the chart never carries secret values"


def test_helm_refuses_incomplete_settings(tmp_path: Path) -> None:
    for values, message in (
        ({"dcs": {"type": "etcd"}}, "dcs.etcd.endpoints"),
        ({"dcs": {"type": "zookeeper"}}, "dcs.type must be consul or etcd"),
        ({"pgbouncer": {"enabled": True}}, "pgbouncer.authSecret"),
    ):
        out = run_helm(
            "template",
            RELEASE,
            str(CHART),
            "--kube-version",
            KUBE_VERSION,
            values=values,
            tmp=tmp_path,
        )
        assert out.returncode != 0 and message in out.stderr, values


# ------------------------------------------------------------------ the same as kustomize


def normalise(docs: list[Doc]) -> dict[tuple[str, str], Doc]:
    """Objects by (kind, name), without what only says who rendered them: kustomize's content
    hash suffixes (and the chart's, made the same way), Helm's bookkeeping labels, the text
    layout of embedded files (compared parsed)."""
    out = {}
    for doc in docs:
        d = copy.deepcopy(doc)
        meta = d["metadata"]
        for label in HELM_LABELS:
            (meta.get("labels") or {}).pop(label, None)
        if d["kind"] == "ConfigMap":
            meta["name"] = re.sub(r"-[a-z0-9]{10}$", "", meta["name"])
            for key, value in d["data"].items():
                d["data"][key] = (
                    json.loads(value) if key.endswith(".json") else yaml.safe_load(value)
                )
        spec = pod_spec(d)
        for v in spec["volumes"] if spec else []:
            if "configMap" in v:
                v["configMap"]["name"] = re.sub(r"-[a-z0-9]{10}$", "", v["configMap"]["name"])
        key = (d["kind"], meta["name"])
        assert key not in out, f"{key} rendered twice"
        out[key] = d
    return out


def kustomize(*directories: Path) -> list[Doc]:
    docs: list[Doc] = []
    for directory in directories:
        rendered = kubectl_render(directory)
        if rendered is None:
            pytest.skip("kubectl not installed: nothing to compare the chart with")
        docs += copy.deepcopy(rendered)
    return docs


@pytest.mark.parametrize(
    ("variant", "directories"),
    [
        ("default", (BASE,)),
        ("pod-killing", (POD_KILLING,)),
        ("monitoring", (BASE, MONITORING)),
    ],
)
def test_chart_renders_what_kustomize_renders(
    variant: str, directories: tuple[Path, ...], tmp_path: Path
) -> None:
    chart = normalise(template(VARIANTS[variant], tmp_path))
    base = normalise(kustomize(*directories))
    assert sorted(chart) == sorted(base)
    for key, ours in chart.items():
        assert ours == base[key], f"{key} differs from kustomize's"


def test_the_comparison_sees_a_difference(tmp_path: Path) -> None:
    """A setting the kustomize base does not have makes the renderings differ."""
    chart = normalise(template({"probes": {"readiness": {"failureThreshold": 3}}}, tmp_path))
    base = normalise(kustomize(BASE))
    assert chart[("StatefulSet", RELEASE)] != base[("StatefulSet", RELEASE)]


# ------------------------------------------------------------------ security and validity


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_pod_passes_pod_security_restricted(variant: str, tmp_path: Path) -> None:
    pods = [d for d in template(VARIANTS[variant], tmp_path) if pod_spec(d)]
    assert pods
    for doc in pods:
        assert restricted_violations(doc) == [], f"{variant}: {doc['metadata']['name']}"
        spec = pod_spec(doc)
        assert spec is not None and spec["enableServiceLinks"] is False


@pytest.mark.parametrize("variant", ["default", "etcd", "everything"])
def test_agent_config_is_valid(variant: str, tmp_path: Path) -> None:
    docs = template(VARIANTS[variant], tmp_path)
    cfg, raw = agent_config(docs)
    assert cfg.name == SAMPLE["metadata.name"] and cfg.cluster == RELEASE
    assert cfg.dcs.type == VARIANTS[variant].get("dcs", {}).get("type", "consul")
    spec = pod_spec(one(docs, "StatefulSet"))
    assert spec is not None
    mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    if cfg.dcs.type == "etcd":
        assert cfg.dcs.etcd.endpoints == ETCD["dcs"]["etcd"]["endpoints"]
        # no Consul token or CA is mounted for an etcd cluster
        assert "/etc/pgsidecar-consul" not in mounts
        assert "consul" not in raw["dcs"]
    else:
        assert cfg.dcs.consul.ca_cert is not None
        assert str(cfg.dcs.consul.ca_cert.parent) in mounts
    assert cfg.kubernetes.kill_unhealthy_pods is bool(
        VARIANTS[variant].get("podKilling", {}).get("enabled")
    )


def test_values_change_what_they_say(tmp_path: Path) -> None:
    values = {
        "image": {
            "repository": "registry.example.com/pgsidecar",
            "tag": "1.2.3",
            "digest": "sha256:" + "a" * 64,
        },
        "storage": {"storageClassName": "fast-ssd", "size": "100Gi"},
        "resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}},
        "replicas": 5,
        "kafka": {"bootstrapServers": ["k1:9092", "k2:9092"], "partitions": 6},
        "probes": {"readiness": {"maxLag": "16MB"}},
        "secretName": "other-secrets",
        "topologySpread": {"whenUnsatisfiable": "DoNotSchedule"},
        "exporter": {"username": "metrics_reader"},
    }
    docs = template(values, tmp_path)
    sts = one(docs, "StatefulSet")
    spec = pod_spec(sts)
    assert spec is not None
    agent = spec["containers"][0]
    assert agent["image"] == "registry.example.com/pgsidecar:1.2.3@sha256:" + "a" * 64
    assert agent["resources"] == values["resources"]
    claim = sts["spec"]["volumeClaimTemplates"][0]["spec"]
    assert claim["storageClassName"] == "fast-ssd"
    assert claim["resources"]["requests"]["storage"] == "100Gi"
    assert sts["spec"]["replicas"] == 5
    cfg, _ = agent_config(docs)
    assert cfg.kafka.bootstrap_servers == ["k1:9092", "k2:9092"] and cfg.kafka.partitions == 6
    # the readiness lag limit reaches the probe in a form the agent's API parses
    path = agent["readinessProbe"]["httpGet"]["path"]
    assert path == "/readiness?lag=16MB" and parse_lag(path.split("=", 1)[1]) == 16 * 1024 * 1024
    assert {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v} >= {
        "other-secrets"
    }
    assert spec["topologySpreadConstraints"][0]["whenUnsatisfiable"] == "DoNotSchedule"
    # the agent creates the role the exporter logs in as
    exporter = next(c for c in spec["containers"] if c["name"] == "postgres-exporter")
    exporter_env = {e["name"]: e.get("value") for e in exporter["env"]}
    assert exporter_env["DATA_SOURCE_USER"] == "metrics_reader"
    assert cfg.postgresql.monitoring is not None
    assert cfg.postgresql.monitoring.username == "metrics_reader"
    # without a storage class, the cluster's default is used (the field is absent)
    default = one(template({}, tmp_path), "StatefulSet")
    assert "storageClassName" not in default["spec"]["volumeClaimTemplates"][0]["spec"]


def test_exporter_can_be_left_out(tmp_path: Path) -> None:
    docs = template({"exporter": {"enabled": False}, **MONITORING_ON}, tmp_path)
    spec = pod_spec(one(docs, "StatefulSet"))
    assert spec is not None
    assert [c["name"] for c in spec["containers"]] == ["pgsidecar"]
    assert "monitor-secret" not in {v["name"] for v in spec["volumes"]}
    # no exporter, no monitoring role for it
    cfg, _ = agent_config(docs)
    assert cfg.postgresql.monitoring is None
    pm = one(docs, "PodMonitor")
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["api"]
    policy = one(docs, "NetworkPolicy", RELEASE)
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {"postgresql", "api"}


def test_pgbouncer_reaches_the_master_and_only_clients_reach_it(tmp_path: Path) -> None:
    docs = template(PGBOUNCER, tmp_path)
    deployment = one(docs, "Deployment", f"{RELEASE}-pooler")
    spec = pod_spec(deployment)
    assert spec is not None
    container = spec["containers"][0]
    assert container["command"][0] == "pgbouncer"
    assert (
        container["image"]
        == one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["image"]
    ), "the pooler runs the pgsidecar image (Debian's pgbouncer is in it)"
    assert spec["automountServiceAccountToken"] is False
    config_name = next(v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v)
    ini = one(docs, "ConfigMap", config_name)["data"]["pgbouncer.ini"]
    primary = one(docs, "Service", f"{RELEASE}-primary")
    assert (
        f"host={RELEASE}-primary.{NAMESPACE}.svc port={primary['spec']['ports'][0]['port']}" in ini
    )
    assert "auth_type = scram-sha-256" in ini
    service = one(docs, "Service", f"{RELEASE}-pooler")
    assert service["spec"]["selector"].items() <= spec_labels(deployment).items()

    policies = by_kind(docs, "NetworkPolicy")
    members = pod_of(docs)
    pooler = Pod(NAMESPACE, spec_labels(deployment), {"pgbouncer": (6432, "TCP")})
    client = Pod("shop", {"pgsidecar.io/client": RELEASE})
    stranger = Pod("shop", {"app": "shop"})
    assert ingress_allowed(policies, pooler, members, 5432, "TCP"), "pooler -> PostgreSQL"
    assert ingress_allowed(policies, client, pooler, 6432, "TCP")
    assert not ingress_allowed(policies, stranger, pooler, 6432, "TCP")
    assert not ingress_allowed(policies, stranger, members, 5432, "TCP")


def spec_labels(doc: Doc) -> dict[str, str]:
    labels: dict[str, str] = doc["spec"]["template"]["metadata"]["labels"]
    return labels


def test_monitoring_objects_come_from_deploy_monitoring(tmp_path: Path) -> None:
    """The chart reads deploy/monitoring's files (files/ links there): one source."""
    for link in (CHART / "files").iterdir():
        assert link.is_symlink() and link.resolve().is_relative_to(MONITORING), link
    docs = template(MONITORING_ON, tmp_path)
    rule = one(docs, "PrometheusRule")
    source = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rule["spec"] == source["spec"]
    spec = pod_spec(one(docs, "StatefulSet"))
    assert spec is not None
    env = container_env(spec["containers"][0], SAMPLE)
    assert env["PGSIDECAR_NAME"] == SAMPLE["metadata.name"]
