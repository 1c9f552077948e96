"""Response caching end to end: real sidecar processes, the echo upstream and redis-server.

Every behaviour is proven on both store backends (``memory`` and ``redis``). The echo
upstream's ``/cache/...`` endpoint counts its calls per path and ``X-Test-Key`` and shapes
its answer from ``X-Respond-*`` request headers, which the cache does not key on, so a
test can change what the upstream says without changing the cache key.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.conftest import basic_config
from tests.support.processes import RedisServer, Sidecar, Upstream, upstream_calls
from tests.support.processes import sidecar_metric as metric

BACKENDS = ["memory", "redis"]


def with_backend(cfg: dict, backend: str, redis_url: str) -> dict:
    if backend == "redis":
        cfg["store"] = {"backend": "redis", "url": redis_url, "timeout": "250ms"}
    return cfg


@pytest.fixture(scope="module", params=BACKENDS)
def sidecar(
    request: pytest.FixtureRequest,
    echo_upstream: Upstream,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Sidecar]:
    """One sidecar per backend for the tests that share it (each uses its own paths)."""
    cfg = basic_config(
        echo_upstream.url,
        routes=[
            {
                "name": "tenant-cache",
                "match": {"path_prefix": "/cache/tenant/"},
                "cache": {"ttl": "30s", "vary_headers": ["X-Tenant"]},
            },
            {
                "name": "cache",
                "match": {"path_prefix": "/cache/", "methods": ["GET", "HEAD"]},
                "cache": {"ttl": "30s", "stale_if_error": "1m", "max_entry_bytes": "4KiB"},
            },
        ],
    )
    # Exact upstream call counts: no retries, and no breaker opening on the 5xx tests.
    cfg["upstreams"]["app"]["retry"] = {"max_attempts": 1}
    cfg["upstreams"]["app"]["circuit_breaker"] = {"enabled": False}
    with_backend(cfg, request.param, redis_server.url)
    process = Sidecar(cfg, tmp_path_factory.mktemp(f"cache-{request.param}")).start(wait_ready=True)
    yield process
    process.stop()


def unique_path(prefix: str = "/cache/") -> str:
    return f"{prefix}{uuid.uuid4().hex}"


END_TO_END = ("content-type", "content-length", "etag", "x-upstream-custom", "date", "server")


def test_second_get_is_a_hit_served_without_reaching_the_upstream(
    sidecar: Sidecar, echo_upstream: Upstream
) -> None:
    path, key = unique_path(), uuid.uuid4().hex
    with httpx.Client(base_url=sidecar.url, timeout=10) as client:
        first = client.get(path + "?page=1", headers={"x-test-key": key})
        second = client.get(
            path + "?page=1", headers={"x-test-key": key, "x-request-id": "client-id-2"}
        )
        other_query = client.get(path + "?page=2", headers={"x-test-key": key})

    assert first.status_code == second.status_code == 200
    assert first.headers["x-cache"] == "MISS"
    assert second.headers["x-cache"] == "HIT"
    assert second.content == first.content
    for name in END_TO_END:
        assert second.headers.get_list(name) == first.headers.get_list(name), name
    assert int(second.headers["age"]) >= 0
    assert second.headers["x-request-id"] == "client-id-2"  # this request's, not the first's
    assert other_query.headers["x-cache"] == "MISS"  # the query is part of the key
    assert upstream_calls(echo_upstream, "GET", path, key) == 2  # page=1 once, page=2 once


def test_head_requests_are_cached_separately_and_answer_without_a_body(
    sidecar: Sidecar, echo_upstream: Upstream
) -> None:
    path, key = unique_path(), uuid.uuid4().hex
    with httpx.Client(base_url=sidecar.url, timeout=10) as client:
        first = client.head(path, headers={"x-test-key": key})
        second = client.head(path, headers={"x-test-key": key})
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert second.content == b""
    assert second.headers["content-length"] == first.headers["content-length"]
    assert upstream_calls(echo_upstream, "HEAD", path, key) == 1


@pytest.mark.parametrize(
    "control",
    [
        {"x-respond-cache-control": "no-store"},
        {"x-respond-cache-control": "private, max-age=60"},
        {"x-respond-set-cookie": "session=abc; Path=/"},
    ],
    ids=["no-store", "private", "set-cookie"],
)
def test_no_store_private_and_set_cookie_responses_are_not_cached(
    sidecar: Sidecar, echo_upstream: Upstream, control: dict[str, str]
) -> None:
    path, key = unique_path(), uuid.uuid4().hex
    with httpx.Client(base_url=sidecar.url, timeout=10) as client:
        answers = [client.get(path, headers={"x-test-key": key, **control}) for _ in range(2)]
    assert [a.headers["x-cache"] for a in answers] == ["MISS", "MISS"]
    assert [a.json()["call"] for a in answers] == [1, 2]
    assert upstream_calls(echo_upstream, "GET", path, key) == 2


def test_responses_to_authorized_requests_are_cached_only_when_public(
    sidecar: Sidecar, echo_upstream: Upstream
) -> None:
    with httpx.Client(base_url=sidecar.url, timeout=10) as client:
        private_path, key = unique_path(), uuid.uuid4().hex
        auth = {"x-test-key": key, "authorization": "Bearer alice"}
        answers = [client.get(private_path, headers=auth) for _ in range(2)]
        assert [a.headers["x-cache"] for a in answers] == ["MISS", "MISS"]
        assert upstream_calls(echo_upstream, "GET", private_path, key) == 2

        public_path = unique_path()
        public = {**auth, "x-respond-cache-control": "public, max-age=60"}
        answers = [client.get(public_path, headers=public) for _ in range(2)]
        assert [a.headers["x-cache"] for a in answers] == ["MISS", "HIT"]
        assert upstream_calls(echo_upstream, "GET", public_path, key) == 1

        # An entry stored for anonymous requests never answers an authorized one.
        shared_path = unique_path()
        assert client.get(shared_path, headers={"x-test-key": key}).headers["x-cache"] == "MISS"
        assert client.get(shared_path, headers={"x-test-key": key}).headers["x-cache"] == "HIT"
        authorized = client.get(shared_path, headers=auth)
        assert authorized.headers["x-cache"] == "MISS"
        assert authorized.json()["authorization"] == "Bearer alice"


def test_vary_separates_entries(sidecar: Sidecar, echo_upstream: Upstream) -> None:
    path, key = unique_path(), uuid.uuid4().hex
    control = {"x-test-key": key, "x-respond-vary": "Accept"}
    with httpx.Client(base_url=sidecar.url, timeout=10) as client:
        json_1 = client.get(path, headers={**control, "accept": "application/json"})
        text_1 = client.get(path, headers={**control, "accept": "text/plain"})
        json_2 = client.get(path, headers={**control, "accept": "application/json"})
        text_2 = client.get(path, headers={**control, "accept": "text/plain"})
    assert [r.headers["x-cache"] for r in (json_1, text_1, json_2, text_2)] == [
        "MISS",
        "MISS",
        "HIT",
        "HIT",
    ]
    assert json_2.json()["accept"] == "application/json"
    assert text_2.json()["accept"] == "text/plain"
    assert upstream_calls(echo_upstream, "GET", path, key) == 2


def test_route_vary_headers_are_part_of_the_key(sidecar: Sidecar, echo_upstream: Upstream) -> None:
    path, key = unique_path("/cache/tenant/"), uuid.uuid4().hex
    with httpx.Client(base_url=sidecar.url, timeout=10) as client:
        a1 = client.get(path, headers={"x-test-key": key, "x-tenant": "a"})
        b1 = client.get(path, headers={"x-test-key": key, "x-tenant": "b"})
        a2 = client.get(path, headers={"x-test-key": key, "x-tenant": "a"})
    assert [r.headers["x-cache"] for r in (a1, b1, a2)] == ["MISS", "MISS", "HIT"]
    assert upstream_calls(echo_upstream, "GET", path, key) == 2


def test_responses_larger_than_max_entry_bytes_stream_through_uncached(
    sidecar: Sidecar, echo_upstream: Upstream
) -> None:
    path, key = unique_path(), uuid.uuid4().hex
    big = {"x-test-key": key, "x-respond-size": "20000"}
    with httpx.Client(base_url=sidecar.url, timeout=10) as client:
        answers = [client.get(path, headers=big) for _ in range(2)]
    assert [a.headers["x-cache"] for a in answers] == ["MISS", "MISS"]
    assert all(len(a.json()["pad"]) == 20000 for a in answers)
    assert upstream_calls(echo_upstream, "GET", path, key) == 2


async def test_100_concurrent_misses_make_one_upstream_call(
    sidecar: Sidecar, echo_upstream: Upstream
) -> None:
    path, key = unique_path(), uuid.uuid4().hex
    slow = {"x-test-key": key, "x-respond-delay": "1"}
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=sidecar.url, timeout=30, limits=limits) as client:
        answers = await asyncio.gather(*(client.get(path, headers=slow) for _ in range(100)))
    assert all(a.status_code == 200 for a in answers)
    assert len({a.content for a in answers}) == 1
    assert sorted(a.headers["x-cache"] for a in answers) == ["HIT"] * 99 + ["MISS"]
    assert upstream_calls(echo_upstream, "GET", path, key) == 1


def test_an_upstream_error_answer_is_replaced_by_the_stale_copy(
    sidecar: Sidecar, echo_upstream: Upstream
) -> None:
    path, key = unique_path(), uuid.uuid4().hex
    with httpx.Client(base_url=sidecar.url, timeout=10) as client:
        # Without a stored copy, an error passes through untouched.
        failing = client.get(path, headers={"x-test-key": key, "x-respond-status": "503"})
        assert failing.status_code == 503 and failing.headers["x-cache"] == "MISS"
        fresh = client.get(
            path, headers={"x-test-key": key, "x-respond-cache-control": "max-age=1"}
        )
        assert fresh.headers["x-cache"] == "MISS"
        time.sleep(1.2)  # the copy is now stale, inside the route's 1 minute window
        for status in ("500", "502", "503", "504"):
            stale = client.get(path, headers={"x-test-key": key, "x-respond-status": status})
            assert stale.status_code == 200, status
            assert stale.headers["x-cache"] == "STALE"
            assert stale.content == fresh.content
            assert int(stale.headers["age"]) >= 1
        # A good answer replaces the stale copy.
        renewed = client.get(path, headers={"x-test-key": key})
        assert renewed.headers["x-cache"] == "MISS"
        assert client.get(path, headers={"x-test-key": key}).headers["x-cache"] == "HIT"
    assert upstream_calls(echo_upstream, "GET", path, key) == 7
    assert metric(sidecar, "sidecar_cache_requests_total", endpoint="cache", result="stale") >= 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_while_the_circuit_is_open_a_cached_route_answers_stale_without_calling_upstream(
    backend: str,
    echo_upstream: Upstream,
    redis_server: RedisServer,
    start_sidecar: Callable[..., Sidecar],
) -> None:
    cfg = basic_config(
        echo_upstream.url,
        routes=[
            {"match": {"path_prefix": "/cache/"}, "cache": {"ttl": "1s", "stale_if_error": "1m"}}
        ],
    )
    cfg["upstreams"]["app"]["retry"] = {"max_attempts": 1}
    cfg["upstreams"]["app"]["circuit_breaker"] = {"failure_threshold": 2, "open_timeout": "30s"}
    sidecar = start_sidecar(with_backend(cfg, backend, redis_server.url), wait_ready=True)
    cached, uncached, key = unique_path(), unique_path(), uuid.uuid4().hex
    with httpx.Client(base_url=sidecar.url, timeout=10) as client:
        fresh = client.get(cached, headers={"x-test-key": key})
        time.sleep(1.2)
        # Two upstream 503s open the circuit; the first is already hidden by the stale copy.
        assert (
            client.get(cached, headers={"x-test-key": key, "x-respond-status": "503"}).headers[
                "x-cache"
            ]
            == "STALE"
        )
        assert (
            client.get(uncached, headers={"x-test-key": key, "x-respond-status": "503"}).status_code
            == 503
        )
        calls_before = upstream_calls(echo_upstream, "GET", cached, key)

        stale = client.get(cached, headers={"x-test-key": key})  # a healthy request now
        assert stale.status_code == 200
        assert stale.headers["x-cache"] == "STALE"
        assert stale.content == fresh.content
        assert upstream_calls(echo_upstream, "GET", cached, key) == calls_before

        # Without a stored copy the sidecar's own circuit-open answer shows.
        rejected = client.get(unique_path(), headers={"x-test-key": key})
        assert rejected.status_code == 503
        assert rejected.json()["type"].endswith("circuit-open")
        assert rejected.headers["x-cache"] == "MISS"


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_the_upstream_down_a_cached_route_answers_stale_within_stale_if_error(
    backend: str, redis_server: RedisServer, start_sidecar: Callable[..., Sidecar]
) -> None:
    upstream = Upstream().start()
    try:
        cfg = basic_config(
            upstream.url,
            routes=[
                {
                    "match": {"path_prefix": "/cache/"},
                    "cache": {"ttl": "1s", "stale_if_error": "2s"},
                }
            ],
        )
        sidecar = start_sidecar(with_backend(cfg, backend, redis_server.url), wait_ready=True)
        path = unique_path()
        with httpx.Client(base_url=sidecar.url, timeout=10) as client:
            stored_at = time.monotonic()
            fresh = client.get(path)
            assert fresh.headers["x-cache"] == "MISS"
            upstream.kill()
            assert client.get(path).headers["x-cache"] == "HIT"  # fresh: no upstream needed

            time.sleep(max(0.0, stored_at + 1.2 - time.monotonic()))
            # Stale and the upstream is down (502, then possibly a 503 open circuit).
            for _ in range(3):
                stale = client.get(path)
                assert stale.status_code == 200
                assert stale.headers["x-cache"] == "STALE"
                assert stale.content == fresh.content
            assert time.monotonic() - stored_at < 3.0, "too slow to prove the window"

            time.sleep(max(0.0, stored_at + 3.3 - time.monotonic()))
            gone = client.get(path)  # past ttl + stale_if_error: the error shows
            assert gone.status_code in (502, 503)
            assert gone.headers["content-type"] == "application/problem+json"
    finally:
        upstream.kill()


async def test_redis_errors_behave_as_misses_and_never_fail_the_request(
    echo_upstream: Upstream, own_redis: RedisServer, start_sidecar: Callable[..., Sidecar]
) -> None:
    cfg = basic_config(
        echo_upstream.url,
        routes=[
            {
                "name": "cache-redis-down",
                "match": {"path_prefix": "/cache/"},
                "cache": {"ttl": "30s"},
            }
        ],
    )
    sidecar = start_sidecar(with_backend(cfg, "redis", own_redis.url), wait_ready=True)
    path, key = unique_path(), uuid.uuid4().hex
    async with httpx.AsyncClient(base_url=sidecar.url, timeout=10) as client:
        assert (await client.get(path, headers={"x-test-key": key})).headers["x-cache"] == "MISS"
        assert (await client.get(path, headers={"x-test-key": key})).headers["x-cache"] == "HIT"
        own_redis.kill()
        down = await client.get(path, headers={"x-test-key": key})
        assert down.status_code == 200
        assert down.headers["x-cache"] == "MISS"
    assert upstream_calls(echo_upstream, "GET", path, key) == 2
    errors = metric(sidecar, "sidecar_store_errors_total", backend="redis", operation="cache_get")
    assert errors >= 1


def test_the_memory_cache_survives_a_config_reload(
    echo_upstream: Upstream, redis_server: RedisServer, start_sidecar: Callable[..., Sidecar]
) -> None:
    cfg = basic_config(
        echo_upstream.url, routes=[{"match": {"path_prefix": "/cache/"}, "cache": {"ttl": "30s"}}]
    )
    sidecar = start_sidecar(cfg, wait_ready=True)
    path, key = unique_path(), uuid.uuid4().hex
    with httpx.Client(base_url=sidecar.url, timeout=10) as client:
        assert client.get(path, headers={"x-test-key": key}).headers["x-cache"] == "MISS"
        sidecar.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "config reloaded" not in sidecar.output():
            assert time.monotonic() < deadline, "no reload logged"
            time.sleep(0.05)
        assert client.get(path, headers={"x-test-key": key}).headers["x-cache"] == "HIT"
    assert upstream_calls(echo_upstream, "GET", path, key) == 1
