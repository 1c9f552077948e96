"""Rate limiting end to end: real sidecar processes, the echo upstream and redis-server.

Every behaviour is proven on both store backends (``memory`` and ``redis``). Tolerance of
the burst bound: a burst's allowed count must be at least ``burst`` (the bucket starts
full) and at most ``burst + floor(rate * elapsed) + 1``, where ``elapsed`` is measured by
the client around the whole burst (so it encloses every decision the sidecar made) and
the ``+ 1`` absorbs one token completing at the window's edge.
"""

from __future__ import annotations

import asyncio
import math
import re
import signal
import time
import uuid
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import basic_config
from tests.support.processes import RedisServer, Sidecar, Upstream
from tests.support.processes import sidecar_metric as metric

BACKENDS = ["memory", "redis"]


def config(
    upstream: Upstream,
    backend: str,
    redis_url: str,
    rate_limit: dict,
    *,
    name: str | None = None,
    **extra: object,
) -> dict:
    route = {
        "name": name or f"rl-{uuid.uuid4().hex[:8]}",
        "match": {"path_prefix": "/echo"},
        "rate_limit": rate_limit,
    }
    cfg = basic_config(upstream.url, routes=[route], **extra)
    if backend == "redis":
        cfg["store"] = {"backend": "redis", "url": redis_url, "timeout": "250ms"}
    return cfg


async def burst(urls: list[str], count: int, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """Send ``count`` GETs at once, spread over ``urls``; the responses and the elapsed time."""
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=count)) as client:
        start = time.monotonic()
        responses = await asyncio.gather(
            *(client.get(urls[i % len(urls)] + "/echo", headers=headers) for i in range(count))
        )
        return responses, time.monotonic() - start


def check_refusal(response: httpx.Response, policy: str) -> None:
    assert response.status_code == 429
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 429
    assert problem["type"].endswith("rate-limited")
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["ratelimit-policy"] == policy
    name = policy.split(";")[0]
    assert re.fullmatch(re.escape(name) + r";r=0;t=\d+", response.headers["ratelimit"])


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_burst_of_twice_the_limit_allows_the_burst_plus_refill_and_refuses_the_rest(
    backend: str,
    echo_upstream: Upstream,
    redis_server: RedisServer,
    start_sidecar: Callable[..., Sidecar],
) -> None:
    rate, size = 2.0, 10
    name = f"burst-{backend}-{uuid.uuid4().hex[:6]}"
    sidecar = start_sidecar(
        config(
            echo_upstream,
            backend,
            redis_server.url,
            {"requests_per_second": rate, "burst": size},
            name=name,
        ),
        wait_ready=True,
    )
    responses, elapsed = await burst([sidecar.url], 2 * size)

    allowed = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert size <= len(allowed) <= size + math.floor(rate * elapsed) + 1, elapsed
    assert refused, "a burst of twice the limit must be partly refused"
    policy = f'"{name}";q={size};w=5'
    for response in refused:
        check_refusal(response, policy)
    remaining = []
    for response in allowed:
        assert response.headers["ratelimit-policy"] == policy
        found = re.fullmatch(rf'"{name}";r=(\d+);t=(\d+)', response.headers["ratelimit"])
        assert found, response.headers["ratelimit"]
        remaining.append(int(found.group(1)))
        assert 1 <= int(found.group(2)) <= 5
    # The first decision found the bucket full; the last allowed ones emptied it.
    assert max(remaining) == size - 1
    assert min(remaining) == 0
    assert metric(sidecar, "sidecar_rate_limit_rejections_total", endpoint=name) == len(refused)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_spoofed_x_forwarded_for_from_an_untrusted_client_cannot_pick_another_bucket(
    backend: str,
    echo_upstream: Upstream,
    redis_server: RedisServer,
    start_sidecar: Callable[..., Sidecar],
) -> None:
    limit = {"requests_per_second": 0.1, "burst": 3, "key": "client_ip"}
    untrusted = start_sidecar(config(echo_upstream, backend, redis_server.url, limit))
    async with httpx.AsyncClient(base_url=untrusted.url, timeout=10) as client:
        for _ in range(3):
            ok = await client.get("/echo", headers={"x-forwarded-for": "203.0.113.1"})
            assert ok.status_code == 200
        for spoofed in ("203.0.113.2", "198.51.100.7, 203.0.113.9", None):
            headers = {"x-forwarded-for": spoofed} if spoofed else {}
            refused = await client.get("/echo", headers=headers)
            assert refused.status_code == 429, spoofed

    # Control: behind a trusted proxy the forwarded address is the key, so the same
    # requests do land in separate buckets (the key really is the client address).
    trusting = start_sidecar(
        config(
            echo_upstream,
            backend,
            redis_server.url,
            limit,
            trusted_proxies=["127.0.0.1/32"],
        )
    )
    async with httpx.AsyncClient(base_url=trusting.url, timeout=10) as client:
        for _ in range(3):
            ok = await client.get("/echo", headers={"x-forwarded-for": "203.0.113.1"})
            assert ok.status_code == 200
        assert (
            await client.get("/echo", headers={"x-forwarded-for": "203.0.113.1"})
        ).status_code == 429
        other = await client.get("/echo", headers={"x-forwarded-for": "203.0.113.2"})
        assert other.status_code == 200
        assert other.headers["ratelimit"].endswith(";r=2;t=10")


@pytest.mark.parametrize("backend", BACKENDS)
async def test_header_keys_get_their_own_buckets_and_route_keys_share_one(
    backend: str,
    echo_upstream: Upstream,
    redis_server: RedisServer,
    start_sidecar: Callable[..., Sidecar],
) -> None:
    by_header = {"requests_per_second": 0.1, "burst": 1, "key": "header:X-Api-Key"}
    sidecar = start_sidecar(config(echo_upstream, backend, redis_server.url, by_header))
    async with httpx.AsyncClient(base_url=sidecar.url, timeout=10) as client:
        assert (await client.get("/echo", headers={"x-api-key": "alice"})).status_code == 200
        assert (await client.get("/echo", headers={"x-api-key": "alice"})).status_code == 429
        assert (await client.get("/echo", headers={"x-api-key": "bob"})).status_code == 200
        # Without the header the client address is the key.
        assert (await client.get("/echo")).status_code == 200
        assert (await client.get("/echo")).status_code == 429

    by_route = {"requests_per_second": 0.1, "burst": 2, "key": "route"}
    shared = start_sidecar(
        config(echo_upstream, backend, redis_server.url, by_route, trusted_proxies=["127.0.0.1/32"])
    )
    async with httpx.AsyncClient(base_url=shared.url, timeout=10) as client:
        statuses = [
            (await client.get("/echo", headers={"x-forwarded-for": f"203.0.113.{i}"})).status_code
            for i in range(3)
        ]
        assert statuses == [200, 200, 429]


async def test_two_sidecars_sharing_redis_enforce_one_combined_limit(
    echo_upstream: Upstream,
    redis_server: RedisServer,
    start_sidecar: Callable[..., Sidecar],
) -> None:
    rate, size = 2.0, 10
    name = f"shared-{uuid.uuid4().hex[:6]}"
    limit = {"requests_per_second": rate, "burst": size}
    first = start_sidecar(config(echo_upstream, "redis", redis_server.url, limit, name=name))
    second = start_sidecar(config(echo_upstream, "redis", redis_server.url, limit, name=name))
    first.wait_ready()
    second.wait_ready()
    responses, elapsed = await burst([first.url, second.url], 3 * size)

    allowed = sum(r.status_code == 200 for r in responses)
    # Alone, each sidecar would allow `size` of its 15: together they allow one bucket's worth.
    assert size <= allowed <= size + math.floor(rate * elapsed) + 1, elapsed
    refused = metric(first, "sidecar_rate_limit_rejections_total", endpoint=name) + metric(
        second, "sidecar_rate_limit_rejections_total", endpoint=name
    )
    assert refused == 3 * size - allowed


async def test_redis_failure_fails_open_by_default_or_closed_when_configured(
    echo_upstream: Upstream,
    own_redis: RedisServer,
    start_sidecar: Callable[..., Sidecar],
) -> None:
    cfg = basic_config(
        echo_upstream.url,
        store={"backend": "redis", "url": own_redis.url, "timeout": "250ms"},
        routes=[
            {
                "name": "open",
                "match": {"path_prefix": "/echo/open"},
                "rate_limit": {"requests_per_second": 100, "burst": 100},
            },
            {
                "name": "closed",
                "match": {"path_prefix": "/echo/closed"},
                "rate_limit": {
                    "requests_per_second": 100,
                    "burst": 100,
                    "on_store_error": "fail_closed",
                },
            },
        ],
    )
    sidecar = start_sidecar(cfg, wait_ready=True)
    async with httpx.AsyncClient(base_url=sidecar.url, timeout=10) as client:
        assert "ratelimit" in (await client.get("/echo/open")).headers
        own_redis.kill()

        opened = await client.get("/echo/open")
        assert opened.status_code == 200
        assert "ratelimit" not in opened.headers
        closed = await client.get("/echo/closed")
        assert closed.status_code == 503
        assert closed.headers["content-type"] == "application/problem+json"
        assert closed.json()["type"].endswith("rate-limit-store-unavailable")
        assert closed.headers["retry-after"] == "1"

        own_redis.start()
        deadline = time.monotonic() + 10
        while "ratelimit" not in (await client.get("/echo/open")).headers:
            assert time.monotonic() < deadline, "limiting did not resume after Redis came back"
            await asyncio.sleep(0.1)
        assert (await client.get("/echo/closed")).status_code == 200

    errors = "sidecar_rate_limit_store_errors_total"
    assert metric(sidecar, errors, endpoint="open", action="allowed") >= 1
    assert metric(sidecar, errors, endpoint="closed", action="rejected") >= 1
    assert (
        metric(sidecar, "sidecar_store_errors_total", backend="redis", operation="rate_limit") >= 2
    )


def wait_for_reload(sidecar: Sidecar, count: int = 1) -> None:
    deadline = time.monotonic() + 10
    while sidecar.output().count("config reloaded") < count:
        assert time.monotonic() < deadline, "no reload logged"
        time.sleep(0.05)


async def test_memory_buckets_survive_a_config_reload(
    echo_upstream: Upstream, redis_server: RedisServer, start_sidecar: Callable[..., Sidecar]
) -> None:
    limit = {"requests_per_second": 0.1, "burst": 2}
    sidecar = start_sidecar(config(echo_upstream, "memory", redis_server.url, limit))
    async with httpx.AsyncClient(base_url=sidecar.url, timeout=10) as client:
        assert [(await client.get("/echo")).status_code for _ in range(3)] == [200, 200, 429]
        sidecar.signal(signal.SIGHUP)
        wait_for_reload(sidecar)
        assert (await client.get("/echo")).status_code == 429  # not a fresh bucket
