"""Graceful shutdown of a real sidecar process: SIGTERM/SIGINT fail readiness at once, keep
serving for ``drain_delay`` with ``Connection: close``, then stop accepting, let in-flight
requests finish until ``drain_timeout`` after the signal, and exit 0."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import basic_config
from tests.support.processes import Sidecar, Upstream, free_port, poll


def drain_config(upstream_url: str, delay: str, timeout: str, **extra: Any) -> dict:
    return basic_config(
        upstream_url, shutdown={"drain_delay": delay, "drain_timeout": timeout}, **extra
    )


def start_slow(
    pool: ThreadPoolExecutor, sidecar: Sidecar, upstream: Upstream, delay: float
) -> Future[httpx.Response]:
    """A proxied ``/slow`` request, returned once the upstream is working on it."""
    key = uuid.uuid4().hex
    future = pool.submit(
        httpx.get, f"{sidecar.url}/slow?delay={delay}", headers={"x-test-key": key}, timeout=30
    )

    def upstream_has_it() -> bool:
        calls = httpx.get(upstream.url + "/stats", timeout=5).json()["calls"]
        return calls.get(f"GET /slow {key}", 0) == 1

    poll(upstream_has_it, 10, "in flight at the upstream")
    return future


def ready_status(sidecar: Sidecar) -> int:
    return httpx.get(sidecar.admin_url + "/api/ready", timeout=5).status_code


def test_sigterm_during_a_2s_request_lets_it_finish_fails_readiness_and_exits_0(
    start_sidecar: Callable[..., Sidecar], echo_upstream: Upstream
) -> None:
    drain_timeout = 8.0
    sidecar = start_sidecar(drain_config(echo_upstream.url, "1s", "8s"), wait_ready=True)
    with ThreadPoolExecutor(2) as pool:
        slow = start_slow(pool, sidecar, echo_upstream, 2)
        signalled = time.monotonic()
        sidecar.signal(signal.SIGTERM)

        poll(lambda: ready_status(sidecar) == 503, 1, "unready right after SIGTERM")
        ready = httpx.get(sidecar.admin_url + "/api/ready", timeout=5).json()
        assert ready["lifecycle"] == "draining" and "lifecycle:draining" in ready["checks"]
        assert httpx.get(sidecar.admin_url + "/api/live", timeout=5).status_code == 200

        # Still serving new requests during drain_delay, telling clients to reconnect.
        new = httpx.get(sidecar.url + "/echo", timeout=5)
        assert new.status_code == 200 and new.headers["connection"] == "close"

        response = slow.result(timeout=15)
        assert response.status_code == 200 and response.json() == {"slow": True}
        assert response.headers["connection"] == "close"  # answered while draining

        assert sidecar.wait(timeout=drain_timeout + 5) == 0
        exited = time.monotonic() - signalled
    print(f"exited {exited:.2f}s after SIGTERM (drain_timeout {drain_timeout:g}s)")
    assert exited < drain_timeout
    assert "drained in" in sidecar.output()


def test_after_drain_delay_new_connections_are_refused_while_in_flight_ones_finish(
    start_sidecar: Callable[..., Sidecar], echo_upstream: Upstream
) -> None:
    sidecar = start_sidecar(drain_config(echo_upstream.url, "500ms", "10s"), wait_ready=True)
    with ThreadPoolExecutor(2) as pool:
        slow = start_slow(pool, sidecar, echo_upstream, 4)
        signalled = time.monotonic()
        sidecar.signal(signal.SIGTERM)
        time.sleep(max(0.0, signalled + 1.5 - time.monotonic()))
        assert not slow.done()
        with pytest.raises(httpx.ConnectError):
            httpx.get(sidecar.url + "/echo", timeout=2)
        assert ready_status(sidecar) == 503  # the admin listener answers until the end
        assert slow.result(timeout=15).status_code == 200
        assert sidecar.wait(timeout=10) == 0


def test_drain_timeout_bounds_the_wait_and_answers_unfinished_requests_503(
    start_sidecar: Callable[..., Sidecar], echo_upstream: Upstream
) -> None:
    sidecar = start_sidecar(drain_config(echo_upstream.url, "0s", "1500ms"), wait_ready=True)
    with ThreadPoolExecutor(1) as pool:
        stuck = start_slow(pool, sidecar, echo_upstream, 10)
        signalled = time.monotonic()
        sidecar.signal(signal.SIGTERM)
        assert sidecar.wait(timeout=10) == 0
        exited = time.monotonic() - signalled
        cut = stuck.result(timeout=10)
    # Still waiting for the upstream at the deadline: told so, not left hanging.
    assert cut.status_code == 503
    assert cut.headers["content-type"] == "application/problem+json"
    assert cut.json()["type"].endswith(":draining")
    assert cut.headers["connection"] == "close"
    assert 1.5 <= exited < 1.5 + 3.0
    assert "still in flight are cut" in sidecar.output()


def test_sidecar_answers_carry_connection_close_while_draining(
    start_sidecar: Callable[..., Sidecar], echo_upstream: Upstream
) -> None:
    config = drain_config(echo_upstream.url, "5s", "10s")
    config["upstreams"]["dead"] = {
        "url": f"http://127.0.0.1:{free_port()}",
        "health_check": {"enabled": False},
        "retry": {"max_attempts": 1},
    }
    config["routes"] = [{"match": {"path_prefix": "/dead/"}, "upstream": "dead"}]
    sidecar = start_sidecar(config, wait_ready=True)
    with httpx.Client(timeout=5) as client:
        before = client.get(sidecar.url + "/dead/x")
        assert before.status_code == 502 and "connection" not in before.headers
        sidecar.signal(signal.SIGTERM)
        poll(lambda: ready_status(sidecar) == 503, 1, "draining")
        problem = client.get(sidecar.url + "/dead/x")
        assert problem.status_code == 502
        assert problem.headers["content-type"] == "application/problem+json"
        assert problem.headers["connection"] == "close"
        assert client.get(sidecar.url + "/echo").headers["connection"] == "close"


def test_sigint_drains_too_and_a_second_signal_exits_at_once(
    start_sidecar: Callable[..., Sidecar], echo_upstream: Upstream
) -> None:
    sidecar = start_sidecar(drain_config(echo_upstream.url, "20s", "30s"), wait_ready=True)
    sidecar.signal(signal.SIGINT)
    poll(lambda: ready_status(sidecar) == 503, 1, "unready after SIGINT")
    assert httpx.get(sidecar.url + "/echo", timeout=5).status_code == 200  # still serving
    hurried = time.monotonic()
    sidecar.signal(signal.SIGINT)
    assert sidecar.wait(timeout=10) == 0
    assert time.monotonic() - hurried < 5.0  # not the 20 s drain_delay
    assert "second SIGINT" in sidecar.output()
