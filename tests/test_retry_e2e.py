"""Retries end to end: a real sidecar in front of the fault-injecting echo upstream.

Each test isolates its upstream counters with a unique ``X-Test-Key``; the breaker is off
here (5xx storms on purpose), its behaviour is in tests/test_circuit_breaker_e2e.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from tests.conftest import basic_config
from tests.support.processes import Sidecar, Upstream, free_port, upstream_calls
from tests.support.processes import sidecar_metric as metric

FAST = {"base_delay": "5ms", "max_delay": "20ms"}


def key() -> str:
    return uuid.uuid4().hex


def route(prefix: str, retry: dict, methods: list[str] | None = None) -> dict:
    match: dict = {"path_prefix": prefix}
    if methods:
        match["methods"] = methods
    return {"name": prefix, "match": match, "upstream": "app", "retry": retry}


@pytest.fixture(scope="module")
def sidecar(echo_upstream: Upstream, tmp_path_factory: pytest.TempPathFactory):
    """One sidecar, one route per retry policy under test."""
    config = basic_config(echo_upstream.url)
    config["upstreams"]["app"]["circuit_breaker"] = {"enabled": False}
    config["upstreams"]["app"]["retry"] = {"max_attempts": 3, **FAST}
    config["routes"] = [
        route("/echo/deadline", {"max_attempts": 10, "base_delay": "300ms", "max_delay": "1s",
                                 "timeout": "1s"}),
        route("/echo/budget", {"max_attempts": 3, "base_delay": "1ms", "max_delay": "2ms",
                               "budget": {"ratio": 0.2, "min_per_second": 1, "window": "2s"}}),
        route("/echo/buffer", {"max_attempts": 3, **FAST, "max_buffered_body": "1KiB"}),
        route("/slow", {"max_attempts": 5, **FAST, "per_try_timeout": "400ms", "timeout": "1s",
                        "retry_on": ["timeout"]}),
        route("/retry-after", {"max_attempts": 2, "base_delay": "10ms", "max_delay": "2s",
                               "timeout": "5s"}),
        route("/echo/short", {"max_attempts": 2, **FAST, "timeout": "1s",
                              "retry_on": ["503"]}),
        {"name": "keyed", "match": {"path_prefix": "/flaky", "methods": ["POST"]},
         "upstream": "app", "idempotency": {"enabled": True}},
    ]  # fmt: skip
    running = Sidecar(config, tmp_path_factory.mktemp("retry")).start(wait_ready=True)
    yield running
    running.stop()


def test_every_get_succeeds_against_an_upstream_failing_two_of_three(
    sidecar: Sidecar, echo_upstream: Upstream
) -> None:
    test_key = key()
    retries_before = metric(sidecar, "sidecar_retries_total", upstream="app", reason="503")
    with httpx.Client(headers={"X-Test-Key": test_key}) as client:
        for _ in range(10):
            response = client.get(sidecar.url + "/flaky?fail=2&of=3&status=503")
            assert response.status_code == 200
            assert response.json()["ok"] is True
    assert upstream_calls(echo_upstream, "GET", "/flaky", test_key) == 30  # 3 attempts each
    retries = metric(sidecar, "sidecar_retries_total", upstream="app", reason="503")
    assert retries - retries_before == 20
    assert "retrying GET /flaky?fail=2&of=3&status=503: attempt 2 of 3 failed with 503" in (
        sidecar.output()
    )


def test_post_without_idempotency_key_to_a_503_upstream_is_attempted_once(
    sidecar: Sidecar, echo_upstream: Upstream
) -> None:
    test_key = key()
    denied_before = metric(sidecar, "sidecar_retries_denied_total", reason="unsafe")
    response = httpx.post(
        sidecar.url + "/status/503", content=b'{"order": 1}', headers={"X-Test-Key": test_key}
    )
    assert response.status_code == 503
    assert response.json() == {"status": 503}  # the upstream's own answer
    assert upstream_calls(echo_upstream, "POST", "/status/503", test_key) == 1
    response = httpx.post(
        sidecar.url + "/flaky?fail=1&of=2", content=b"{}", headers={"X-Test-Key": test_key}
    )
    assert response.status_code == 503
    assert upstream_calls(echo_upstream, "POST", "/flaky", test_key) == 1
    assert metric(sidecar, "sidecar_retries_denied_total", reason="unsafe") - denied_before == 2
    # The same failure on a GET is retried.
    httpx.get(sidecar.url + "/status/503", headers={"X-Test-Key": test_key})
    assert upstream_calls(echo_upstream, "GET", "/status/503", test_key) == 3


def test_post_whose_idempotency_key_the_sidecar_holds_is_retried(
    sidecar: Sidecar, echo_upstream: Upstream
) -> None:
    """The idempotency layer guarantees one execution per key, so the retry is safe."""
    test_key = key()
    headers = {"X-Test-Key": test_key, "Idempotency-Key": key()}
    response = httpx.post(sidecar.url + "/flaky?fail=1&of=2", content=b"{}", headers=headers)
    assert response.status_code == 200
    assert upstream_calls(echo_upstream, "POST", "/flaky", test_key) == 2
    # Without a key the same 503 goes back to the client after one attempt.
    response = httpx.post(
        sidecar.url + "/flaky?fail=1&of=2", content=b"{}", headers={"X-Test-Key": test_key}
    )
    assert response.status_code == 503
    assert upstream_calls(echo_upstream, "POST", "/flaky", test_key) == 3


def test_post_is_retried_on_another_endpoint_when_the_connection_failed(
    echo_upstream: Upstream, start_sidecar
) -> None:
    """Connection refused proves the upstream saw nothing: even a POST moves on."""
    dead = f"http://127.0.0.1:{free_port()}"
    config = basic_config([dead, echo_upstream.url])
    app = config["upstreams"]["app"]
    app["health_check"] = {"enabled": False}
    app["circuit_breaker"] = {"enabled": False}  # keep sending to the dead one
    app["retry"] = FAST
    sidecar = start_sidecar(config)
    test_key = key()
    with httpx.Client(headers={"X-Test-Key": test_key}) as client:
        for n in range(6):
            response = client.post(sidecar.url + "/echo", content=f'{{"n": {n}}}'.encode())
            assert response.status_code == 200
    assert upstream_calls(echo_upstream, "POST", "/echo", test_key) == 6  # never twice
    assert metric(sidecar, "sidecar_retries_total", reason="connect-failure") == 3


def test_large_bodies_are_not_buffered_and_so_sent_once(
    sidecar: Sidecar, echo_upstream: Upstream
) -> None:
    test_key = key()
    headers = {"X-Test-Key": test_key}
    small = httpx.put(sidecar.url + "/echo/buffer?status=503", content=b"x" * 500, headers=headers)
    assert small.status_code == 503
    assert upstream_calls(echo_upstream, "PUT", "/echo/buffer", test_key) == 3
    large = httpx.put(sidecar.url + "/echo/buffer?status=503", content=b"x" * 5000, headers=headers)
    assert large.status_code == 503
    assert large.json()["body_size"] == 5000
    assert upstream_calls(echo_upstream, "PUT", "/echo/buffer", test_key) == 4  # one more


def test_overall_timeout_bounds_the_total_time_including_backoffs(
    sidecar: Sidecar, echo_upstream: Upstream
) -> None:
    test_key = key()
    started = time.monotonic()
    response = httpx.get(
        sidecar.url + "/echo/deadline?status=503", headers={"X-Test-Key": test_key}, timeout=10
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 503
    attempts = upstream_calls(echo_upstream, "GET", "/echo/deadline", test_key)
    print(f"\n10 attempts allowed, 1s timeout: {attempts} attempts in {elapsed:.3f}s")
    assert 2 <= attempts < 10
    assert elapsed < 1.0 + 0.5  # the bound, plus scheduling slack on a busy box


def test_per_try_timeout_cuts_each_attempt_and_the_overall_timeout_cuts_the_last(
    sidecar: Sidecar, echo_upstream: Upstream
) -> None:
    """/slow: per try 400 ms, overall 1 s, timeouts retried, 5 attempts allowed."""
    test_key = key()
    assert httpx.get(sidecar.url + "/slow?delay=0.05").status_code == 200  # fast enough
    started = time.monotonic()
    response = httpx.get(sidecar.url + "/slow?delay=5", headers={"X-Test-Key": test_key})
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert response.json()["type"].endswith("upstream-timeout")
    attempts = upstream_calls(echo_upstream, "GET", "/slow", test_key)
    print(f"\nhanging upstream: {attempts} attempts, 504 after {elapsed:.3f}s")
    assert 2 <= attempts <= 3  # 400 ms + 400 ms + what is left of the second
    assert 0.9 <= elapsed < 1.0 + 0.5


def test_retry_after_is_honoured(sidecar: Sidecar, echo_upstream: Upstream) -> None:
    test_key = key()
    started = time.monotonic()
    response = httpx.get(
        sidecar.url + "/retry-after?seconds=2&fail=1",
        headers={"X-Test-Key": test_key},
        timeout=10,
    )
    elapsed = time.monotonic() - started
    print(f"\nRetry-After: 2 -> answered after {elapsed:.3f}s")
    assert response.status_code == 200
    assert elapsed >= 2.0  # not one moment sooner
    assert elapsed < 2.0 + 1.0
    assert upstream_calls(echo_upstream, "GET", "/retry-after", test_key) == 2


def test_retry_after_beyond_the_overall_timeout_returns_the_answer_at_once(
    sidecar: Sidecar, echo_upstream: Upstream
) -> None:
    test_key = key()
    started = time.monotonic()
    response = httpx.get(
        sidecar.url + "/retry-after?seconds=7&fail=1", headers={"X-Test-Key": test_key}
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"  # the client learns when to come back
    assert elapsed < 1.0
    assert upstream_calls(echo_upstream, "GET", "/retry-after", test_key) == 1


async def test_retry_budget_holds_under_steady_total_failure(
    sidecar: Sidecar, echo_upstream: Upstream
) -> None:
    """100% 503 at ~100 requests/s: 3 attempts each would triple the load; the budget
    (ratio 0.2, min 1/s, window 2 s) keeps it within 1.2x plus the floor."""
    test_key = key()
    ratio, floor, window = 0.2, 1.0, 2.0
    rate, duration = 100.0, 3.0
    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(headers={"X-Test-Key": test_key}, limits=limits) as client:

        async def one() -> int:
            response = await client.get(sidecar.url + "/echo/budget?status=503", timeout=10)
            return response.status_code

        tasks = []
        started = time.monotonic()
        for n in range(int(rate * duration)):
            delay = started + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        statuses = await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
    requests = len(statuses)
    assert statuses == [503] * requests
    attempts = upstream_calls(echo_upstream, "GET", "/echo/budget", test_key)
    bound = requests * (1 + ratio) + floor * (elapsed + window)
    print(
        f"\nbudget: {requests} client requests in {elapsed:.2f}s -> {attempts} upstream "
        f"attempts ({attempts / requests:.3f}x; bound {bound:.0f} = {bound / requests:.3f}x; "
        f"without a budget {3 * requests})"
    )
    assert attempts <= bound
    assert attempts > requests  # retries did happen, within the budget
    denied = metric(sidecar, "sidecar_retries_denied_total", upstream="app", reason="budget")
    assert denied > 0


def test_route_retry_overrides_the_upstreams(sidecar: Sidecar, echo_upstream: Upstream) -> None:
    test_key = key()
    httpx.get(sidecar.url + "/echo/short?status=503", headers={"X-Test-Key": test_key})
    assert upstream_calls(echo_upstream, "GET", "/echo/short", test_key) == 2  # route: 2
    httpx.get(sidecar.url + "/echo/other?status=503", headers={"X-Test-Key": test_key})
    assert upstream_calls(echo_upstream, "GET", "/echo/other", test_key) == 3  # upstream: 3
    httpx.get(sidecar.url + "/echo/short?status=502", headers={"X-Test-Key": test_key})
    assert upstream_calls(echo_upstream, "GET", "/echo/short", test_key) == 3  # 502 not listed
