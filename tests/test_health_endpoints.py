"""``/api/live``, ``/api/ready`` and ``/api/health`` of real sidecar processes in front of
real upstreams and a real redis-server: dependencies going away and coming back, a hanging
upstream health path, configurable critical checks and ``?include=``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.conftest import basic_config
from tests.support.processes import RedisServer, Sidecar, Upstream, free_port, poll

HEALTH_JSON = "application/health+json"


def get(sidecar: Sidecar, path: str, client: httpx.Client | None = None) -> httpx.Response:
    return (client or httpx).get(sidecar.admin_url + path, timeout=5)


def entry(document: dict, key: str) -> dict:
    (only,) = document["checks"][key]
    return only


def config_for(url: str, interval: str = "200ms", timeout: str = "500ms", **extra: Any) -> dict:
    config = basic_config(url, **extra)
    config["upstreams"]["app"]["health_check"] = {
        "path": "/healthz",
        "interval": interval,
        "timeout": timeout,
    }
    return config


def test_upstream_down_fails_ready_and_health_but_not_live_then_recovers_within_one_interval(
    start_sidecar: Callable[..., Sidecar],
) -> None:
    port = free_port()
    upstream = Upstream(port=port).start()
    interval = 1.0
    try:
        sidecar = start_sidecar(config_for(upstream.url, interval="1s"), wait_ready=True)
        upstream.stop()
        poll(lambda: get(sidecar, "/api/ready").status_code == 503, interval + 5, "unready")

        live = get(sidecar, "/api/live")
        assert live.status_code == 200 and live.json()["status"] == "pass"

        ready = get(sidecar, "/api/ready")
        assert ready.status_code == 503
        assert ready.headers["content-type"] == HEALTH_JSON
        assert "upstream:app" in ready.json()["checks"]
        assert "upstream:app" in ready.json()["output"]

        health = get(sidecar, "/api/health")
        assert health.status_code == 503 and health.headers["content-type"] == HEALTH_JSON
        document = health.json()
        assert document["status"] == "fail"
        failing = entry(document, "upstream:app")
        assert failing["status"] == "fail" and failing["critical"] is True
        assert failing["componentId"] == upstream.url
        assert f"GET {upstream.url}/healthz could not connect" in failing["output"]
        assert failing["observedUnit"] == "ms" and failing["threshold"] == {"fail": 500.0}
        assert failing["time"].endswith("Z") and failing["durationMs"] >= 0
        assert "upstream:app" in document["output"]

        upstream = Upstream(port=port).start()  # same port, same sidecar process
        back = time.monotonic()
        poll(lambda: get(sidecar, "/api/ready").status_code == 200, 10, "ready again", 0.02)
        recovered = time.monotonic() - back
        print(f"ready again {recovered * 1000:.0f} ms after the upstream came back")
        # Within one probe interval; +1 s only for polling and a loaded 2-core box.
        assert recovered < interval + 1.0
        assert entry(get(sidecar, "/api/health").json(), "upstream:app")["status"] == "pass"
        assert sidecar.proc is not None and sidecar.proc.poll() is None  # never restarted
    finally:
        upstream.stop()


def test_not_ready_while_starting_until_the_first_probe_passes(
    start_sidecar: Callable[..., Sidecar],
) -> None:
    port = free_port()
    sidecar = start_sidecar(config_for(f"http://127.0.0.1:{port}"))
    ready = poll(
        lambda: (
            (r := get(sidecar, "/api/ready")).status_code == 503
            and "upstream:app" in r.json()["checks"]
            and r
        ),
        5,
        "unready naming the upstream",
    ).json()
    assert ready["lifecycle"] == "starting"
    assert "lifecycle:starting" in ready["checks"]
    assert get(sidecar, "/api/live").status_code == 200
    upstream = Upstream(port=port).start()
    try:
        sidecar.wait_ready(timeout=10)
        assert get(sidecar, "/api/ready").json() == {"status": "pass", "lifecycle": "serving"}
    finally:
        upstream.stop()


def test_redis_down_fails_the_store_check_while_live_stays_up(
    start_sidecar: Callable[..., Sidecar], echo_upstream: Upstream, own_redis: RedisServer
) -> None:
    config = config_for(
        echo_upstream.url,
        store={"backend": "redis", "url": own_redis.url, "timeout": "250ms"},
        health={"interval": "200ms"},
    )
    sidecar = start_sidecar(config, wait_ready=True)
    store = poll(
        lambda: (
            entry(get(sidecar, "/api/health").json(), "store:redis")["status"] == "pass"
            and get(sidecar, "/api/health?include=store").json()
        ),
        5,
        "store passing",
    )
    assert entry(store, "store:redis")["componentId"] == own_redis.url
    assert entry(store, "store:redis")["observedUnit"] == "ms"

    own_redis.kill()
    health = poll(
        lambda: (r := get(sidecar, "/api/health")).status_code == 503 and r,
        5,
        "health failing on the store",
    )
    failing = entry(health.json(), "store:redis")
    assert failing["status"] == "fail" and "PING" in failing["output"]
    assert get(sidecar, "/api/live").status_code == 200
    ready = get(sidecar, "/api/ready")
    assert ready.status_code == 503 and "store:redis" in ready.json()["checks"]

    own_redis.start()  # same port: the sidecar's client reconnects by itself
    poll(lambda: get(sidecar, "/api/ready").status_code == 200, 5, "ready after Redis is back")
    assert entry(get(sidecar, "/api/health").json(), "store:redis")["status"] == "pass"


def test_health_endpoints_answer_within_50ms_while_the_upstream_health_path_hangs(
    start_sidecar: Callable[..., Sidecar],
) -> None:
    upstream = Upstream().start()  # our own: its /healthz will hang
    try:
        config = config_for(upstream.url, interval="500ms", timeout="2s")
        sidecar = start_sidecar(config, wait_ready=True)
        httpx.post(upstream.url + "/admin/health?delay=10", timeout=5)

        def timed_out() -> bool:
            check = entry(get(sidecar, "/api/health").json(), "upstream:app")
            return check["status"] == "fail" and "timed out after 2000 ms" in check["output"]

        poll(timed_out, 10, "failing on the probe timeout")
        # Probes are back to back now (timeout > interval): one always hangs.
        medians = {}
        with httpx.Client() as client:
            for path, status in (("/api/live", 200), ("/api/ready", 503), ("/api/health", 503)):
                times = []
                for _ in range(15):
                    start = time.perf_counter()
                    response = get(sidecar, path, client)
                    times.append(time.perf_counter() - start)
                    assert response.status_code == status
                medians[path] = statistics.median(times)
        print({path: f"{value * 1000:.1f} ms" for path, value in medians.items()})
        for path, value in medians.items():
            assert value < 0.050, f"{path} took {value * 1000:.1f} ms (median)"
    finally:
        upstream.stop()


def test_a_check_outside_health_critical_only_warns_and_include_narrows(
    start_sidecar: Callable[..., Sidecar],
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    sidecar = start_sidecar(config_for(dead, health={"critical": ["store"]}))
    poll(
        lambda: entry(get(sidecar, "/api/health").json(), "upstream:app")["status"] == "fail",
        5,
        "upstream failing",
    )
    health = get(sidecar, "/api/health")
    assert health.status_code == 200 and health.json()["status"] == "warn"
    assert entry(health.json(), "upstream:app")["critical"] is False
    assert get(sidecar, "/api/ready").status_code == 200

    narrowed = get(sidecar, "/api/health?include=store,system").json()
    assert set(narrowed["checks"]) == {
        "store:memory",
        "system:memory",
        "system:event_loop_lag",
        "system:cpu",
    }
    only_upstream = get(sidecar, "/api/health?include=upstream").json()
    assert list(only_upstream["checks"]) == ["upstream:app"]
    bad = get(sidecar, "/api/health?include=upstreams")
    assert bad.status_code == 400 and bad.headers["content-type"] == "application/problem+json"
    assert "upstreams" in bad.json()["detail"]


def test_open_circuit_breaker_shows_in_health_without_failing_readiness(
    start_sidecar: Callable[..., Sidecar], echo_upstream: Upstream
) -> None:
    config = config_for(echo_upstream.url)
    config["upstreams"]["app"]["circuit_breaker"] = {"failure_threshold": 2, "open_timeout": "60s"}
    config["upstreams"]["app"]["retry"] = {"max_attempts": 1}
    sidecar = start_sidecar(config, wait_ready=True)
    for _ in range(3):
        httpx.get(sidecar.url + "/status/503", timeout=5)
    health = get(sidecar, "/api/health")
    breaker = entry(health.json(), "circuit_breakers:app")
    # Every endpoint of a critical upstream is open: the breaker check fails, but it is
    # informational by default (health.critical), so it only makes the whole `warn`.
    assert breaker["status"] == "fail" and breaker["critical"] is False
    assert breaker["observedValue"] == "open" and breaker["breaker"]["state"] == "open"
    upstream = entry(health.json(), "upstream:app")
    assert upstream["status"] == "warn" and "circuit open" in upstream["output"]
    # The active probe still passes, so the pod stays ready; health says warn.
    assert health.status_code == 200 and health.json()["status"] == "warn"
    assert get(sidecar, "/api/ready").status_code == 200
