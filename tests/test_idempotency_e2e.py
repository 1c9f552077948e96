"""Idempotency end to end: real sidecar processes, the echo upstream, a real redis-server.

Every scenario runs on both store backends (``memory`` and ``redis``). The upstream counts
each execution per ``X-Test-Key`` (``GET /stats``), so "executed exactly once" is read from
the upstream itself, not from the sidecar's opinion.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import basic_config
from tests.support.processes import RedisServer, Sidecar, Upstream, free_port

BODY = b'{"restaurant_id": 1, "items": ["pizza"], "amount": 1250}'
SKIP_IN_COMPARISON = {"x-request-id", "x-idempotent-replayed", "idempotent-replayed"}


def idempotency_config(upstream_url: str, dead_port: int, store: dict) -> dict:
    config = basic_config(upstream_url, store=store)
    upstreams = config["upstreams"]
    upstreams["slow"] = {
        "url": upstream_url,
        "timeouts": {"connect": "1s", "request": "300ms"},
        "health_check": {"enabled": False},
        "retry": {"max_attempts": 1},
    }
    upstreams["dead"] = {
        "url": f"http://127.0.0.1:{dead_port}",
        "timeouts": {"connect": "500ms", "request": "5s"},
        "health_check": {"enabled": False},
        "circuit_breaker": {"enabled": False},
    }

    def route(prefix: str, upstream: str = "app", **settings: object) -> dict:
        return {
            "match": {"path_prefix": prefix, "methods": ["POST"]},
            "upstream": upstream,
            "idempotency": {"enabled": True, **settings},
        }

    config["routes"] = [
        route("/idem/orders", max_stored_body="4KiB"),
        route("/idem/required", required=True),
        route("/idem/byauth", scope={"by": "header", "header": "Authorization"}),
        route("/idem/timeout", "slow"),
        route("/idem/dead", "dead"),
        route("/idem/crash", lease="1s"),
    ]
    return config


def store_config(backend: str, redis: RedisServer | None, prefix: str) -> dict:
    if backend == "memory":
        return {"backend": "memory"}
    assert redis is not None
    # A generous per-operation timeout: the machine is shared, and a slow store means 503.
    return {"backend": "redis", "url": redis.url, "key_prefix": prefix, "timeout": "2s"}


class Harness:
    """One sidecar (per backend) in front of the shared echo upstream."""

    def __init__(self, backend: str, sidecar: Sidecar, echo: Upstream, dead_port: int) -> None:
        self.backend = backend
        self.sidecar = sidecar
        self.echo = echo
        self.dead_port = dead_port
        self.url = sidecar.url

    def executions(self, path: str, test_key: str) -> int:
        calls = httpx.get(self.echo.url + "/stats").json()["calls"]
        return int(calls.get(f"POST {path} {test_key}", 0))


@pytest.fixture(scope="module", params=["memory", "redis"])
def harness(
    request: pytest.FixtureRequest,
    echo_upstream: Upstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Harness]:
    backend = request.param
    redis = request.getfixturevalue("redis_server") if backend == "redis" else None
    dead_port = free_port()
    store = store_config(backend, redis, f"e2e-{uuid.uuid4().hex[:8]}:")
    config = idempotency_config(echo_upstream.url, dead_port, store)
    sidecar = Sidecar(config, tmp_path_factory.mktemp(f"idem-{backend}")).start()
    yield Harness(backend, sidecar, echo_upstream, dead_port)
    sidecar.stop()


def new_keys() -> tuple[str, str]:
    """A fresh idempotency key and a fresh X-Test-Key (the upstream's counter bucket)."""
    return f"key-{uuid.uuid4()}", f"test-{uuid.uuid4().hex}"


def end_to_end(response: httpx.Response) -> list[tuple[str, str]]:
    return [(n, v) for n, v in response.headers.multi_items() if n not in SKIP_IN_COMPARISON]


def assert_replay_of(replay: httpx.Response, first: httpx.Response) -> None:
    assert replay.status_code == first.status_code
    assert replay.content == first.content
    assert end_to_end(replay) == end_to_end(first)
    assert replay.headers["x-idempotent-replayed"] == "true"
    assert replay.headers["idempotent-replayed"] == "true"


def problem_type(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/problem+json"
    return response.json()["type"].rsplit(":", 1)[1]


def post_concurrently(
    urls: list[str], path: str, key: str, test_key: str, count: int
) -> list[httpx.Response]:
    """``count`` identical keyed POSTs at once, spread over ``urls``."""
    headers = {"Idempotency-Key": key, "X-Test-Key": test_key}
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(urls[i % len(urls)] + path, content=BODY, headers=headers)
                    for i in range(count)
                )
            )

    return asyncio.run(run())


def check_one_execution_among(responses: list[httpx.Response], key: str) -> None:
    """One 201 original; every other answer a 409 in-flight or a byte-identical replay."""
    originals = [
        r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers
    ]
    assert len(originals) == 1, [r.status_code for r in responses]
    first = originals[0]
    for response in responses:
        assert response.headers["x-idempotency-key"] == key
        if response is first:
            continue
        if response.status_code == 409:
            assert problem_type(response) == "idempotency-key-in-flight"
            assert response.headers["retry-after"] == "1"
        else:
            assert_replay_of(response, first)


def test_50_concurrent_duplicates_execute_once(harness: Harness) -> None:
    key, test_key = new_keys()
    path = "/idem/orders?delay=0.2"
    responses = post_concurrently([harness.url], path, key, test_key, 50)
    assert harness.executions("/idem/orders", test_key) == 1
    check_one_execution_among(responses, key)


def test_replay_after_completion_is_byte_identical_and_not_executed(harness: Harness) -> None:
    key, test_key = new_keys()
    headers = {"Idempotency-Key": key, "X-Test-Key": test_key}
    first = httpx.post(harness.url + "/idem/orders", content=BODY, headers=headers)
    assert first.status_code == 201 and first.headers["x-idempotency-key"] == key
    order = first.json()
    # The upstream got the key scoped by client, so it can deduplicate too.
    assert order["idempotency_key"].endswith(":" + key) and order["idempotency_key"] != key
    for _ in range(3):
        replay = httpx.post(harness.url + "/idem/orders", content=BODY, headers=headers)
        assert_replay_of(replay, first)
        assert replay.headers["x-request-id"] != first.headers["x-request-id"]
    assert harness.executions("/idem/orders", test_key) == 1
    # The X- alias names the same key.
    alias = {"X-Idempotency-Key": key, "X-Test-Key": test_key}
    assert_replay_of(httpx.post(harness.url + "/idem/orders", content=BODY, headers=alias), first)
    metrics = httpx.get(harness.sidecar.admin_url + "/api/metrics").text
    assert 'sidecar_idempotency_requests_total{endpoint="/idem/orders/*",outcome="replayed"}' in (
        metrics
    )


def test_same_key_with_a_different_body_is_422_without_execution(harness: Harness) -> None:
    key, test_key = new_keys()
    headers = {"Idempotency-Key": key, "X-Test-Key": test_key}
    assert httpx.post(harness.url + "/idem/orders", content=BODY, headers=headers).is_success
    other = httpx.post(harness.url + "/idem/orders", content=b'{"amount": 1}', headers=headers)
    assert other.status_code == 422 and problem_type(other) == "idempotency-key-mismatch"
    assert harness.executions("/idem/orders", test_key) == 1


def test_another_client_reusing_the_key_gets_its_own_execution(harness: Harness) -> None:
    key, test_key = new_keys()
    headers = {"Idempotency-Key": key, "X-Test-Key": test_key}
    first = httpx.post(harness.url + "/idem/orders", content=BODY, headers=headers)
    # Scope by client address: the same key from 127.0.0.2 is another client's key.
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as other:
        theirs = other.post(harness.url + "/idem/orders", content=BODY, headers=headers)
    assert theirs.status_code == 201 and "idempotent-replayed" not in theirs.headers
    assert theirs.json()["id"] != first.json()["id"]
    assert harness.executions("/idem/orders", test_key) == 2

    # Scope by credential: Alice's key is not Bob's, whatever address they come from.
    def post(token: str) -> httpx.Response:
        auth = {**headers, "Authorization": f"Bearer {token}"}
        return httpx.post(harness.url + "/idem/byauth", content=BODY, headers=auth)

    alice = post("alice")
    bob = post("bob")
    assert "idempotent-replayed" not in bob.headers and bob.json()["id"] != alice.json()["id"]
    assert_replay_of(post("alice"), alice)
    assert harness.executions("/idem/byauth", test_key) == 2


def test_missing_or_malformed_keys_are_400_without_execution(harness: Harness) -> None:
    _, test_key = new_keys()
    missing = httpx.post(
        harness.url + "/idem/required", content=BODY, headers={"X-Test-Key": test_key}
    )
    assert missing.status_code == 400 and problem_type(missing) == "idempotency-key-missing"
    too_long = {"Idempotency-Key": "k" * 256, "X-Test-Key": test_key}
    bad = httpx.post(harness.url + "/idem/orders", content=BODY, headers=too_long)
    assert bad.status_code == 400 and problem_type(bad) == "idempotency-key-invalid"
    assert harness.executions("/idem/required", test_key) == 0
    assert harness.executions("/idem/orders", test_key) == 0
    # Optional routes forward unkeyed requests untouched.
    plain = httpx.post(harness.url + "/idem/orders", content=BODY, headers={"X-Test-Key": test_key})
    assert plain.status_code == 201 and "x-idempotency-key" not in plain.headers


def test_upstream_timeout_after_sending_is_never_re_executed(harness: Harness) -> None:
    key, test_key = new_keys()
    headers = {"Idempotency-Key": key, "X-Test-Key": test_key}
    url = harness.url + "/idem/timeout?delay=1.5"
    first = httpx.post(url, content=BODY, headers=headers, timeout=10)
    assert first.status_code == 504
    for pause in (0.0, 1.6):  # while the upstream still runs it, and after it finished
        time.sleep(pause)
        again = httpx.post(url, content=BODY, headers=headers, timeout=10)
        assert again.status_code == 409 and problem_type(again) == "idempotency-outcome-unknown"
        assert again.headers["x-idempotency-key"] == key
    assert harness.executions("/idem/timeout", test_key) == 1


def test_connect_failure_releases_the_key_so_a_retry_executes(harness: Harness) -> None:
    key, test_key = new_keys()
    headers = {"Idempotency-Key": key, "X-Test-Key": test_key}
    url = harness.url + "/idem/dead"
    refused = httpx.post(url, content=BODY, headers=headers, timeout=10)
    assert refused.status_code == 502 and problem_type(refused) == "upstream-unreachable"
    upstream = Upstream(port=harness.dead_port).start()
    try:
        retried = httpx.post(url, content=BODY, headers=headers, timeout=10)
        assert retried.status_code == 201 and "idempotent-replayed" not in retried.headers
        calls = httpx.get(upstream.url + "/stats").json()["calls"]
        assert calls.get(f"POST /idem/dead {test_key}") == 1
        assert_replay_of(httpx.post(url, content=BODY, headers=headers, timeout=10), retried)
    finally:
        upstream.stop()


def test_large_response_is_forwarded_but_never_replayed_or_re_executed(harness: Harness) -> None:
    key, test_key = new_keys()
    headers = {"Idempotency-Key": key, "X-Test-Key": test_key}
    url = harness.url + "/idem/orders?size=10000"  # over max_stored_body (4 KiB)
    first = httpx.post(url, content=BODY, headers=headers)
    assert first.status_code == 201 and len(first.json()["pad"]) == 10000
    again = httpx.post(url, content=BODY, headers=headers)
    assert again.status_code == 409 and problem_type(again) == "idempotency-response-not-stored"
    assert again.json()["original_status"] == 201
    assert harness.executions("/idem/orders", test_key) == 1


def test_upstream_server_errors_are_stored_and_replayed(harness: Harness) -> None:
    key, test_key = new_keys()
    headers = {"Idempotency-Key": key, "X-Test-Key": test_key}
    url = harness.url + "/idem/orders?status=500"
    first = httpx.post(url, content=BODY, headers=headers)
    assert first.status_code == 500
    assert_replay_of(httpx.post(url, content=BODY, headers=headers), first)
    assert harness.executions("/idem/orders", test_key) == 1


def test_two_sidecars_sharing_one_redis_execute_50_duplicates_once(
    echo_upstream: Upstream, redis_server: RedisServer, start_sidecar
) -> None:
    store = store_config("redis", redis_server, f"pair-{uuid.uuid4().hex[:8]}:")
    config = idempotency_config(echo_upstream.url, free_port(), store)
    first, second = start_sidecar(config), start_sidecar(config)
    key, test_key = new_keys()
    path = "/idem/orders?delay=0.2"
    responses = post_concurrently([first.url, second.url], path, key, test_key, 50)
    calls = httpx.get(echo_upstream.url + "/stats").json()["calls"]
    assert calls.get(f"POST /idem/orders {test_key}") == 1
    check_one_execution_among(responses, key)
    # Either sidecar replays what the other stored.
    headers = {"Idempotency-Key": key, "X-Test-Key": test_key}
    original = next(
        r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers
    )
    for sidecar in (first, second):
        replay = httpx.post(sidecar.url + "/idem/orders?delay=0.2", content=BODY, headers=headers)
        assert_replay_of(replay, original)


def test_redis_down_fails_closed_and_recovers_without_a_restart(
    echo_upstream: Upstream, own_redis: RedisServer, start_sidecar
) -> None:
    store = store_config("redis", own_redis, "down:")
    sidecar = start_sidecar(idempotency_config(echo_upstream.url, free_port(), store))
    key, test_key = new_keys()
    headers = {"Idempotency-Key": key, "X-Test-Key": test_key}
    url = sidecar.url + "/idem/orders"
    own_redis.kill()
    refused = httpx.post(url, content=BODY, headers=headers, timeout=10)
    assert refused.status_code == 503
    assert problem_type(refused) == "idempotency-store-unavailable"
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["x-idempotency-key"] == key
    calls = httpx.get(echo_upstream.url + "/stats").json()["calls"]
    assert calls.get(f"POST /idem/orders {test_key}", 0) == 0
    # Requests that need no store keep working while it is down.
    plain = httpx.post(url, content=BODY, headers={"X-Test-Key": test_key}, timeout=10)
    assert plain.status_code == 201

    own_redis.start()
    first = httpx.post(url, content=BODY, headers=headers, timeout=10)
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    assert_replay_of(httpx.post(url, content=BODY, headers=headers, timeout=10), first)
    calls = httpx.get(echo_upstream.url + "/stats").json()["calls"]
    assert calls.get(f"POST /idem/orders {test_key}") == 2  # the unkeyed one and the keyed one


def test_claim_of_a_crashed_sidecar_turns_unknown_and_is_never_re_executed(
    echo_upstream: Upstream, redis_server: RedisServer, start_sidecar
) -> None:
    store = store_config("redis", redis_server, f"crash-{uuid.uuid4().hex[:8]}:")
    config = idempotency_config(echo_upstream.url, free_port(), store)
    doomed = start_sidecar(config)
    key, test_key = new_keys()
    headers = {"Idempotency-Key": key, "X-Test-Key": test_key}
    path = "/idem/crash?delay=3"

    def post_and_ignore_the_crash() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(doomed.url + path, content=BODY, headers=headers, timeout=10)

    in_flight = threading.Thread(target=post_and_ignore_the_crash)
    in_flight.start()
    deadline = time.monotonic() + 10
    while harness_calls(echo_upstream, "/idem/crash", test_key) == 0:
        assert time.monotonic() < deadline, "the upstream never received the request"
        time.sleep(0.02)
    doomed.kill()  # SIGKILL while the upstream executes it: no completion, no release
    in_flight.join()
    survivor = start_sidecar(config)
    during = httpx.post(survivor.url + path, content=BODY, headers=headers, timeout=10)
    assert during.status_code == 409  # in flight (or already unknown if the lease ran out)
    time.sleep(1.2)  # past the 1 s lease
    after = httpx.post(survivor.url + path, content=BODY, headers=headers, timeout=10)
    assert after.status_code == 409 and problem_type(after) == "idempotency-outcome-unknown"
    assert harness_calls(echo_upstream, "/idem/crash", test_key) == 1


def harness_calls(echo: Upstream, path: str, test_key: str) -> int:
    calls = httpx.get(echo.url + "/stats").json()["calls"]
    return int(calls.get(f"POST {path} {test_key}", 0))


def test_keyed_post_whose_upstream_dies_after_its_head_gets_502_and_never_runs_twice(
    start_sidecar,
) -> None:
    """The layer holds the head until the first body byte: when the upstream resets right
    after its head, the client gets a complete 502 problem, not a truncated 201."""
    from tests.support.raw import RawUpstream

    upstream = RawUpstream(b"HTTP/1.1 201 Created\r\ncontent-length: 100\r\n\r\n")
    try:
        config = basic_config(f"http://127.0.0.1:{upstream.port}")
        config["routes"] = [
            {"match": {"path_prefix": "/orders"}, "idempotency": {"enabled": True}},
        ]
        sidecar = start_sidecar(config)
        headers = {"Idempotency-Key": "dies-after-head"}
        first = httpx.post(sidecar.url + "/orders", json={"n": 1}, headers=headers)
        assert first.status_code == 502
        assert first.headers["content-type"] == "application/problem+json"
        assert first.json()["type"].endswith(":upstream-reset")
        again = httpx.post(sidecar.url + "/orders", json={"n": 1}, headers=headers)
        assert again.status_code != 201
        assert upstream.requests == 1  # the ambiguous first attempt is never repeated
    finally:
        upstream.close()
