"""Circuit breaking end to end: a real sidecar, an upstream that dies and comes back."""

from __future__ import annotations

import asyncio
import http.client
import statistics
import time
import uuid

import httpx

from tests.conftest import basic_config
from tests.support.processes import Sidecar, Upstream, free_port, upstream_calls
from tests.support.processes import sidecar_metric as metric


def timed_gets(sidecar: Sidecar, path: str, count: int) -> list[tuple[int, float, str | None]]:
    """(status, seconds, Retry-After) of ``count`` GETs on one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=5)
    results = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            results.append(
                (response.status, time.perf_counter() - started, response.getheader("retry-after"))
            )
    finally:
        conn.close()
    return results


def breaker_config(upstream_url: str, **breaker: object) -> dict:
    config = basic_config(upstream_url)
    app = config["upstreams"]["app"]
    app["retry"] = {"max_attempts": 1}
    app["circuit_breaker"] = breaker
    config["routes"] = [{"name": "breaker", "match": {"path_prefix": "/"}, "upstream": "app"}]
    return config


def burst(url: str, count: int, test_key: str) -> list[int]:
    """Statuses of ``count`` concurrent GETs."""

    async def run() -> list[int]:
        async with httpx.AsyncClient(headers={"X-Test-Key": test_key}, timeout=10) as client:
            responses = await asyncio.gather(*(client.get(url) for _ in range(count)))
        return [response.status_code for response in responses]

    return asyncio.run(run())


def test_down_upstream_opens_the_circuit_fails_fast_then_probes_and_recovers(
    start_sidecar,
) -> None:
    upstream = Upstream().start()
    try:
        _lifecycle(upstream, start_sidecar)
    finally:
        upstream.kill()


def _lifecycle(upstream: Upstream, start_sidecar) -> None:
    config = breaker_config(
        upstream.url,
        failure_threshold=3,
        success_threshold=2,
        open_timeout="3s",
        half_open_max_requests=2,
    )
    sidecar = start_sidecar(config, wait_ready=True)
    assert httpx.get(sidecar.url + "/echo").status_code == 200
    upstream.kill()

    # failure_threshold failures reach the (dead) upstream...
    for _ in range(3):
        response = httpx.get(sidecar.url + "/echo")
        assert response.status_code == 502
        assert response.json()["type"].endswith("upstream-unreachable")
    sent = metric(sidecar, "sidecar_upstream_requests_total", upstream="app")

    # ...then the circuit is open: 503 problem with Retry-After, fast, nothing sent.
    response = httpx.get(sidecar.url + "/echo")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("circuit-open")
    assert 1 <= int(response.headers["retry-after"]) <= 3
    fast_before = metric(
        sidecar, "http_request_duration_seconds_bucket", endpoint="breaker", le="0.005"
    )
    all_before = metric(sidecar, "http_request_duration_seconds_count", endpoint="breaker")
    results = timed_gets(sidecar, "/echo", 20)
    assert {status for status, _, _ in results} == {503}
    assert all(retry_after in ("1", "2", "3") for _, _, retry_after in results)
    client_median = statistics.median(seconds for _, seconds, _ in results)
    fast = metric(sidecar, "http_request_duration_seconds_bucket", endpoint="breaker", le="0.005")
    total = metric(sidecar, "http_request_duration_seconds_count", endpoint="breaker")
    print(
        f"\ncircuit open: client-side median {client_median * 1000:.2f} ms, max "
        f"{max(s for _, s, _ in results) * 1000:.2f} ms; server-side "
        f"{fast - fast_before:.0f}/{total - all_before:.0f} under 5 ms"
    )
    assert client_median < 0.005
    assert total - all_before <= 20
    assert fast - fast_before >= 18  # server side, 90% of them within 5 ms
    assert metric(sidecar, "sidecar_upstream_requests_total", upstream="app") == sent
    assert metric(sidecar, "sidecar_circuit_breaker_rejections_total", upstream="app") >= 21
    health = httpx.get(sidecar.admin_url + "/api/health?include=circuit_breakers").json()
    (breaker,) = health["checks"]["circuit_breakers:app"]
    assert breaker["observedValue"] == "open"
    assert breaker["breaker"]["state"] == "open"
    assert breaker["breaker"]["failures"] == 3
    assert 1 <= breaker["breaker"]["retry_after"] <= 3

    # The upstream comes back while the circuit is open: it still sees nothing.
    revived = Upstream(port=upstream.port).start()
    try:
        test_key = uuid.uuid4().hex
        with httpx.Client(headers={"X-Test-Key": test_key}) as client:
            for _ in range(10):
                response = client.get(sidecar.url + "/echo")
                assert response.status_code == 503
        assert upstream_calls(revived, "GET", "/echo", test_key) == 0
        wait = int(response.headers["retry-after"])

        # After open_timeout: half-open admits at most half_open_max_requests probes.
        time.sleep(wait + 0.2)
        statuses = sorted(burst(sidecar.url + "/slow?delay=1.5", 10, test_key))
        assert statuses == [200, 200] + [503] * 8
        assert upstream_calls(revived, "GET", "/slow", test_key) == 2

        # Two successful probes (success_threshold) closed it: traffic flows again.
        for _ in range(5):
            assert httpx.get(sidecar.url + "/echo").status_code == 200
        state = metric(sidecar, "sidecar_circuit_breaker_state", upstream="app")
        assert state == 0
        for old, new in (("closed", "open"), ("open", "half_open"), ("half_open", "closed")):
            count = metric(
                sidecar,
                "sidecar_circuit_breaker_transitions_total",
                upstream="app",
                from_state=old,
                to_state=new,
            )
            assert count == 1, (old, new)
        log = sidecar.output()
        assert "closed -> open (3 consecutive failures)" in log
        assert "open -> half_open" in log
        assert "half_open -> closed" in log
    finally:
        revived.kill()


def test_hung_half_open_probe_times_out_and_reopens_the_circuit(
    echo_upstream: Upstream, start_sidecar
) -> None:
    config = breaker_config(
        echo_upstream.url,
        failure_threshold=1,
        success_threshold=1,
        open_timeout="1s",
        half_open_max_requests=1,
        failure_on=["timeout", "5xx"],
    )
    config["upstreams"]["app"]["retry"] = {"max_attempts": 1, "per_try_timeout": "300ms"}
    sidecar = start_sidecar(config)
    assert httpx.get(sidecar.url + "/slow?delay=3").status_code == 504
    assert httpx.get(sidecar.url + "/echo").status_code == 503  # open
    time.sleep(1.2)
    started = time.monotonic()
    probe = httpx.get(sidecar.url + "/slow?delay=3")  # the only probe hangs...
    assert probe.status_code == 504
    assert time.monotonic() - started < 1.5  # ...until its per-try timeout
    after = httpx.get(sidecar.url + "/echo")
    assert after.status_code == 503  # re-opened, not stuck half-open
    assert after.json()["type"].endswith("circuit-open")
    assert "half_open -> open (a half-open probe failed)" in sidecar.output()
    time.sleep(1.2)
    assert httpx.get(sidecar.url + "/echo").status_code == 200  # a good probe closes it
    assert httpx.get(sidecar.url + "/echo").status_code == 200


def test_failing_endpoint_is_ejected_and_retries_go_to_the_healthy_one(
    echo_upstream: Upstream, start_sidecar
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = basic_config([dead, echo_upstream.url])
    app = config["upstreams"]["app"]
    app["health_check"] = {"enabled": False}
    app["retry"] = {"base_delay": "5ms", "max_delay": "20ms"}
    app["circuit_breaker"] = {"failure_threshold": 2, "open_timeout": "60s"}
    sidecar = start_sidecar(config)
    test_key = uuid.uuid4().hex
    with httpx.Client(headers={"X-Test-Key": test_key}) as client:
        for _ in range(10):
            assert client.get(sidecar.url + "/echo").status_code == 200
    assert upstream_calls(echo_upstream, "GET", "/echo", test_key) == 10
    # Two connect failures opened the dead endpoint's circuit; since then it gets nothing.
    failures = metric(
        sidecar, "sidecar_upstream_requests_total", upstream="app", outcome="connect-failure"
    )
    assert failures == 2
    assert metric(sidecar, "sidecar_circuit_breaker_state", endpoint=dead) == 2
    assert metric(sidecar, "sidecar_circuit_breaker_state", endpoint=echo_upstream.url) == 0
    assert metric(sidecar, "sidecar_retries_total", upstream="app", reason="connect-failure") == 2


def test_failure_ratio_mode_opens_on_an_alternating_failure_pattern(
    echo_upstream: Upstream, start_sidecar
) -> None:
    config = breaker_config(
        echo_upstream.url,
        failure_threshold=None,
        failure_ratio=0.5,
        min_requests=6,
        window="30s",
        open_timeout="30s",
    )
    sidecar = start_sidecar(config)
    test_key = uuid.uuid4().hex
    with httpx.Client(headers={"X-Test-Key": test_key}) as client:
        statuses = [
            client.get(sidecar.url + "/flaky?fail=1&of=2&status=500").status_code for _ in range(8)
        ]
    assert statuses == [500, 200] * 3 + [503, 503]  # open once 3 of 6 failed
    assert upstream_calls(echo_upstream, "GET", "/flaky", test_key) == 6
