"""The restaurant-api pod, run for real on this machine the way the kubelet would run it.

No cluster here, so the pod is played from the rendered manifests: the init containers'
commands run to completion in order, then the native sidecar (the image's ENTRYPOINT with
the container's args) and the API container, each with the environment the kubelet would
give it, the sidecar reading the shipped ConfigMap content from a directory laid out the way
the kubelet lays out a ConfigMap volume (``..data`` symlink swapped atomically on update).
Only ports are changed (free ports instead of 8080/9901/3000) and hosts are pinned to
loopback. Probes are run from their specs. A real Prometheus runs the shipped scrape job.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import basic_config
from tests.support.processes import RedisServer, Sidecar, free_port, wait_for_port
from tests.test_k8s import (
    K8S,
    api_deployment,
    container,
    container_env,
    declared_port,
    one,
    pod_spec,
    render,
)
from tests.test_k8s_dockerfile import exec_form, stages

BIN = Path(sys.executable).parent
Doc = dict[str, Any]


# -- a pod on this machine -------------------------------------------------------------------
class ConfigMapVolume:
    """A ConfigMap volume as the kubelet writes it: files are symlinks through ``..data``,
    which is replaced atomically (rename of a new symlink) on every update."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir()
        self.version = 0

    def write(self, files: dict[str, str]) -> None:
        self.version += 1
        payload = self.root / f"..2025_01_01_00_00_{self.version:02d}.{os.getpid()}"
        payload.mkdir()
        for name, text in files.items():
            (payload / name).write_text(text)
        old = (self.root / "..data").resolve() if (self.root / "..data").exists() else None
        staging = self.root / "..data_tmp"
        staging.symlink_to(payload.name)
        os.replace(staging, self.root / "..data")
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")
        if old is not None:
            shutil.rmtree(old)


class Container:
    """One container's process: its argv with a program from the virtualenv."""

    def __init__(self, name: str, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = [_program(argv[0]), *argv[1:]]
        self.log = tempfile.NamedTemporaryFile(prefix=f"pod-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _program(name: str) -> str:
    if name == "python":
        return sys.executable
    path = BIN / name
    assert path.exists(), f"{name} is not installed in the virtualenv"
    return str(path)


def _replace_arg(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


class Pod:
    """The rendered restaurant-api pod template, played on loopback with free ports."""

    def __init__(self, docs: tuple[Doc, ...], workdir: Path, env: dict[str, str]) -> None:
        self.docs = docs
        self.spec = pod_spec(api_deployment(docs))
        self.workdir = workdir
        self.extra_env = env
        self.app_dir = workdir / "app"  # the image's WORKDIR; var/ in it is the data emptyDir
        self.app_dir.mkdir()
        self.api_port = free_port()
        self.running: list[Container] = []
        sidecar = container(self.spec, "sidecar")
        config_file = Path(sidecar["args"][sidecar["args"].index("--config") + 1])
        self.config_map = one(docs, "ConfigMap", "sidecar-config")
        self.config_key = config_file.name
        self.volume = ConfigMapVolume(workdir / "etc-sidecar")
        self.config_path = self.volume.root / config_file.name
        self.shipped_config = yaml.safe_load(self.config_map["data"][self.config_key])

    def env(self, item: Doc) -> dict[str, str]:
        return {**container_env(self.docs, item), **self.extra_env}

    def local_config(self, **changes: Any) -> dict:
        """The ConfigMap's config with loopback hosts and this pod's free ports."""
        config = yaml.safe_load(yaml.safe_dump(self.shipped_config))
        config["listen"].update(host="127.0.0.1", port=self.proxy_port)
        config["admin"].update(host="127.0.0.1", port=self.admin_port)
        config["upstreams"]["app"]["url"] = f"http://127.0.0.1:{self.api_port}"
        config.update(changes)
        return config

    def write_config(self, config: dict | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        self.volume.write({self.config_key: text})

    def start(self) -> Pod:
        self.proxy_port, self.admin_port = free_port(), free_port()
        self.write_config(self.local_config())
        for item in self.spec["initContainers"]:
            if item.get("restartPolicy") == "Always":
                self._start_sidecar(item)
            else:
                argv = item["command"] + item.get("args", [])
                result = subprocess.run(
                    [_program(argv[0]), *argv[1:]],
                    cwd=self.app_dir,
                    env={**os.environ, **self.env(item)},
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert result.returncode == 0, f"init container {item['name']}: {result}"
        for item in self.spec["containers"]:
            argv = _replace_arg(item["command"] + item["args"], "--port", str(self.api_port))
            self.running.append(Container(item["name"], argv, self.app_dir, self.env(item)))
        wait_for_port(self.api_port, self.container("api").proc)
        return self

    def _start_sidecar(self, item: Doc) -> None:
        (entrypoint,) = stages()[-1].lines("ENTRYPOINT")
        argv = exec_form(entrypoint) + _replace_arg(item["args"], "--config", str(self.config_path))
        self.running.append(Container(item["name"], argv, self.app_dir, self.env(item)))
        # The kubelet starts the next container only once the startup probe passed.
        assert self.probe(item, "startupProbe"), self.container("sidecar").output()

    def container(self, name: str) -> Container:
        return next(c for c in self.running if c.name == name)

    def port(self, declared: int | str) -> int:
        """Where a declared port of the manifest listens in this local pod."""
        number = declared_port(self.spec, declared)
        return {
            self.shipped_config["listen"]["port"]: self.proxy_port,
            self.shipped_config["admin"]["port"]: self.admin_port,
        }[number]

    def probe(self, item: Doc, kind: str) -> bool:
        """Run a probe the way the kubelet does: every periodSeconds, up to failureThreshold."""
        spec = item[kind]
        for _ in range(spec.get("failureThreshold", 3)):
            if self.probe_once(item, kind):
                return True
            time.sleep(spec.get("periodSeconds", 10))
        return False

    def probe_once(self, item: Doc, kind: str) -> bool:
        spec = item[kind]
        timeout = spec.get("timeoutSeconds", 1)
        if "httpGet" in spec:
            url = f"http://127.0.0.1:{self.port(spec['httpGet']['port'])}{spec['httpGet']['path']}"
            try:
                return 200 <= httpx.get(url, timeout=timeout).status_code < 400
            except httpx.HTTPError:
                return False
        command = [part.replace(":3000/", f":{self.api_port}/") for part in spec["exec"]["command"]]
        result = subprocess.run(
            [_program(command[0]), *command[1:]], capture_output=True, timeout=timeout + 5
        )
        return result.returncode == 0

    def wait_ready(self, timeout: float = 20.0) -> None:
        sidecar = container(self.spec, "sidecar")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.probe_once(sidecar, "readinessProbe"):
                return
            time.sleep(0.2)
        raise AssertionError(f"pod not ready:\n{self.container('sidecar').output()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def effective_config(self) -> dict:
        path = self.shipped_config["admin"]["paths"]["config"]
        return httpx.get(self.admin_url + path, timeout=5).json()

    def reloads(self, result: str) -> float:
        """sidecar_config_reloads_total{result=...} from the admin metrics endpoint."""
        path = self.shipped_config["admin"]["paths"]["metrics"]
        text = httpx.get(self.admin_url + path, timeout=5).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "sidecar_config_reloads_total" and sample.labels == {
                    "result": result
                }:
                    return sample.value
        raise AssertionError("no sidecar_config_reloads_total sample")

    def stop(self) -> None:
        for item in reversed(self.running):
            item.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {c.name} ---\n{c.output()}" for c in self.running)


@pytest.fixture
def start_pod(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Pod]]:
    pods: list[Pod] = []

    def start(entry: str = "k8s/base", env: dict[str, str] | None = None) -> Pod:
        workdir = tmp_path / f"pod{len(pods)}"
        workdir.mkdir()
        pod = Pod(render(entry), workdir, env or {})
        pods.append(pod)
        return pod.start()

    yield start
    for pod in pods:
        pod.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for pod in pods:
            print(pod.logs())


# -- tests -----------------------------------------------------------------------------------
def test_pod_migrates_seeds_and_serves_the_api_only_through_the_sidecar(
    start_pod: Callable[..., Pod],
) -> None:
    pod = start_pod()
    pod.wait_ready()
    sidecar, api = container(pod.spec, "sidecar"), container(pod.spec, "api")
    assert pod.probe_once(sidecar, "livenessProbe")
    assert pod.probe_once(api, "livenessProbe"), "the API's exec liveness probe fails"
    assert (pod.app_dir / "var" / "restaurant.db").exists(), "SQLite lives on the data volume"

    response = httpx.get(pod.url + "/api/restaurants", timeout=10)
    assert response.status_code == 200
    assert "Trattoria Roma" in response.text, "the seed init container ran"
    restaurant_id = response.json()["restaurants"][0]["id"]
    order = {"restaurant_id": restaurant_id, "items": [{"name": "Margherita", "quantity": 1}]}
    headers = {"Idempotency-Key": "k8s-pod-order-1"}
    first = httpx.post(pod.url + "/api/orders", json={**order, "amount": 9.5}, headers=headers)
    again = httpx.post(pod.url + "/api/orders", json={**order, "amount": 9.5}, headers=headers)
    assert first.status_code == 201, first.text
    assert again.status_code == 201 and again.json() == first.json()
    assert again.headers.get("idempotent-replayed") == "true"


def test_configmap_update_is_reloaded_and_an_invalid_one_is_rejected(
    start_pod: Callable[..., Pod],
) -> None:
    pod = start_pod()
    pod.wait_ready()
    before = pod.effective_config()
    assert before["upstreams"]["app"]["retry"]["max_attempts"] == 3

    changed = pod.local_config()
    changed["upstreams"]["app"]["retry"]["max_attempts"] = 2
    pod.write_config(changed)  # what the kubelet does when the ConfigMap is edited
    deadline = time.monotonic() + 20
    while pod.effective_config()["upstreams"]["app"]["retry"]["max_attempts"] != 2:
        assert time.monotonic() < deadline, f"not reloaded:\n{pod.logs()}"
        time.sleep(0.2)
    assert pod.reloads("success") == 1 and pod.reloads("error") == 0

    pod.write_config("listen: {port: 1\nroutes: [")  # broken YAML
    deadline = time.monotonic() + 20
    while pod.reloads("error") < 1:
        assert time.monotonic() < deadline, f"invalid config not noticed:\n{pod.logs()}"
        time.sleep(0.2)
    assert pod.effective_config()["upstreams"]["app"]["retry"]["max_attempts"] == 2
    assert httpx.get(pod.url + "/api/restaurants", timeout=10).status_code == 200


def test_pod_stops_in_kubelet_order_and_exits_cleanly(start_pod: Callable[..., Pod]) -> None:
    """After the preStop sleep the API gets SIGTERM; the native sidecar only once it exited."""
    pod = start_pod()
    pod.wait_ready()
    api, sidecar = pod.container("api"), pod.container("sidecar")
    api.proc.send_signal(signal.SIGTERM)
    # uvicorn finishes gracefully, then re-raises the signal (exit code 143 in Kubernetes).
    assert api.proc.wait(timeout=30) in (0, -signal.SIGTERM), api.output()
    assert "Finished server process" in api.output()
    sidecar.proc.send_signal(signal.SIGTERM)
    ready_path = container(pod.spec, "sidecar")["readinessProbe"]["httpGet"]["path"]
    assert httpx.get(pod.admin_url + ready_path, timeout=5).status_code == 503
    grace = pod.spec["terminationGracePeriodSeconds"]
    assert sidecar.proc.wait(timeout=grace) == 0, sidecar.output()


def test_two_replicas_share_idempotency_through_redis(
    start_pod: Callable[..., Pod], own_redis: RedisServer
) -> None:
    """The full demo's environment (redis component) on two pods sharing one database."""
    sidecar_env = container_env(
        render("k8s"), container(pod_spec(api_deployment(render("k8s"))), "sidecar")
    )
    assert sidecar_env["SIDECAR_STORE"] == "redis"
    # Same environment, with the test's redis-server instead of the in-cluster name.
    database = f"sqlite:///{tempfile.mkdtemp()}/shared.db"  # PostgreSQL's stand-in
    env = {"REDIS_URL": own_redis.url, "DATABASE_URL": database}
    first_pod = start_pod("k8s", env=env)
    second_pod = start_pod("k8s", env=env)
    for pod in (first_pod, second_pod):
        pod.wait_ready()
        assert pod.effective_config()["store"]["backend"] == "redis"
    order = {"restaurant_id": 1, "items": [{"name": "Margherita"}], "amount": 9.5}
    headers = {"Idempotency-Key": "k8s-two-replicas-1"}
    created = httpx.post(first_pod.url + "/api/orders", json=order, headers=headers, timeout=10)
    retried = httpx.post(second_pod.url + "/api/orders", json=order, headers=headers, timeout=10)
    assert created.status_code == 201, created.text
    assert retried.json() == created.json(), "the retry on the other replica ran again"
    assert retried.headers.get("idempotent-replayed") == "true"
    # The database the replicas share holds one order: the API ran it once.
    assert httpx.get(second_pod.url + "/api/orders", timeout=10).json()["total"] == 1


def test_prometheus_scrape_job_scrapes_the_sidecar_admin_port(
    start_sidecar: Callable[..., Sidecar], echo_upstream: Any, tmp_path: Path
) -> None:
    """The shipped job's relabelling, run by a real Prometheus on a target that carries the
    discovery labels Kubernetes would give this pod (annotations from the manifest)."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus is missing: `make test` installs it (Debian package prometheus)")
    sidecar = start_sidecar(basic_config(echo_upstream.url), wait_ready=True)
    template = api_deployment(render("k8s"))["spec"]["template"]
    annotations = {
        **template["metadata"]["annotations"],
        "prometheus.io/port": str(sidecar.admin_port),
    }

    def discovered(pod_name: str, pod_annotations: dict[str, str]) -> dict:
        labels = {
            "__meta_kubernetes_namespace": "restaurant",
            "__meta_kubernetes_pod_name": pod_name,
            "__meta_kubernetes_pod_ip": "127.0.0.1",
            "__meta_kubernetes_pod_phase": "Running",
            "__meta_kubernetes_pod_label_app_kubernetes_io_name": "restaurant-api",
        }
        for key, value in pod_annotations.items():
            name = "".join(c if c.isalnum() else "_" for c in key)
            labels[f"__meta_kubernetes_pod_annotation_{name}"] = value
        # Discovery gives one target per declared container port (here: the proxy port).
        return {"targets": [f"127.0.0.1:{sidecar.port}"], "labels": labels}

    config = yaml.safe_load((K8S / "prometheus" / "scrape-config.yaml").read_text())
    job = config["scrape_configs"][0]
    del job["kubernetes_sd_configs"]
    job["static_configs"] = [
        discovered("restaurant-api-a", annotations),
        discovered("unannotated", {}),
    ]
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s"}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    web_port = free_port()
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(web_port, server, timeout=30)
        deadline = time.monotonic() + 30
        while True:
            targets = httpx.get(f"http://127.0.0.1:{web_port}/api/v1/targets", timeout=5).json()
            active = targets["data"]["activeTargets"]
            if active and active[0]["health"] == "up":
                break
            assert time.monotonic() < deadline, targets
            time.sleep(0.5)
        (target,) = active
        metrics_path = template["metadata"]["annotations"]["prometheus.io/path"]
        assert target["scrapeUrl"] == f"http://127.0.0.1:{sidecar.admin_port}{metrics_path}"
        assert target["labels"]["pod"] == "restaurant-api-a"
        assert target["labels"]["namespace"] == "restaurant"
        dropped = targets["data"]["droppedTargets"]
        assert [t["discoveredLabels"]["__meta_kubernetes_pod_name"] for t in dropped] == [
            "unannotated"
        ]
    finally:
        server.terminate()
        server.wait(timeout=10)
