"""``/api/metrics`` of a real sidecar in front of the real echo upstream: values after a
known sequence of requests (parsed with prometheus-client's parser), ``promtool check
metrics``, OpenMetrics by ``Accept``, the JSON view, reload counting, and 10,000 random
paths that leave the series count bounded."""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import subprocess
import time
import uuid

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families

from proxy import system
from proxy.metrics import LATENCY_BUCKETS
from tests.conftest import basic_config
from tests.support.processes import Sidecar, Upstream, free_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_config(upstream_url: str) -> dict:
    config = basic_config(upstream_url)
    # One attempt per request and a breaker that stays closed: the counts below are the
    # metrics layer's, not the retry or breaker policies'.
    config["upstreams"]["app"]["retry"] = {"max_attempts": 1}
    config["upstreams"]["app"]["circuit_breaker"] = {"failure_threshold": 1000}
    config["upstreams"]["dead"] = {
        "url": f"http://127.0.0.1:{free_port()}",
        "health_check": {"enabled": False},
        "retry": {"max_attempts": 1},
        "circuit_breaker": {"failure_threshold": 1000},
    }
    config["routes"] = [
        {"match": {"path": "/echo"}, "upstream": "app"},
        {"match": {"path": "/status/{code}"}, "upstream": "app"},
        {"match": {"path_prefix": "/upload"}, "upstream": "app", "limits": {"max_body_bytes": 100}},
        {"match": {"path_prefix": "/dead/"}, "upstream": "dead"},
        {"match": {"path_prefix": "/api/"}, "upstream": "app"},
        {"match": {"path": "/items/{id}"}, "upstream": "app"},
    ]
    return config


def scrape(sidecar: Sidecar, **headers: str) -> httpx.Response:
    response = httpx.get(sidecar.admin_url + "/api/metrics", headers=headers, timeout=10)
    assert response.status_code == 200
    return response


def samples(text: str) -> Samples:
    parsed: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            parsed[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return parsed


def value(parsed: Samples, name: str, **labels: str) -> float | None:
    return parsed.get((name, frozenset(labels.items())))


def run_known_sequence(sidecar: Sidecar) -> None:
    with httpx.Client(base_url=sidecar.url, timeout=10) as client:
        for _ in range(5):
            assert client.get("/echo").status_code == 200
        assert client.post("/echo", content=b"hello").status_code == 200
        for _ in range(3):
            assert client.get("/status/503").status_code == 503
        for _ in range(2):
            assert client.get("/status/404").status_code == 404
        assert client.request("PURGE", "/echo").status_code == 200
        for _ in range(2):  # over the route's 100-byte limit: 413 from an inner layer
            assert client.post("/upload", content=b"x" * 1000).status_code == 413
        for _ in range(2):  # nothing listens there: 502 from the forwarder
            assert client.get("/dead/x").status_code == 502
        assert client.get("/no-route/here").status_code == 404


def test_counts_by_status_histograms_and_error_series_after_known_requests(
    echo_upstream: Upstream, start_sidecar
) -> None:
    sidecar = start_sidecar(metrics_config(echo_upstream.url), wait_ready=True)
    run_known_sequence(sidecar)
    response = scrape(sidecar)
    assert response.headers["content-type"].startswith("text/plain")
    parsed = samples(response.text)

    requests = "http_requests_total"
    assert value(parsed, requests, method="GET", endpoint="/echo", status="200") == 5
    assert value(parsed, requests, method="POST", endpoint="/echo", status="200") == 1
    assert value(parsed, requests, method="_OTHER", endpoint="/echo", status="200") == 1
    assert value(parsed, requests, method="GET", endpoint="/status/{code}", status="503") == 3
    assert value(parsed, requests, method="GET", endpoint="/status/{code}", status="404") == 2
    assert value(parsed, requests, method="POST", endpoint="/upload/*", status="413") == 2
    assert value(parsed, requests, method="GET", endpoint="/dead/*", status="502") == 2
    assert value(parsed, requests, method="GET", endpoint="unmatched", status="404") == 1
    total = sum(v for (name, _), v in parsed.items() if name == requests)
    assert total == 17  # nothing else (no health probes, no admin requests) is counted

    duration = "http_request_duration_seconds"
    get_echo = {"method": "GET", "endpoint": "/echo"}
    assert value(parsed, duration + "_count", **get_echo) == 5
    assert value(parsed, duration + "_bucket", **get_echo, le="+Inf") == 5
    assert 0 < value(parsed, duration + "_sum", **get_echo) < 50  # type: ignore[operator]
    buckets = [
        value(parsed, duration + "_bucket", **get_echo, le=str(le)) for le in LATENCY_BUCKETS
    ]
    assert buckets == sorted(buckets)  # cumulative
    status_route = {"method": "GET", "endpoint": "/status/{code}"}
    assert value(parsed, duration + "_count", **status_route) == 5
    assert value(parsed, duration + "_count", method="GET", endpoint="/dead/*") == 2

    assert value(parsed, "sidecar_requests_in_flight") == 0
    assert value(parsed, "sidecar_draining") == 0
    assert value(parsed, "sidecar_config_reloads_total", result="success") == 0
    assert value(parsed, "sidecar_config_reloads_total", result="error") == 0
    assert value(parsed, "sidecar_event_loop_lag_seconds") is not None
    assert not any(name.endswith("_created") for name, _ in parsed)


def test_process_and_system_metrics_are_exported(echo_upstream: Upstream, start_sidecar) -> None:
    sidecar = start_sidecar(metrics_config(echo_upstream.url))
    parsed = samples(scrape(sidecar).text)
    assert value(parsed, "process_resident_memory_bytes") > 10_000_000  # type: ignore[operator]
    assert value(parsed, "process_open_fds") > 5  # type: ignore[operator]
    assert value(parsed, "process_cpu_seconds_total") > 0  # type: ignore[operator]
    assert value(parsed, "process_max_fds") is not None
    assert value(parsed, "python_gc_objects_collected_total", generation="0") is not None
    assert value(parsed, "sidecar_process_cpu_seconds_total", mode="user") > 0  # type: ignore[operator]
    assert value(parsed, "sidecar_process_cpu_seconds_total", mode="system") is not None
    assert value(parsed, "sidecar_process_threads") >= 1  # type: ignore[operator]
    for period in ("1m", "5m", "15m"):
        assert value(parsed, "sidecar_system_load_average", period=period) >= 0  # type: ignore[operator]
    limit = system.memory_limit_bytes()  # same container as the sidecar
    exported = value(parsed, "sidecar_container_memory_limit_bytes")
    assert exported == (float(limit) if limit is not None else None)
    if limit is not None:
        assert 0 < value(parsed, "sidecar_process_memory_limit_ratio") < 1  # type: ignore[operator]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: run `make test`, it installs prometheus")
    return path


def test_promtool_check_metrics_passes_on_the_output(
    echo_upstream: Upstream, start_sidecar
) -> None:
    sidecar = start_sidecar(metrics_config(echo_upstream.url), wait_ready=True)
    run_known_sequence(sidecar)
    text = scrape(sidecar).text
    result = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""  # no lint findings


def test_openmetrics_is_served_when_accept_asks_for_it(
    echo_upstream: Upstream, start_sidecar
) -> None:
    sidecar = start_sidecar(metrics_config(echo_upstream.url), wait_ready=True)
    run_known_sequence(sidecar)
    response = scrape(sidecar, accept="application/openmetrics-text; version=1.0.0")
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    families = {family.name: family for family in parse_om(response.text)}
    counter = families["http_requests"]
    assert counter.type == "counter"
    got = {
        (s.labels["endpoint"], s.labels["status"]): s.value
        for s in counter.samples
        if s.labels["method"] == "GET"
    }
    assert got[("/status/{code}", "503")] == 3
    assert families["http_request_duration_seconds"].type == "histogram"
    # ?format=openmetrics forces it without the header; unknown formats are refused.
    forced = httpx.get(sidecar.admin_url + "/api/metrics?format=openmetrics")
    assert forced.headers["content-type"].startswith("application/openmetrics-text")
    bad = httpx.get(sidecar.admin_url + "/api/metrics?format=xml")
    assert bad.status_code == 400
    assert bad.headers["content-type"] == "application/problem+json"


def test_json_view_has_counts_error_rates_quantiles_process_and_breakers(
    echo_upstream: Upstream, start_sidecar
) -> None:
    sidecar = start_sidecar(metrics_config(echo_upstream.url), wait_ready=True)
    run_known_sequence(sidecar)
    response = httpx.get(sidecar.admin_url + "/api/metrics?format=json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    doc = response.json()

    status_route = doc["endpoints"]["/status/{code}"]
    assert status_route["requests"] == 5
    assert status_route["by_status"] == {"404": 2, "503": 3}
    assert status_route["errors"] == 3 and status_route["error_rate"] == 0.6
    assert status_route["client_errors"] == 2 and status_route["client_error_rate"] == 0.4
    echo = doc["endpoints"]["/echo"]
    assert echo["by_method"] == {"GET": 5, "POST": 1, "_OTHER": 1}
    assert echo["error_rate"] == 0.0
    latency = echo["latency_ms"]
    assert latency["count"] == 7
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p95"] <= latency["p99"]
    assert latency["p99"] <= latency["max"]
    assert doc["endpoints"]["/dead/*"]["by_status"] == {"502": 2}
    assert doc["endpoints"]["/upload/*"]["by_status"] == {"413": 2}

    totals = doc["requests"]
    assert totals["requests"] == 17
    assert totals["errors"] == 5  # 3 x 503 + 2 x 502
    assert totals["error_rate"] == round(5 / 17, 6)
    assert totals["client_errors"] == 5  # 2 x 404 (status route) + 2 x 413 + 1 unmatched 404
    assert totals["latency_ms"]["count"] == 17
    assert totals["in_flight"] == 0
    assert doc["quantiles"]["relative_accuracy"] == 0.01

    process = doc["process"]
    assert process["memory"]["rss_bytes"] > 10_000_000
    assert process["cpu"]["user_seconds"] > 0
    assert process["cpu"]["percent"] >= 0
    assert process["threads"] >= 1 and process["open_fds"] > 5
    assert set(doc["system"]["load_average"]) == {"1m", "5m", "15m"}
    assert doc["system"]["memory_total_bytes"] > 0
    assert doc["event_loop"]["lag_seconds"] is not None

    app = doc["upstreams"]["app"]["endpoints"][0]
    assert app["url"] == echo_upstream.url
    assert app["healthy"] is True
    assert app["circuit_breaker"] in ("closed", "half_open", "open")
    assert doc["upstreams"]["dead"]["endpoints"][0]["healthy"] is None  # not health-checked


def test_config_reloads_are_counted_by_result(echo_upstream: Upstream, start_sidecar) -> None:
    sidecar = start_sidecar(metrics_config(echo_upstream.url), wait_ready=True)

    def reloads(result: str) -> float | None:
        return value(samples(scrape(sidecar).text), "sidecar_config_reloads_total", result=result)

    sidecar.signal(signal.SIGHUP)  # same, valid file
    deadline = time.monotonic() + 10
    while reloads("success") != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reloads("success") == 1
    sidecar.config_path.write_text("routes: [{upstrem: app}]\n")  # invalid: rejected
    sidecar.signal(signal.SIGHUP)
    while reloads("error") != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reloads("error") == 1
    assert reloads("success") == 1


UNKNOWN_METHODS = ("PURGE", "PROPFIND", "MKCOL", "LINK", "REPORT", "SEARCH")


async def drive_random_requests(port: int, total: int, connections: int = 16) -> dict[int, int]:
    """``total`` requests to random paths (and some unknown methods) over keep-alive sockets."""
    statuses: dict[int, int] = {}
    rng = random.Random(5)
    plan = []
    for _ in range(total):
        token = uuid.UUID(int=rng.getrandbits(128)).hex
        path = rng.choice((f"/api/{token}", f"/items/{token}", f"/{token}/{rng.random()}"))
        method = rng.choice(UNKNOWN_METHODS) if rng.random() < 0.2 else "GET"
        plan.append(f"{method} {path}?q={token} HTTP/1.1\r\nHost: t\r\n\r\n".encode())

    async def worker(requests: list[bytes]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for request in requests:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, val = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(val)
                await reader.readexactly(length)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(worker(plan[i::connections]) for i in range(connections)))
    return statuses


def test_ten_thousand_random_paths_leave_the_series_count_bounded(
    echo_upstream: Upstream, start_sidecar
) -> None:
    sidecar = start_sidecar(metrics_config(echo_upstream.url), wait_ready=True)
    started = time.monotonic()
    statuses = asyncio.run(drive_random_requests(sidecar.port, 10_000))
    elapsed = time.monotonic() - started
    print(f"\n10,000 random-path requests through the sidecar in {elapsed:.1f} s")
    assert sum(statuses.values()) == 10_000

    text = scrape(sidecar).text
    parsed = samples(text)
    request_series = [dict(labels) for (name, labels) in parsed if name == "http_requests_total"]
    assert sum(v for (name, _), v in parsed.items() if name == "http_requests_total") == 10_000
    assert {s["endpoint"] for s in request_series} <= {"/api/*", "/items/{id}", "unmatched"}
    assert {s["method"] for s in request_series} <= {"GET", "_OTHER"}
    # 3 endpoints x 2 methods x the statuses the upstream gives (200 for /api/*, 404 else).
    assert len(request_series) <= 3 * 2 * 2
    histogram_series = {
        labels for (name, labels) in parsed if name == "http_request_duration_seconds_count"
    }
    assert len(histogram_series) <= 3 * 2
    assert len(text) < 64 * 1024  # the whole exposition stays small

    doc = httpx.get(sidecar.admin_url + "/api/metrics?format=json").json()
    assert set(doc["endpoints"]) <= {"/api/*", "/items/{id}", "unmatched"}
    assert doc["requests"]["requests"] == 10_000
