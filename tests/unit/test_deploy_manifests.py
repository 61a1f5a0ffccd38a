"""deploy/ checked offline: the manifests parse, render (a small kustomize renderer here, and the
real `kubectl kustomize` when it is installed, which must agree), every reference resolves inside
deploy/ (or, for the Secret the operator creates, in deploy/README.md), the agent config in the
ConfigMap is a valid AgentConfig once the pod's environment is applied, the image runs the CLI,
and the Role grants exactly the API calls events/k8s.py makes."""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from events.k8s import K8S_API_CALLS, POD_KILLING_API_CALLS, ROLE_LABEL, ROLE_VALUES
from pgsidecar.config import AgentConfig, _apply_env
from tests.support import yamlutil

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "kubernetes"
POD_KILLING = DEPLOY / "overlays" / "pod-killing"
CONSUL = DEPLOY / "consul"
README = DEPLOY / "README.md"
DOCKERFILE = DEPLOY / "Dockerfile"
ACL_BOOTSTRAP = CONSUL / "acl-bootstrap.sh"

Doc = dict[str, Any]

# ------------------------------------------------------------------ a small kustomize renderer
# Only what deploy/ uses; anything else is an error, so this renderer cannot silently diverge
# from kustomize (and test_kubectl_kustomize_agrees compares the two when kubectl is present).

KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "components",
    "configMapGenerator",
    "images",
    "patches",
}


def load_docs(path: Path) -> list[Doc]:
    return [d for d in yamlutil.safe_load_all(path.read_text()) if d is not None]


def _json_pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def apply_json6902(doc: Doc, ops: list[Doc]) -> None:
    for op in ops:
        *parents, last = _json_pointer(op["path"])
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if kind == "add":
            if isinstance(node, list):
                node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                node[last] = copy.deepcopy(op["value"])
        elif kind == "replace":
            node[int(last) if isinstance(node, list) else last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[int(last) if isinstance(node, list) else last]
        else:
            raise AssertionError(f"renderer: unsupported patch op {kind}")


def _apply_kustomization(directory: Path, docs: list[Doc], expect_kind: str) -> list[Doc]:
    k = yamlutil.safe_load((directory / "kustomization.yaml").read_text())
    assert k.get("kind", "Kustomization") == expect_kind, directory
    unknown = set(k) - KUSTOMIZATION_KEYS
    assert not unknown, f"renderer does not implement {unknown} ({directory})"
    for res in k.get("resources") or []:
        target = (directory / res).resolve()
        docs.extend(render(target) if target.is_dir() else load_docs(target))
    for gen in k.get("configMapGenerator") or []:
        assert set(gen) <= {"name", "files", "options"}, gen
        assert set(gen.get("options") or {}) <= {"labels"}, gen
        data = {}
        for f in gen["files"]:
            key, _, src = f.partition("=") if "=" in f else (Path(f).name, "", f)
            data[key] = (directory / src).read_text()
        options_labels = (gen.get("options") or {}).get("labels")
        labels = {"labels": dict(options_labels)} if options_labels else {}
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": gen["name"], **labels},
                "data": data,
            }
        )
    for comp in k.get("components") or []:
        docs = _apply_kustomization((directory / comp).resolve(), docs, "Component")
    for patch in k.get("patches") or []:
        target = patch["target"]
        assert set(target) <= {"kind", "name"}, target
        hits = [
            d
            for d in docs
            if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]
        ]
        assert hits, f"patch target {target} not found"
        for d in hits:
            apply_json6902(d, yamlutil.safe_load(patch["patch"]))
    for img in k.get("images") or []:
        for d in docs:
            spec = pod_spec(d)
            for c in spec["containers"] if spec else []:
                if c["image"].split(":")[0] == img["name"]:
                    c["image"] = f"{img.get('newName', img['name'])}:{img['newTag']}"
    if "namespace" in k:
        for d in docs:
            d["metadata"]["namespace"] = k["namespace"]
            for s in d.get("subjects") or []:
                if s.get("kind") == "ServiceAccount":
                    s["namespace"] = k["namespace"]
    return docs


def render(directory: Path) -> list[Doc]:
    return _apply_kustomization(directory, [], "Kustomization")


@cache
def kubectl_render(directory: Path) -> list[Doc] | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yamlutil.safe_load_all(out.stdout) if d is not None]


def renderings(directory: Path) -> list[tuple[str, list[Doc]]]:
    out = [("python", render(directory))]
    real = kubectl_render(directory)
    if real is not None:
        out.append(("kubectl", real))
    return out


# ------------------------------------------------------------------ helpers


def pod_spec(doc: Doc) -> Doc | None:
    if doc.get("kind") in ("StatefulSet", "Deployment", "DaemonSet", "Job"):
        spec: Doc = doc["spec"]["template"]["spec"]
        return spec
    return None


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    hits = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def by_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def selector_pairs(text: str) -> dict[str, str]:
    pairs = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        assert sep and "!" not in key, f"only equality selectors are expected: {part}"
        pairs[key.strip()] = value.strip()
    return pairs


def documented_secrets() -> dict[str, set[str]]:
    """Secrets the README tells the operator to create: name -> keys."""
    text = README.read_text().replace("\\\n", " ")
    found: dict[str, set[str]] = {}
    for line in text.splitlines():
        if "create secret generic" not in line:
            continue
        words = shlex.split(line.strip(), posix=True)
        name = words[words.index("generic") + 1]
        keys = {
            w.split("=", 2)[1]
            for w in words
            if w.startswith("--from-literal=") or w.startswith("--from-file=")
        }
        found[name] = keys
    # keys the Consul ACL bootstrap script adds to an existing Secret
    script = ACL_BOOTSTRAP.read_text()
    for name in re.findall(r"patch secret (\S+)", script):
        found.setdefault(name, set()).update(re.findall(r'"stringData":\{"([^"]+)"', script))
    return found


def container_env(container: Doc, sample: dict[str, str]) -> dict[str, str]:
    """The environment the kubelet gives the container: fieldRefs from ``sample``, $(VAR)
    expanded from the variables defined before it (Kubernetes' rule)."""
    env: dict[str, str] = {}
    for e in container.get("env") or []:
        if "value" in e:
            env[e["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(e["value"])
            )
        else:
            ref = e["valueFrom"]
            assert "fieldRef" in ref, (
                f"env {e['name']}: only fieldRef is used (secrets come as files)"
            )
            env[e["name"]] = sample[ref["fieldRef"]["fieldPath"]]
    return env


SAMPLE = {"metadata.name": "pg-1", "metadata.namespace": "pgsidecar", "status.podIP": "10.1.2.3"}


def agent_config(docs: list[Doc]) -> tuple[AgentConfig, dict[str, Any]]:
    """The AgentConfig pg-1 would load: the ConfigMap's agent.yaml plus the pod's environment."""
    sts = one(docs, "StatefulSet")
    spec = pod_spec(sts)
    assert spec is not None
    container = spec["containers"][0]
    env = container_env(container, SAMPLE)
    cm_name = next(v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v)
    raw = yamlutil.safe_load(one(docs, "ConfigMap", cm_name)["data"]["agent.yaml"])
    merged = _apply_env(copy.deepcopy(raw), env)
    return AgentConfig.model_validate(merged), raw


# ------------------------------------------------------------------ tests


# not Kubernetes manifests: the Helm chart (templates are not YAML until rendered; `helm lint`
# and `helm template` check it, tests/e2e/test_helm_chart.py) and promtool's unit tests
# (tests/e2e/test_monitoring.py)
NOT_MANIFESTS = (DEPLOY / "helm", DEPLOY / "monitoring" / "tests")


def test_every_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    files = [f for f in files if not any(f.is_relative_to(d) for d in NOT_MANIFESTS)]
    assert len(files) >= 12
    for f in files:
        docs = load_docs(f)
        assert docs, f"{f} is empty"
        if f.name == "agent.yaml":  # the agent's own config, not a manifest
            continue
        for d in docs:
            assert isinstance(d, dict) and "kind" in d and "apiVersion" in d, f
    for f in sorted(DEPLOY.rglob("*.json")):
        json.loads(f.read_text())


@pytest.mark.parametrize(
    "directory", [BASE, POD_KILLING, CONSUL], ids=["base", "pod-killing", "consul"]
)
def test_kubectl_kustomize_agrees(directory: Path) -> None:
    real = kubectl_render(directory)
    if real is None:
        pytest.skip("kubectl not installed: the Python renderer alone checked the kustomizations")
    ours = render(directory)

    def shape(docs: list[Doc]) -> list[tuple[str, str, str]]:
        # generated ConfigMaps get a content hash suffix from kustomize
        return sorted(
            (
                d["kind"],
                re.sub(r"-[a-z0-9]{10}$", "", d["metadata"]["name"]),
                d["metadata"].get("namespace", ""),
            )
            for d in docs
        )

    assert shape(ours) == shape(real)
    for kind in ("Role", "Service", "PodDisruptionBudget", "NetworkPolicy"):
        for d in by_kind(ours, kind):
            r = one(real, kind, d["metadata"]["name"])
            assert d.get("rules") == r.get("rules") and d.get("spec") == r.get("spec"), d[
                "metadata"
            ]["name"]
    for d in by_kind(ours, "StatefulSet"):
        r = one(real, "StatefulSet", d["metadata"]["name"])
        ours_spec, real_spec = pod_spec(d), pod_spec(r)
        assert ours_spec is not None and real_spec is not None
        for ours_c, real_c in zip(ours_spec["containers"], real_spec["containers"], strict=True):
            assert ours_c["env"] == real_c["env"] and ours_c["image"] == real_c["image"]


@pytest.mark.parametrize("directory", [BASE, POD_KILLING], ids=["base", "pod-killing"])
def test_cluster_references_resolve(directory: Path) -> None:
    secrets = documented_secrets()
    for how, docs in renderings(directory):
        ctx = f"{directory.name} ({how})"
        sts = one(docs, "StatefulSet")
        spec = pod_spec(sts)
        assert spec is not None
        pod_labels = sts["spec"]["template"]["metadata"]["labels"]
        assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), ctx

        # ServiceAccount, and the RoleBinding tying it to the Role
        sa = one(docs, "ServiceAccount", spec["serviceAccountName"])
        binding = one(docs, "RoleBinding")
        assert binding["roleRef"]["kind"] == "Role"
        one(docs, "Role", binding["roleRef"]["name"])
        assert binding["subjects"] == [
            {
                "kind": "ServiceAccount",
                "name": sa["metadata"]["name"],
                "namespace": sts["metadata"]["namespace"],
            }
        ], ctx

        # volumes: ConfigMap (with its keys), Secret (as documented), claims, mounts
        container = spec["containers"][0]
        volumes = {v["name"]: v for v in spec["volumes"]}
        claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
        for m in container["volumeMounts"]:
            assert m["name"] in volumes or m["name"] in claims, (
                f"{ctx}: mount {m['name']} has no volume"
            )
        for v in volumes.values():
            if "configMap" in v:
                cm = one(docs, "ConfigMap", v["configMap"]["name"])
                for item in v["configMap"].get("items") or []:
                    assert item["key"] in cm["data"], f"{ctx}: ConfigMap key {item['key']}"
            if "secret" in v:
                name = v["secret"]["secretName"]
                assert not by_kind(docs, "Secret"), "secret values must not be in the manifests"
                assert name in secrets, (
                    f"{ctx}: Secret {name} is not documented in deploy/README.md"
                )
                for item in v["secret"].get("items") or []:
                    assert item["key"] in secrets[name], (
                        f"{ctx}: Secret key {item['key']} not in the README"
                    )

        # ports: every Service targetPort and probe port is a named container port
        port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["port"] in port_names, f"{ctx}: {probe} port"

        # Services select the pods; the role Services select the labels the agent sets
        services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
        for name, svc in services.items():
            sel = dict(svc["spec"]["selector"])
            role = sel.pop(ROLE_LABEL, None)
            assert sel.items() <= pod_labels.items() and sel, (
                f"{ctx}: Service {name} selects no pod"
            )
            assert role is None or role in ROLE_VALUES, f"{ctx}: Service {name} selects role={role}"
            for p in svc["spec"]["ports"]:
                assert p["targetPort"] in port_names, (
                    f"{ctx}: Service {name} targetPort {p['targetPort']}"
                )
                assert port_names[p["targetPort"]] == p["port"], f"{ctx}: Service {name} port"
        cluster = agent_config(docs)[0].cluster
        assert services[f"{cluster}-primary"]["spec"]["selector"][ROLE_LABEL] == "master"
        assert services[f"{cluster}-replicas"]["spec"]["selector"][ROLE_LABEL] == "replica"
        headless = services[sts["spec"]["serviceName"]]
        assert (
            headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
        )

        pdb = one(docs, "PodDisruptionBudget")
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert pdb["spec"]["maxUnavailable"] == 1


def test_statefulset_shape() -> None:
    docs = render(BASE)
    sts = one(docs, "StatefulSet")
    spec = pod_spec(sts)
    assert spec is not None
    assert sts["spec"]["replicas"] == 3
    anti = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    assert (
        anti[0]["labelSelector"]["matchLabels"].items()
        <= sts["spec"]["template"]["metadata"]["labels"].items()
    )
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    container = spec["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readiness"
    assert container["livenessProbe"]["httpGet"]["path"] == "/liveness"
    assert "lifecycle" not in container, "no preStop: SIGTERM and the pod watch start the hand-off"
    cfg, _ = agent_config(docs)
    # the hand-off (stop PostgreSQL, escalated after stop_timeout, then release) fits the grace
    assert spec["terminationGracePeriodSeconds"] >= cfg.postgresql.stop_timeout + 20
    assert spec["securityContext"]["runAsUser"] == 999, "the image's postgres uid"
    # the probes' paths are served by the agent's API
    api_source = (ROOT / "pgsidecar" / "api.py").read_text()
    for path in ("/readiness", "/liveness"):
        assert f'"{path}"' in api_source, f"pgsidecar/api.py serves no {path}"


@pytest.mark.parametrize("directory", [BASE, POD_KILLING], ids=["base", "pod-killing"])
def test_agent_config_is_valid_and_matches_the_pod(directory: Path) -> None:
    for how, docs in renderings(directory):
        ctx = f"{directory.name} ({how})"
        cfg, raw = agent_config(docs)
        sts = one(docs, "StatefulSet")
        spec = pod_spec(sts)
        assert spec is not None
        container = spec["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}

        assert cfg.name == SAMPLE["metadata.name"], "member name = pod name"
        assert "name" not in raw, "the member name must come from the pod, not the shared file"
        assert cfg.kubernetes.enabled and cfg.kubernetes.pod_name == SAMPLE["metadata.name"]
        assert cfg.kubernetes.namespace == SAMPLE["metadata.namespace"]
        assert cfg.postgresql.connect_address == SAMPLE["status.podIP"]
        assert cfg.api.url == f"http://{SAMPLE['status.podIP']}:{cfg.api.port}"
        assert ports["postgresql"] == cfg.postgresql.port and ports["api"] == cfg.api.port, ctx
        assert cfg.api.listen == "0.0.0.0", "the kubelet probes the pod IP"
        assert cfg.kubernetes.label_selector is not None
        pod_labels = sts["spec"]["template"]["metadata"]["labels"]
        assert selector_pairs(cfg.kubernetes.label_selector).items() <= pod_labels.items(), ctx

        # persistent things live on the claim, secrets come from the Secret's files
        data_mount = mounts[sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]]
        assert cfg.postgresql.data_dir.is_relative_to(
            data_mount
        ) and cfg.postgresql.data_dir != Path(data_mount)
        assert cfg.state_dir.is_relative_to(data_mount)
        # the server log reaches kubectl logs and never the volume; what the agent keeps on the
        # volume is bounded
        assert raw["postgresql"]["log_destination"] == "stderr", ctx
        assert cfg.postgresql.log_destination == "stderr", ctx
        assert "log_rotation" in raw, ctx
        secret_files = {
            Path(mounts[v["name"]]) / i["path"]
            for v in spec["volumes"]
            if "secret" in v and v["name"] in mounts
            for i in v["secret"]["items"]
        }
        used = {
            cfg.postgresql.superuser.password_file,
            cfg.postgresql.replication.password_file,
            cfg.postgresql.monitoring.password_file if cfg.postgresql.monitoring else None,
            cfg.api.token_file,
            cfg.dcs.consul.token_file,
            cfg.dcs.consul.ca_cert,
        }
        assert used <= secret_files, ctx
        assert cfg.dcs.consul.token is None
        assert (
            cfg.postgresql.superuser.password is None
            and cfg.postgresql.replication.password is None
        )
        assert cfg.postgresql.monitoring is not None and cfg.postgresql.monitoring.password is None
        assert cfg.api.token is None

        # the entrypoint's config path is the ConfigMap's file
        config_volume = next(v for v in spec["volumes"] if "configMap" in v)
        config_file = (
            Path(mounts[config_volume["name"]]) / config_volume["configMap"]["items"][0]["path"]
        )
        assert str(config_file) == dockerfile_entrypoint()[-1]

        # the DCS is the Consul server Service of deploy/consul, over HTTPS, verified with the
        # CA of the Secret the servers use
        assert cfg.dcs.type == "consul"
        consul_docs = render(CONSUL)
        consul_svc = one(consul_docs, "Service", "consul-server")
        url = re.match(r"https://([^:/]+):(\d+)$", cfg.dcs.consul.url)
        assert url and url.group(1) == consul_svc["metadata"]["name"]
        assert int(url.group(2)) in {p["port"] for p in consul_svc["spec"]["ports"]}
        assert cfg.dcs.consul.verify and cfg.dcs.consul.ca_cert is not None
        ca_volume = next(
            v
            for v in spec["volumes"]
            if mounts.get(v["name"]) == str(cfg.dcs.consul.ca_cert.parent)
        )
        consul_spec = pod_spec(one(consul_docs, "StatefulSet"))
        assert consul_spec is not None
        consul_tls = next(v for v in consul_spec["volumes"] if v["name"] == "tls")
        assert ca_volume["secret"]["secretName"] == consul_tls["secret"]["secretName"]
        assert cfg.dcs.consul.register_service is False
        assert cfg.kafka.bootstrap_servers, "Kafka bootstrap servers come from the config"

        # pod killing: off in the base, on (with its RBAC) in the overlay
        assert cfg.kubernetes.kill_unhealthy_pods is (directory == POD_KILLING), ctx


def rbac_calls(docs: list[Doc]) -> set[tuple[str, str]]:
    role = one(docs, "Role")
    calls = set()
    for rule in role["rules"]:
        assert rule["apiGroups"] == [""], "core API group only"
        assert "resourceNames" not in rule
        for res in rule["resources"]:
            for verb in rule["verbs"]:
                assert verb != "*" and res != "*"
                calls.add((res, verb))
    return calls


def test_rbac_grants_exactly_the_calls_the_code_makes() -> None:
    for how, docs in renderings(BASE):
        assert rbac_calls(docs) == set(K8S_API_CALLS), how
    for how, docs in renderings(POD_KILLING):
        assert rbac_calls(docs) == set(K8S_API_CALLS) | set(POD_KILLING_API_CALLS), how
    assert not set(K8S_API_CALLS) & set(POD_KILLING_API_CALLS)


def dockerfile_instructions() -> list[tuple[str, str]]:
    lines = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    out = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def dockerfile_entrypoint() -> list[str]:
    entry = [rest for op, rest in dockerfile_instructions() if op == "ENTRYPOINT"]
    assert len(entry) == 1
    value = json.loads(entry[0])  # exec form: no shell between tini and the agent
    assert isinstance(value, list)
    # tini (PID 1) reaps orphaned backends and forwards SIGTERM to the agent alone (no -g)
    assert value[:2] == ["tini", "--"], "the agent must run under an init that reaps"
    return value[2:]


def test_image_runs_the_agent_cli() -> None:
    instr = dockerfile_instructions()
    entry = dockerfile_entrypoint()
    assert entry == ["pgsidecar", "run", "--config", "/etc/pgsidecar/agent.yaml"]
    assert ("STOPSIGNAL", "SIGTERM") in instr, "SIGINT would skip the hand-off"
    # the numeric uid the pods run as (runAsUser), so runAsNonRoot is checkable
    sts_spec = pod_spec(one(render(BASE), "StatefulSet"))
    assert sts_spec is not None
    uid = sts_spec["securityContext"]["runAsUser"]
    assert ("USER", f"{uid}:{sts_spec['securityContext']['runAsGroup']}") in instr
    assert ("CMD", "[]") in instr

    # the console script exists and the CLI takes exactly these arguments
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"][entry[0]] == "pgsidecar.cli:main"
    from pgsidecar.cli import build_parser, cmd_run

    args = build_parser().parse_args(entry[1:])
    assert args.cmd == "run" and args.config == entry[-1] and args.func is cmd_run

    # everything pip needs is copied in: pyproject and every package it includes
    copied = {
        Path(src)
        for op, rest in instr
        if op == "COPY" and not rest.startswith("--from=")  # from the build stage
        for src in rest.split()[:-1]
    }
    assert Path("pyproject.toml") in copied
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert packages <= {str(c) for c in copied}
    for c in copied:
        assert (ROOT / c).exists(), f"COPY source {c} missing from the repository"


def test_no_secret_is_inlined() -> None:
    for directory in (BASE, POD_KILLING, CONSUL):
        for _, docs in renderings(directory):
            assert not by_kind(docs, "Secret")
            for d in docs:
                spec = pod_spec(d)
                for c in spec["containers"] if spec else []:
                    for e in c.get("env") or []:
                        assert not re.search(r"PASSWORD|TOKEN|SECRET", e["name"]), e["name"]
    _, raw = agent_config(render(BASE))
    text = yaml.safe_dump(raw)
    assert not re.search(r"^\s*(password|token):", text, re.M), "secrets are files from the Secret"


def test_consul_servers() -> None:
    for how, docs in renderings(CONSUL):
        sts = one(docs, "StatefulSet", "consul-server")
        spec = pod_spec(sts)
        assert spec is not None
        replicas = sts["spec"]["replicas"]
        assert replicas == 3
        pod_labels = sts["spec"]["template"]["metadata"]["labels"]
        container = spec["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        cm_volume = next(v for v in spec["volumes"] if "configMap" in v)
        cm = one(docs, "ConfigMap", cm_volume["configMap"]["name"])
        server = json.loads(cm["data"][cm_volume["configMap"]["items"][0]["key"]])
        assert server["server"] is True and server["bootstrap_expect"] == replicas
        # restarting a server must not invalidate the sessions (the leases) made through it
        assert server["leave_on_terminate"] is False and server["skip_leave_on_interrupt"] is True
        headless = sts["spec"]["serviceName"]
        assert server["retry_join"] == [
            f"{sts['metadata']['name']}-{i}.{headless}" for i in range(replicas)
        ]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert f"-config-dir={mounts[cm_volume['name']]}" in container["command"]
        assert (
            server["data_dir"] == mounts[sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]]
        )
        services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
        assert services[headless]["spec"]["publishNotReadyAddresses"] is True
        for name, svc in services.items():
            assert svc["spec"]["selector"].items() <= pod_labels.items(), f"{how}: {name}"
            for p in svc["spec"]["ports"]:
                assert ports[p["targetPort"]] == p["port"], f"{how}: {name} {p['name']}"
        assert server["ports"]["https"] == ports["https"]
        pdb = one(docs, "PodDisruptionBudget")
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # the cluster and Consul share a namespace: the agents use the short Service name
    assert (
        one(render(CONSUL), "Service", "consul-server")["metadata"]["namespace"]
        == one(render(BASE), "StatefulSet")["metadata"]["namespace"]
    )


def test_readme_covers_what_an_operator_needs() -> None:
    text = README.read_text()
    headings = [
        line.lstrip("#").strip().lower() for line in text.splitlines() if line.startswith("#")
    ]
    for topic in ("install", "scale", "switchover", "history", "upgrade", "node dies"):
        assert any(topic in h for h in headings), f"README has no section on {topic}"
    for command in (
        "kubectl apply -k deploy/kubernetes",
        "kubectl apply -k deploy/consul",
        "kubectl apply -k deploy/overlays/pod-killing",
        "docker build -f deploy/Dockerfile",
        "pgsidecar switchover --config /etc/pgsidecar/agent.yaml",
    ):
        assert command in text, command
    assert "leave_on_terminate" in text and "invalidated" in text, "why the Consul servers directly"


# ------------------------------------------------------------------ Pod Security "restricted"
# The checks of the Pod Security Standards (https://kubernetes.io/docs/concepts/security/
# pod-security-standards/), baseline and restricted, field by field, plus two of our own:
# a read-only root filesystem and a numeric uid.

RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


def all_containers(spec: Doc) -> list[Doc]:
    return [
        c
        for key in ("initContainers", "containers", "ephemeralContainers")
        for c in spec.get(key) or []
    ]


def restricted_violations(doc: Doc) -> list[str]:
    """What keeps the pods of ``doc`` from the "restricted" profile (empty: they pass)."""
    spec = pod_spec(doc)
    assert spec is not None
    out = []
    psc = spec.get("securityContext") or {}
    for host_field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(host_field):
            out.append(f"pod {host_field}")
    for v in spec.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            out.append(f"volume {v['name']}: type {kinds}")
    for sysctl in psc.get("sysctls") or []:
        if sysctl["name"] not in SAFE_SYSCTLS:
            out.append(f"pod sysctl {sysctl['name']}")
    for where, sc in [("pod", psc)] + [
        (c["name"], c.get("securityContext") or {}) for c in all_containers(spec)
    ]:
        se = sc.get("seLinuxOptions") or {}
        if (
            se.get("user")
            or se.get("role")
            or se.get("type")
            not in (
                None,
                "",
                "container_t",
                "container_init_t",
                "container_kvm_t",
                "container_engine_t",
            )
        ):
            out.append(f"{where}: seLinuxOptions")
        if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
            out.append(f"{where}: appArmor unconfined")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{where}: hostProcess")
        if "runAsUser" in sc and (not isinstance(sc["runAsUser"], int) or sc["runAsUser"] == 0):
            out.append(f"{where}: runAsUser {sc['runAsUser']!r}")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        out.append(f"pod seccomp {pod_seccomp}")
    for c in all_containers(spec):
        name = c["name"]
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities not dropped (drop: [ALL])")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities added {caps['add']}")
        if sc.get("procMount") not in (None, "Default"):
            out.append(f"{name}: procMount")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile {seccomp}")
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            out.append(f"{name}: runAsNonRoot is not true")
        if not isinstance(sc.get("runAsUser", psc.get("runAsUser")), int):
            out.append(f"{name}: no numeric runAsUser")
        if sc.get("readOnlyRootFilesystem") is not True:
            out.append(f"{name}: root filesystem not read-only")
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                out.append(f"{name}: hostPort {p['hostPort']}")
    return out


def pod_docs(directory: Path) -> list[tuple[str, Doc]]:
    return [(how, d) for how, docs in renderings(directory) for d in docs if pod_spec(d)]


ALL_DIRS = [BASE, POD_KILLING, CONSUL]
ALL_IDS = ["base", "pod-killing", "consul"]


@pytest.mark.parametrize("directory", ALL_DIRS, ids=ALL_IDS)
def test_every_pod_passes_pod_security_restricted(directory: Path) -> None:
    found = pod_docs(directory)
    assert found
    for how, doc in found:
        assert restricted_violations(doc) == [], f"{doc['metadata']['name']} ({how})"


def _breakers() -> list[tuple[str, Any]]:
    def container(d: Doc) -> Doc:
        spec = pod_spec(d)
        assert spec is not None
        sc: Doc = spec["containers"][0]["securityContext"]
        return sc

    def pod(d: Doc) -> Doc:
        psc: Doc = spec_of(d)["securityContext"]
        return psc

    def spec_of(d: Doc) -> Doc:
        spec = pod_spec(d)
        assert spec is not None
        return spec

    return [
        ("escalation", lambda d: container(d).pop("allowPrivilegeEscalation")),
        ("caps", lambda d: container(d)["capabilities"].update(drop=["NET_RAW"])),
        ("caps-add", lambda d: container(d)["capabilities"].update(add=["SYS_ADMIN"])),
        ("seccomp", lambda d: pod(d).pop("seccompProfile")),
        ("root", lambda d: container(d).update(runAsNonRoot=False)),
        ("root-unset", lambda d: (pod(d).pop("runAsNonRoot"), container(d).pop("runAsNonRoot"))),
        ("uid", lambda d: pod(d).pop("runAsUser")),
        ("uid0", lambda d: container(d).update(runAsUser=0)),
        ("rw-root", lambda d: container(d).pop("readOnlyRootFilesystem")),
        ("privileged", lambda d: container(d).update(privileged=True)),
        ("hostPath", lambda d: spec_of(d)["volumes"].append({"name": "h", "hostPath": {}})),
        ("hostNetwork", lambda d: spec_of(d).update(hostNetwork=True)),
        ("hostPort", lambda d: spec_of(d)["containers"][0]["ports"][0].update(hostPort=5432)),
    ]


@pytest.mark.parametrize(("what", "breaker"), _breakers(), ids=[b[0] for b in _breakers()])
def test_restricted_check_catches_each_field(what: str, breaker: Any) -> None:
    for directory in (BASE, CONSUL):
        doc = copy.deepcopy(one(render(directory), "StatefulSet"))
        breaker(doc)
        assert restricted_violations(doc), f"{what} not caught in {directory.name}"


@pytest.mark.parametrize("directory", ALL_DIRS, ids=ALL_IDS)
def test_no_service_links_and_token_only_where_needed(directory: Path) -> None:
    for how, doc in pod_docs(directory):
        spec = pod_spec(doc)
        assert spec is not None
        assert spec["enableServiceLinks"] is False, f"{doc['metadata']['name']} ({how})"
        # only the agent calls the Kubernetes API
        assert spec["automountServiceAccountToken"] is (directory != CONSUL), how


def writable_mounts(spec: Doc, claims: set[str]) -> list[Path]:
    volumes = {v["name"]: v for v in spec["volumes"]}
    out = []
    for m in spec["containers"][0]["volumeMounts"]:
        if m.get("readOnly"):
            continue
        v = volumes.get(m["name"], {})
        assert m["name"] in claims or "emptyDir" in v, f"{m['name']}: writable but not scratch"
        out.append(Path(m["mountPath"]))
    return out


def test_read_only_root_leaves_writable_what_is_written() -> None:
    docs = render(BASE)
    sts = one(docs, "StatefulSet")
    spec = pod_spec(sts)
    assert spec is not None
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    writable = writable_mounts(spec, claims)
    cfg, _ = agent_config(docs)
    for path in (
        cfg.state_dir,  # journal, spool, pgpass, sequence numbers
        cfg.postgresql.data_dir,
        Path("/tmp"),
        Path("/var/run/postgresql"),
        Path("/dev/shm"),
    ):
        assert any(path.is_relative_to(w) for w in writable), f"{path} is not writable"
    consul = one(render(CONSUL), "StatefulSet")
    consul_spec = pod_spec(consul)
    assert consul_spec is not None
    cm = one(render(CONSUL), "ConfigMap")
    server = json.loads(cm["data"]["server.json"])
    consul_writable = writable_mounts(
        consul_spec, {c["metadata"]["name"] for c in consul["spec"]["volumeClaimTemplates"]}
    )
    for path in (Path(server["data_dir"]), Path("/tmp")):
        assert any(path.is_relative_to(w) for w in consul_writable), f"consul: {path}"


# ------------------------------------------------------------------ NetworkPolicies


def labels_match(selector: Doc, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is evaluated here: {selector}"
    return (selector.get("matchLabels") or {}).items() <= labels.items()


@dataclass
class Pod:
    namespace: str
    labels: dict[str, str]
    ports: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (port, protocol)

    @property
    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace}


def pod_of(docs: list[Doc], kind: str = "StatefulSet") -> Pod:
    sts = one(docs, kind)
    spec = pod_spec(sts)
    assert spec is not None
    ports = {
        p["name"]: (p["containerPort"], p.get("protocol", "TCP"))
        for c in spec["containers"]
        for p in c.get("ports") or []
    }
    return Pod(sts["metadata"]["namespace"], sts["spec"]["template"]["metadata"]["labels"], ports)


def ingress_allowed(policies: list[Doc], src: Pod, dst: Pod, port: int, protocol: str) -> bool:
    """NetworkPolicy semantics (networking.k8s.io/v1, ingress): a pod selected by no policy
    accepts everything; a selected one accepts what one rule of one policy allows."""
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == dst.namespace
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and labels_match(p["spec"]["podSelector"], dst.labels)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            port_ok = not rule.get("ports") or any(
                (dst.ports[p["port"]][0] if isinstance(p["port"], str) else p["port"]) == port
                and p.get("protocol", "TCP") == protocol
                for p in rule["ports"]
            )
            if not port_ok:
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                assert "ipBlock" not in peer, "address blocks are not used"
                ns_ok = (
                    labels_match(peer["namespaceSelector"], src.namespace_labels)
                    if "namespaceSelector" in peer
                    else src.namespace == policy["metadata"]["namespace"]
                )
                pod_ok = "podSelector" not in peer or labels_match(peer["podSelector"], src.labels)
                if ns_ok and pod_ok:
                    return True
    return False


def test_network_policies_admit_only_who_needs_each_port() -> None:
    for (how, base), (_, consul_docs) in zip(renderings(BASE), renderings(CONSUL), strict=True):
        policies = by_kind(base, "NetworkPolicy") + by_kind(consul_docs, "NetworkPolicy")
        assert len(policies) == 2, how
        pg, consul = pod_of(base), pod_of(consul_docs)
        ns = pg.namespace
        assert consul.namespace == ns
        client = Pod("shop", {"app": "shop", "pgsidecar.io/client": "pg"})
        monitor = Pod("monitoring", {"app": "prometheus", "pgsidecar.io/api-client": "pg"})
        stranger = Pod(ns, {"app": "debug"})
        # a pod wearing the members' labels in another namespace is not a member
        impostor = Pod("other", dict(pg.labels))
        pg_port, api_port = pg.ports["postgresql"][0], pg.ports["api"][0]
        exporter_port = pg.ports["metrics"][0]

        def allowed(
            src: Pod, dst: Pod, port: int, proto: str = "TCP", policies: list[Doc] = policies
        ) -> bool:
            return ingress_allowed(policies, src, dst, port, proto)

        # PostgreSQL: members (replication, rewind, clone) and labelled clients
        expected_pg = {
            "pg": True,
            "client": True,
            "monitor": False,
            "stranger": False,
            "impostor": False,
            "consul": False,
        }
        # the agents' API: members (peers' status, switchover) and labelled API clients
        expected_api = {
            "pg": True,
            "client": False,
            "monitor": True,
            "stranger": False,
            "impostor": False,
            "consul": False,
        }
        sources = {
            "pg": pg,
            "client": client,
            "monitor": monitor,
            "stranger": stranger,
            "impostor": impostor,
            "consul": consul,
        }
        for name, src in sources.items():
            assert allowed(src, pg, pg_port) is expected_pg[name], f"{how}: {name} -> 5432"
            assert allowed(src, pg, api_port) is expected_api[name], f"{how}: {name} -> 8008"
            # postgres_exporter: Prometheus only
            assert allowed(src, pg, exporter_port) is (name == "monitor"), f"{how}: {name} -> 9187"
            # no other port of a member is open to anyone
            assert not allowed(src, pg, 22), f"{how}: {name} -> 22"
            assert not allowed(src, pg, pg_port, "UDP"), f"{how}: {name} -> 5432/udp"

        # Consul: HTTPS from the members and the servers; Raft and gossip between servers only
        https = consul.ports["https"][0]
        internal = [consul.ports[n] for n in ("server", "serflan-tcp", "serflan-udp")]
        for name, src in sources.items():
            assert allowed(src, consul, https) is (name in ("pg", "consul")), f"{how}: {name}"
            for port, proto in internal:
                assert allowed(src, consul, port, proto) is (name == "consul"), (
                    f"{how}: {name} -> {port}/{proto}"
                )
            assert not allowed(src, consul, 8302), "WAN gossip"
            assert not allowed(src, consul, 8500), "plain HTTP"
        # every port a pod declares is governed by a rule naming it
        for pod in (pg, consul):
            for pname, (port, proto) in pod.ports.items():
                assert any(allowed(s, pod, port, proto) for s in sources.values()), pname


# ------------------------------------------------------------------ Consul security


def consul_server_config(docs: list[Doc]) -> Doc:
    cm = one(docs, "ConfigMap")
    server: Doc = json.loads(cm["data"]["server.json"])
    return server


def hcl_rules(path: Path) -> set[tuple[str, str, str]]:
    """(resource, name, policy) of a Consul ACL policy in HCL; anything else is refused."""
    text = re.sub(r"#.*", "", path.read_text())
    rules = re.findall(r'(\w+)\s+"([^"]*)"\s*\{\s*policy\s*=\s*"(\w+)"\s*\}', text)
    rest = re.sub(r'(\w+)\s+"([^"]*)"\s*\{\s*policy\s*=\s*"(\w+)"\s*\}', "", text)
    assert not rest.strip(), f"{path}: unparsed policy text {rest.strip()!r}"
    return set(rules)


def secret_file(spec: Doc, path: str) -> tuple[str, str]:
    """(Secret, key) a file of the pod's first container comes from."""
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    for v in spec["volumes"]:
        if "secret" in v and Path(path).parent == Path(mounts.get(v["name"], "/nonexistent")):
            item = next(i for i in v["secret"]["items"] if i["path"] == Path(path).name)
            return v["secret"]["secretName"], item["key"]
    raise AssertionError(f"{path} is not from a Secret")


def test_consul_acls_tls_gossip_and_no_ui() -> None:
    secrets = documented_secrets()
    for how, docs in renderings(CONSUL):
        server = consul_server_config(docs)
        # ACLs on, everything denied that a token does not allow
        assert server["acl"]["enabled"] is True and server["acl"]["default_policy"] == "deny"
        assert server["acl"]["down_policy"] != "allow"
        # no UI, no plain HTTP, no DNS or gRPC
        assert server["ui_config"]["enabled"] is False and not server.get("ui")
        assert server["ports"]["http"] == -1 and server["ports"]["dns"] == -1
        assert server["ports"]["grpc"] == -1 and server["ports"]["grpc_tls"] == -1
        # TLS: the API over HTTPS, servers verify each other (certificate and name)
        tls = server["tls"]
        assert tls["defaults"]["verify_incoming"] is True
        assert tls["defaults"]["verify_outgoing"] is True
        assert tls["internal_rpc"]["verify_server_hostname"] is True
        # gossip encrypted, the key from a Secret, never in the ConfigMap
        assert "encrypt" not in server
        assert server["encrypt_verify_incoming"] and server["encrypt_verify_outgoing"]

        sts = one(docs, "StatefulSet")
        spec = pod_spec(sts)
        assert spec is not None
        container = spec["containers"][0]
        for key in ("ca_file", "cert_file", "key_file"):
            name, item = secret_file(spec, tls["defaults"][key])
            assert item in secrets.get(name, set()), f"{how}: {name}/{item} not in the README"
        gossip = [a.split("=", 1)[1] for a in container["command"] if a.startswith("-config-file=")]
        assert len(gossip) == 1
        name, item = secret_file(spec, gossip[0])
        assert item in secrets.get(name, set()), f"{how}: {name}/{item} not in the README"
        assert '"encrypt"' in README.read_text().replace("\\", "")

        # listening on the pod address (and loopback), never on every address
        assert "client_addr" not in server and "bind_addr" not in server
        args = container["command"]
        assert "-bind=$(POD_IP)" in args
        client = next(a for a in args if a.startswith("-client="))
        assert set(client.removeprefix("-client=").split()) == {"127.0.0.1", "$(POD_IP)"}
        assert "0.0.0.0" not in json.dumps(server) and "0.0.0.0" not in " ".join(args)
        # the probe and the CLI use HTTPS on loopback, where the server certificate is valid
        probe = " ".join(container["readinessProbe"]["exec"]["command"])
        assert "https://127.0.0.1:" in probe and "--cacert" in probe


def test_consul_acl_policies_are_narrow() -> None:
    from events.dcs.consul import ConsulDCS
    from pgsidecar.config import ConsulSettings

    cfg, _ = agent_config(render(BASE))
    consul_docs = render(CONSUL)
    sts = one(consul_docs, "StatefulSet")
    spec = pod_spec(sts)
    assert spec is not None
    container = spec["containers"][0]
    # the servers' node names are their pod names: the sessions the agents create belong to them
    assert "-node=$(POD_NAME)" in container["command"]
    assert container_env(container, SAMPLE)["POD_NAME"] == SAMPLE["metadata.name"]
    nodes = f"{sts['metadata']['name']}-"

    base = ConsulDCS(ConsulSettings(), cfg.cluster, cfg.dcs.prefix).base
    assert hcl_rules(CONSUL / "acl" / "pgsidecar.hcl") == {
        ("key_prefix", base, "write"),  # the cluster's keys and nothing else
        ("session_prefix", nodes, "write"),
        ("service", cfg.cluster, "write"),
    }
    assert hcl_rules(CONSUL / "acl" / "server-agent.hcl") == {
        ("node_prefix", nodes, "write"),
        ("service_prefix", "", "read"),
    }
    # the bootstrap script installs both policies and hands the agents' token to the file
    # the agent reads it from
    script = ACL_BOOTSTRAP.read_text()
    for policy in ("acl/pgsidecar.hcl", "acl/server-agent.hcl"):
        assert f'"$HERE/{policy}"' in script
    assert "-policy-name pgsidecar-pg" in script and "-name pgsidecar-pg" in script
    pg_spec = pod_spec(one(render(BASE), "StatefulSet"))
    assert pg_spec is not None
    token_file = cfg.dcs.consul.token_file
    assert token_file is not None
    pg_secret = next(
        v for v in pg_spec["volumes"] if v.get("secret", {}).get("secretName") == "pg-secrets"
    )
    item = next(i for i in pg_secret["secret"]["items"] if i["path"] == token_file.name)
    assert re.search(r"patch secret pg-secrets\b", script)
    assert f'"stringData":{{"{item["key"]}"' in script
    assert "acl bootstrap" in script and "set-agent-token agent" in script
    # no token on a command line of the operator's machine
    assert not re.search(r"--from-literal=token", script)
    readme = README.read_text()
    assert "deploy/consul/acl-bootstrap.sh" in readme


# ------------------------------------------------------------------ probes, spreading, exporter


def probe_budget(probe: Doc) -> float:
    """Seconds of consecutive failures before the kubelet acts on a probe."""
    return float(probe["periodSeconds"] * probe["failureThreshold"])


@pytest.mark.parametrize("directory", [BASE, POD_KILLING], ids=["base", "pod-killing"])
def test_probes_tolerate_slowness_and_never_ask_postgresql_for_liveness(directory: Path) -> None:
    for how, docs in renderings(directory):
        spec = pod_spec(one(docs, "StatefulSet"))
        assert spec is not None
        agent = spec["containers"][0]
        ready, live, start = (agent[k] for k in ("readinessProbe", "livenessProbe", "startupProbe"))
        # one slow or failed answer does not take a member out of its Service
        assert ready["failureThreshold"] >= 2 and ready["timeoutSeconds"] >= 2, how
        assert ready["httpGet"]["path"].split("?")[0] == "/readiness"
        # liveness and startup ask the agent's loop only, never PostgreSQL
        assert live["httpGet"]["path"] == start["httpGet"]["path"] == "/liveness", how
        # a long crash recovery or clone: at least 15 minutes before a start counts as hung
        assert probe_budget(start) >= 900, how
        assert probe_budget(live) >= 60, "a liveness restart of the master is a failover"
        assert "initialDelaySeconds" not in live, "the startup probe holds liveness off"
        # no other container probes PostgreSQL into a restart either
        for c in spec["containers"][1:]:
            assert "livenessProbe" not in c, c["name"]


def test_members_spread_over_nodes_and_zones() -> None:
    for how, docs in renderings(BASE):
        sts = one(docs, "StatefulSet")
        spec = pod_spec(sts)
        assert spec is not None
        labels = sts["spec"]["template"]["metadata"]["labels"]
        (zone,) = spec["topologySpreadConstraints"]
        assert zone["topologyKey"] == "topology.kubernetes.io/zone" and zone["maxSkew"] == 1, how
        assert zone["labelSelector"]["matchLabels"].items() <= labels.items()
        anti = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert anti[0]["topologyKey"] == "kubernetes.io/hostname"


def test_postgres_exporter_container() -> None:
    for how, docs in renderings(BASE):
        spec = pod_spec(one(docs, "StatefulSet"))
        assert spec is not None
        exporter = next(c for c in spec["containers"] if c["name"] == "postgres-exporter")
        # upstream image, pinned by digest
        assert re.fullmatch(
            r"quay\.io/prometheuscommunity/postgres-exporter:v[\d.]+@sha256:[0-9a-f]{64}",
            exporter["image"],
        ), how
        env = {e["name"]: e["value"] for e in exporter["env"]}
        cfg, _ = agent_config(docs)
        # over the pod's loopback, as the monitoring role, never the superuser
        assert env["DATA_SOURCE_URI"].startswith(f"127.0.0.1:{cfg.postgresql.port}/")
        assert env["DATA_SOURCE_USER"] not in (
            cfg.postgresql.superuser.username,
            cfg.postgresql.replication.username,
        )
        # the password is a file from the Secret, and the exporter sees no other secret
        mounts = {m["name"]: m["mountPath"] for m in exporter["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        secret_mounts = [n for n in mounts if "secret" in volumes[n]]
        assert len(secret_mounts) == 1
        items = volumes[secret_mounts[0]]["secret"]["items"]
        assert [i["key"] for i in items] == ["monitor-password"]
        assert env["DATA_SOURCE_PASS_FILE"] == f"{mounts[secret_mounts[0]]}/{items[0]['path']}"
        assert all(m.get("readOnly") for m in exporter["volumeMounts"])
        # the agent gets the same password (it creates the role with it)
        agent_mounts = {m["name"] for m in spec["containers"][0]["volumeMounts"]}
        agent_items = {
            i["key"]
            for v in spec["volumes"]
            if "secret" in v and v["name"] in agent_mounts
            for i in v["secret"]["items"]
        }
        assert "monitor-password" in agent_items
        # ... and creates the role the exporter logs in as, with the password of the same
        # Secret key the exporter reads
        mon = cfg.postgresql.monitoring
        assert mon is not None and mon.username == env["DATA_SOURCE_USER"], how
        agent_files = {
            Path(m["mountPath"]) / i["path"]: (volumes[m["name"]]["secret"]["secretName"], i["key"])
            for m in spec["containers"][0]["volumeMounts"]
            if "secret" in volumes.get(m["name"], {})
            for i in volumes[m["name"]]["secret"]["items"]
        }
        exporter_secret = volumes[secret_mounts[0]]["secret"]["secretName"]
        assert agent_files[mon.password_file] == (exporter_secret, "monitor-password"), how


def test_haproxy_defaults_are_fully_qualified_names_of_the_headless_service() -> None:
    """HAProxy's run-time resolver never applies resolv.conf's search list: a short name
    resolves at start-up (libc) and never again once a pod has moved. So every default server
    address is <pod>.<headless service>.<namespace>.svc.cluster.local, for the pods, Service and
    namespace that deploy/kubernetes creates."""
    docs = render(DEPLOY / "kubernetes")
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    namespace = sts["metadata"]["namespace"]
    service = sts["spec"]["serviceName"]
    pods = [f"{sts['metadata']['name']}-{i}" for i in range(sts["spec"]["replicas"])]
    assert any(d["kind"] == "Service" and d["metadata"]["name"] == service for d in docs)
    cfg = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    defaults = re.findall(r'server \S+ "\$\{PGSC_PG\d_ADDR-([^}]+)\}"', cfg)
    assert defaults, "no server lines found in haproxy.cfg"
    for address in defaults:
        host, _, port = address.rpartition(":")
        pod, _, domain = host.partition(".")
        assert pod in pods and port == "5432", address
        assert domain == f"{service}.{namespace}.svc.cluster.local", address
    assert sorted({a.partition(".")[0] for a in defaults}) == sorted(pods)
