"""A real Prometheus server scrapes a real sidecar's admin port; its HTTP API then answers
``http_requests_total`` and a ``histogram_quantile`` over the duration buckets."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import basic_config
from tests.support.processes import Process, Sidecar, Upstream, free_port, wait_for_port


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("prometheus is not installed: run `make test`, it installs prometheus")
    return path


class Prometheus(Process):
    """A throwaway Prometheus scraping one target every second."""

    def __init__(self, workdir: Path, target: str, metrics_path: str) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
            "scrape_configs": [
                {
                    "job_name": "sidecar",
                    "metrics_path": metrics_path,
                    "static_configs": [{"targets": [target]}],
                }
            ],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        super().__init__(
            [
                prometheus_binary(),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            name="prometheus",
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        super().start()
        wait_for_port(self.port, self.proc, timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready:\n{self.output()}")

    def query(self, promql: str) -> list[dict]:
        response = httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=5)
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, promql: str, predicate, timeout: float = 30.0) -> list[dict]:  # type: ignore[no-untyped-def]
        """Query until ``predicate(result)`` holds (scrapes happen every second)."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if predicate(result):
                return result
            time.sleep(0.25)
        raise AssertionError(f"{promql} never satisfied the condition; last: {result}")


@pytest.fixture
def prometheus(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[list[Prometheus]]:
    started: list[Prometheus] = []
    yield started
    for server in started:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f"--- prometheus log ---\n{server.output()}")
        server.stop(timeout=10)


def scalar(result: list[dict]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def test_real_prometheus_scrapes_requests_and_computes_histogram_quantile(
    echo_upstream: Upstream, start_sidecar, prometheus: list[Prometheus], tmp_path: Path
) -> None:
    config = basic_config(echo_upstream.url)
    config["routes"] = [{"match": {"path": "/echo"}, "upstream": "app"}]
    sidecar: Sidecar = start_sidecar(config, wait_ready=True)
    server = Prometheus(tmp_path, f"127.0.0.1:{sidecar.admin_port}", "/api/metrics").start()
    prometheus.append(server)

    server.wait_for('up{job="sidecar"}', lambda r: r and r[0]["value"][1] == "1")
    with httpx.Client(base_url=sidecar.url) as client:
        for _ in range(20):
            assert client.get("/echo").status_code == 200
        # Phase 1 scraped before phase 2 starts, so rate() sees the counters move.
        server.wait_for(
            'http_requests_total{endpoint="/echo",status="200"}',
            lambda r: r and r[0]["value"][1] == "20",
        )
        for _ in range(80):
            assert client.get("/echo").status_code == 200
        for _ in range(5):
            assert client.get("/status/503").status_code == 503

    result = server.wait_for(
        'http_requests_total{job="sidecar",endpoint="/echo",method="GET",status="200"}',
        lambda r: r and r[0]["value"][1] == "100",
    )
    assert result[0]["metric"]["__name__"] == "http_requests_total"
    errors = server.wait_for(
        'sum(http_requests_total{status=~"5.."})', lambda r: r and r[0]["value"][1] == "5"
    )
    assert scalar(errors) == 5

    p90 = scalar(
        server.wait_for(
            'histogram_quantile(0.9, sum by (le) (rate(http_request_duration_seconds_bucket{endpoint="/echo"}[1m])))',
            lambda r: r and math.isfinite(float(r[0]["value"][1])),
        )
    )
    assert 0 < p90 < 10  # a real number of seconds (generous: shared CI machine)
    count = scalar(server.query('sum(http_request_duration_seconds_count{endpoint="/echo"})'))
    assert count == 100

    # The scrape itself is healthy (Prometheus asks for OpenMetrics by Accept) and error-free.
    targets = httpx.get(server.url + "/api/v1/targets", timeout=5).json()["data"]
    active = targets["activeTargets"]
    assert len(active) == 1 and active[0]["health"] == "up", active
    assert active[0]["lastError"] == ""
    assert scalar(server.query('sidecar_requests_in_flight{job="sidecar"}')) == 0
    assert len(server.query('sidecar_system_load_average{job="sidecar"}')) == 3
