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
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from events.k8s import K8S_API_CALLS, POD_KILLING_API_CALLS, ROLE_LABEL, ROLE_VALUES
from pgsidecar.config import AgentConfig, _apply_env

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "kubernetes"
POD_KILLING = DEPLOY / "overlays" / "pod-killing"
CONSUL = DEPLOY / "consul"
README = DEPLOY / "README.md"
DOCKERFILE = DEPLOY / "Dockerfile"

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
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


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
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert k.get("kind", "Kustomization") == expect_kind, directory
    unknown = set(k) - KUSTOMIZATION_KEYS
    assert not unknown, f"renderer does not implement {unknown} ({directory})"
    for res in k.get("resources") or []:
        target = (directory / res).resolve()
        docs.extend(render(target) if target.is_dir() else load_docs(target))
    for gen in k.get("configMapGenerator") or []:
        assert set(gen) <= {"name", "files"}, gen
        data = {}
        for f in gen["files"]:
            key, _, src = f.partition("=") if "=" in f else (Path(f).name, "", f)
            data[key] = (directory / src).read_text()
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": gen["name"]},
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
            apply_json6902(d, yaml.safe_load(patch["patch"]))
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
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


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
    raw = yaml.safe_load(one(docs, "ConfigMap", cm_name)["data"]["agent.yaml"])
    merged = _apply_env(copy.deepcopy(raw), env)
    return AgentConfig.model_validate(merged), raw


# ------------------------------------------------------------------ tests


def test_every_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
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
    for kind in ("Role", "Service", "PodDisruptionBudget"):
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
    assert spec["securityContext"]["runAsUser"] == 999, "the official image's postgres uid"
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
        secret_volume = next(v for v in spec["volumes"] if "secret" in v)
        secret_files = {
            Path(mounts[secret_volume["name"]]) / i["path"]
            for i in secret_volume["secret"]["items"]
        }
        used = {
            cfg.postgresql.superuser.password_file,
            cfg.postgresql.replication.password_file,
            cfg.api.token_file,
        }
        assert used <= secret_files, ctx
        assert (
            cfg.postgresql.superuser.password is None
            and cfg.postgresql.replication.password is None
        )
        assert cfg.api.token is None

        # the entrypoint's config path is the ConfigMap's file
        config_volume = next(v for v in spec["volumes"] if "configMap" in v)
        config_file = (
            Path(mounts[config_volume["name"]]) / config_volume["configMap"]["items"][0]["path"]
        )
        assert str(config_file) == dockerfile_entrypoint()[-1]

        # the DCS is the Consul server Service of deploy/consul
        assert cfg.dcs.type == "consul"
        consul_svc = one(render(CONSUL), "Service", "consul-server")
        url = re.match(r"http://([^:/]+):(\d+)$", cfg.dcs.consul.url)
        assert url and url.group(1) == consul_svc["metadata"]["name"]
        assert int(url.group(2)) in {p["port"] for p in consul_svc["spec"]["ports"]}
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
    assert instr[0] == ("FROM", "postgres:15")
    entry = dockerfile_entrypoint()
    assert entry == ["pgsidecar", "run", "--config", "/etc/pgsidecar/agent.yaml"]
    assert ("STOPSIGNAL", "SIGTERM") in instr, "the official image's SIGINT would skip the hand-off"
    assert ("USER", "postgres") in instr
    assert ("CMD", "[]") in instr

    # the console script exists and the CLI takes exactly these arguments
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"][entry[0]] == "pgsidecar.cli:main"
    from pgsidecar.cli import build_parser, cmd_run

    args = build_parser().parse_args(entry[1:])
    assert args.cmd == "run" and args.config == entry[-1] and args.func is cmd_run

    # everything pip needs is copied in: pyproject and every package it includes
    copied = {Path(rest.split()[0]) for op, rest in instr if op == "COPY"}
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
        assert server["ports"]["http"] == ports["http"]
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
