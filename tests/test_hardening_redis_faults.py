"""Network faults between the sidecar and Redis, injected by the TCP fault proxy.

Keyed POSTs (idempotency on the Redis store) must fail closed with a 503 and never run
twice; rate limiting fails open; nothing answers 500 and nothing leaks once the fault is
gone.
"""

from __future__ import annotations

import time

import httpx
import psutil
import pytest

from tests.conftest import basic_config
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import RedisServer, Sidecar, Upstream, upstream_calls


@pytest.fixture
def redis_behind_faults(echo_upstream: Upstream, own_redis: RedisServer, start_sidecar):
    proxy = FaultProxy(own_redis.port).start()
    config = basic_config(
        echo_upstream.url,
        store={"backend": "redis", "url": f"redis://127.0.0.1:{proxy.port}/0", "timeout": "200ms"},
        routes=[
            {
                "match": {"path": "/orders", "methods": ["POST"]},
                "idempotency": {"enabled": True},
                "rate_limit": {"requests_per_second": 1000, "burst": 1000},
            }
        ],
        health={"critical": ["upstream"]},
    )
    config["upstreams"]["app"]["retry"] = {"max_attempts": 1}
    sidecar = start_sidecar(config)
    yield proxy, sidecar
    proxy.stop()


def post(sidecar: Sidecar, key: str) -> httpx.Response:
    return httpx.post(
        sidecar.url + "/orders",
        json={"n": 1},
        headers={"Idempotency-Key": key, "X-Test-Key": key},
        timeout=5,
    )


FAULTS = [
    ("refuse", {}),
    ("blackhole", {}),
    ("latency", {"latency": 0.5}),  # slower than store.timeout (200 ms)
    ("reset", {"after_bytes": 0}),
    ("close_after", {"after_bytes": 3}),
]


@pytest.mark.parametrize(("kind", "options"), FAULTS, ids=[f[0] for f in FAULTS])
def test_redis_fault_fails_keyed_requests_closed_and_never_runs_one_twice(
    redis_behind_faults, echo_upstream: Upstream, kind: str, options: dict
) -> None:
    proxy, sidecar = redis_behind_faults
    assert post(sidecar, f"warm-{kind}").status_code == 201
    baseline = psutil.Process(sidecar.pid).num_fds()
    proxy.set(kind, **options)
    key = f"fault-{kind}"
    statuses = [post(sidecar, key).status_code for _ in range(3)]
    assert set(statuses) <= {503}, statuses  # fail closed: not forwarded unprotected
    assert upstream_calls(echo_upstream, "POST", "/orders", key) == 0
    # Unkeyed traffic keeps flowing: the rate limiter fails open.
    assert httpx.post(sidecar.url + "/orders", json={}, timeout=5).status_code == 201
    proxy.set("none")
    # A claim whose reply was lost may have been taken; the sidecar gives it back in the
    # background once Redis answers, meanwhile the client is told to retry (503/409).
    deadline = time.monotonic() + 10
    while (status := post(sidecar, key).status_code) in (503, 409) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 201  # recovered without a restart, and the key was not lost
    assert post(sidecar, key).headers.get("idempotent-replayed") == "true"
    assert upstream_calls(echo_upstream, "POST", "/orders", key) == 1
    deadline = time.monotonic() + 5
    while psutil.Process(sidecar.pid).num_fds() > baseline + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert psutil.Process(sidecar.pid).num_fds() <= baseline + 2
