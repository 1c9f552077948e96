"""The retry layer's decisions with a scripted cluster: safety, backoff, Retry-After,
deadlines, budget, circuit-open; and endpoint choice in a real :class:`Cluster`."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator

import pytest

from proxy.config import ConfigError, parse_config
from proxy.config.schema import Retry, Upstream
from proxy.forward import UpstreamRejected
from proxy.layers import retry as retry_module
from proxy.layers.circuit_breaker import CircuitOpen
from proxy.layers.retry import RetryingCall, RetryPolicy, parse_retry_after
from proxy.layers.retry_budget import RetryBudget
from proxy.upstream.cluster import Cluster, UpstreamRequest
from proxy.upstream.errors import ConnectFailure, ConnectionReset, UpstreamError, UpstreamTimeout
from proxy.upstream.http11 import Response


class FakeResponse(Response):
    """A complete upstream response that records how it was let go."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.status = status
        self.headers = headers or []
        self.complete = True
        self.closed = False
        self.drained = False

    def close(self) -> None:
        self.closed = True

    async def read_all(self, limit: int | None = None) -> bytes:
        self.drained = True
        return b""


class FakeEndpoint:
    def __init__(self, url: str) -> None:
        self.url = url


class FakeCluster:
    """Plays scripted outcomes; records which endpoint each attempt avoided."""

    name = "fake"

    def __init__(self, outcomes: list[object], endpoints: int = 2) -> None:
        self.config = Upstream(url="http://127.0.0.1:1")
        self.outcomes = list(outcomes)
        self.endpoints = [FakeEndpoint(f"http://e{i}") for i in range(endpoints)]
        self.avoided: list[object] = []
        self.timeouts: list[float | None] = []
        self.calls = 0

    async def attempt(
        self, request: UpstreamRequest, avoid: object = None
    ) -> tuple[object, object]:
        self.avoided.append(avoid)
        self.timeouts.append(request.timeout)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, CircuitOpen):
            raise outcome
        endpoint = self.endpoints[self.calls % len(self.endpoints)]
        self.calls += 1
        request.attempts += 1
        return endpoint, outcome


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Record backoff sleeps instead of sleeping."""
    recorded: list[float] = []

    async def fake_sleep(delay: float) -> None:
        recorded.append(delay)

    monkeypatch.setattr(retry_module.asyncio, "sleep", fake_sleep)
    yield recorded


def call(
    cluster: FakeCluster, budget: RetryBudget | None = None, **settings: object
) -> RetryingCall:
    config = Retry(**{"base_delay": "10ms", "max_delay": "80ms", **settings})
    return RetryingCall(cluster, config, budget or RetryBudget(config.budget))  # type: ignore[arg-type]


def request(method: str = "GET", replayable: bool = True) -> UpstreamRequest:
    return UpstreamRequest(method, "/x", [], None, replayable=replayable)


async def test_retryable_status_is_retried_and_the_failed_responses_are_let_go(
    waits: list[float],
) -> None:
    first, second, ok = FakeResponse(503), FakeResponse(502), FakeResponse(200)
    cluster = FakeCluster([first, second, ok])
    req = request()
    assert await call(cluster)(req) is ok
    assert req.attempts == 3
    assert first.drained and second.drained and not ok.closed
    assert len(waits) == 2


async def test_the_last_retryable_answer_is_returned_when_attempts_run_out(
    waits: list[float],
) -> None:
    responses = [FakeResponse(503) for _ in range(3)]
    cluster = FakeCluster(list(responses))
    result = await call(cluster)(request())
    assert result is responses[-1] and not result.closed and not result.drained


async def test_a_retry_prefers_another_endpoint(waits: list[float]) -> None:
    cluster = FakeCluster([FakeResponse(503), FakeResponse(503), FakeResponse(200)])
    await call(cluster)(request())
    assert cluster.avoided == [None, cluster.endpoints[0], cluster.endpoints[1]]


async def test_non_replayable_request_is_not_retried_after_it_was_sent(
    waits: list[float],
) -> None:
    answer = FakeResponse(503)
    cluster = FakeCluster([answer, FakeResponse(200)])
    req = request("POST", replayable=False)
    assert await call(cluster)(req) is answer
    assert req.attempts == 1
    cluster = FakeCluster([ConnectionReset("reset mid-request", sent=True), FakeResponse(200)])
    with pytest.raises(ConnectionReset):
        await call(cluster)(request("POST", replayable=False))
    assert cluster.calls == 1


async def test_non_replayable_request_is_retried_when_nothing_was_sent(
    waits: list[float],
) -> None:
    ok = FakeResponse(201)
    cluster = FakeCluster([ConnectFailure("refused"), ok])
    req = request("POST", replayable=False)
    assert await call(cluster)(req) is ok
    assert req.attempts == 2


async def test_post_whose_idempotency_key_is_held_is_retried_after_a_retryable_answer(
    waits: list[float],
) -> None:
    ok = FakeResponse(201)
    cluster = FakeCluster([FakeResponse(503), ok])
    keyed = UpstreamRequest("POST", "/x", [], b"{}", keyed=True)
    assert await call(cluster)(keyed) is ok


@pytest.mark.parametrize(
    "failure",
    [ConnectionReset("reset after sending", sent=True), UpstreamTimeout("slow", sent=True)],
)
async def test_post_whose_key_is_held_is_never_resent_after_an_ambiguous_failure(
    waits: list[float], failure: Exception
) -> None:
    # The upstream may have executed it: idempotency keeps the outcome unknown instead.
    cluster = FakeCluster([failure, FakeResponse(201)])
    keyed = UpstreamRequest("POST", "/x", [], b"{}", keyed=True)
    with pytest.raises(type(failure)):
        await call(cluster, retry_on=["reset", "timeout", "503"])(keyed)
    assert cluster.calls == 1


async def test_only_listed_conditions_are_retried(waits: list[float]) -> None:
    cluster = FakeCluster([FakeResponse(500), FakeResponse(200)])
    assert (await call(cluster)(request())).status == 500  # 500 is not in the default list
    cluster = FakeCluster([UpstreamTimeout("slow", sent=True), FakeResponse(200)])
    with pytest.raises(UpstreamTimeout):  # nor is a timeout
        await call(cluster)(request())
    cluster = FakeCluster([UpstreamTimeout("slow", sent=True), FakeResponse(200)])
    result = await call(cluster, retry_on=["timeout", "5xx"])(request())
    assert result.status == 200


def test_backoff_is_full_jitter_capped_at_max_delay() -> None:
    random.seed(3)
    policy = RetryPolicy(Retry(base_delay="100ms", max_delay="1s"))
    for retry, ceiling in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (30, 1.0)]:
        samples = [policy.backoff(retry) for _ in range(500)]
        assert all(0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.9 and min(samples) < ceiling * 0.1  # spread out


async def test_retry_after_is_honoured(waits: list[float]) -> None:
    cluster = FakeCluster([FakeResponse(503, [(b"retry-after", b"2")]), FakeResponse(200)])
    result = await call(cluster, max_delay="2s", timeout="5s")(request())
    assert result.status == 200
    assert waits == [2.0]


async def test_retry_after_past_the_deadline_returns_the_answer_at_once(
    waits: list[float],
) -> None:
    answer = FakeResponse(503, [(b"retry-after", b"2")])
    cluster = FakeCluster([answer, FakeResponse(200)])
    assert await call(cluster, timeout="1s")(request()) is answer
    assert waits == [] and cluster.calls == 1
    # Without an overall timeout, max_delay is the longest wait accepted.
    answer = FakeResponse(503, [(b"retry-after", b"120")])
    cluster = FakeCluster([answer, FakeResponse(200)])
    assert await call(cluster, max_delay="2s")(request()) is answer


async def test_overall_timeout_caps_each_try_and_stops_retries_that_cannot_finish() -> None:
    cluster = FakeCluster([FakeResponse(503) for _ in range(10)])
    started = time.monotonic()
    result = await call(
        cluster, max_attempts=10, per_try_timeout="3s", timeout="200ms", base_delay="40ms"
    )(request())
    elapsed = time.monotonic() - started
    assert result.status == 503
    assert elapsed < 0.2  # real backoff sleeps, none started that would pass the deadline
    assert cluster.calls >= 2
    assert all(t is not None and t <= 0.2 for t in cluster.timeouts)
    assert cluster.timeouts == sorted(cluster.timeouts, reverse=True)  # what is left shrinks


async def test_per_try_timeout_is_passed_to_each_attempt(waits: list[float]) -> None:
    cluster = FakeCluster([FakeResponse(503), FakeResponse(200)])
    await call(cluster, per_try_timeout="250ms")(request())
    assert cluster.timeouts == [0.25, 0.25]


async def test_spent_budget_stops_retries(waits: list[float]) -> None:
    config = Retry(budget={"ratio": 0, "min_per_second": 0.1, "window": "10s"})
    budget = RetryBudget(config.budget)  # exactly one retry in the window
    cluster = FakeCluster([FakeResponse(503), FakeResponse(200), FakeResponse(503)])
    retrying = RetryingCall(cluster, config, budget)  # type: ignore[arg-type]
    assert (await retrying(request())).status == 200
    assert (await retrying(request())).status == 503  # no budget left for this one
    assert cluster.calls == 3


async def test_open_circuit_on_the_first_attempt_is_a_503_with_retry_after(
    waits: list[float],
) -> None:
    cluster = FakeCluster([CircuitOpen("circuit open", 7)])
    with pytest.raises(UpstreamRejected) as caught:
        await call(cluster)(request())
    assert caught.value.status == 503
    assert caught.value.slug == "circuit-open"
    assert caught.value.headers == [(b"retry-after", b"7")]


async def test_circuit_opening_between_attempts_returns_the_last_answer_intact(
    waits: list[float],
) -> None:
    answer = FakeResponse(503)
    cluster = FakeCluster([answer, CircuitOpen("circuit open", 30)])
    assert await call(cluster)(request()) is answer
    assert not answer.closed and not answer.drained
    cluster = FakeCluster([ConnectFailure("refused"), CircuitOpen("circuit open", 30)])
    with pytest.raises(ConnectFailure):
        await call(cluster)(request())


async def test_held_response_is_closed_when_the_client_goes_away_during_backoff() -> None:
    answer = FakeResponse(503)
    cluster = FakeCluster([answer, FakeResponse(200)])
    random.seed(1)  # the first backoff is 0.67 s
    task = asyncio.ensure_future(call(cluster, base_delay="5s", max_delay="5s")(request()))
    for _ in range(5):
        await asyncio.sleep(0)
    assert cluster.calls == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert answer.closed


def test_retry_after_parsing() -> None:
    assert parse_retry_after(b"2") == 2.0
    assert parse_retry_after(None) is None
    assert parse_retry_after(b"soon") is None
    assert parse_retry_after(b"Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 28 <= (parse_retry_after(future.encode()) or 0) <= 31


# -- endpoint choice in a real cluster --------------------------------------------------


def three_endpoint_cluster(**breaker: object) -> Cluster:
    config = Upstream(
        urls=["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"],
        circuit_breaker={"failure_threshold": 1, "open_timeout": "30s", **breaker},
    )
    return Cluster("pick-test", config)


async def test_pick_round_robins_and_skips_endpoints_whose_circuit_is_open() -> None:
    cluster = three_endpoint_cluster()
    try:
        picked = [cluster.pick()[0] for _ in range(6)]
        assert picked == cluster.endpoints * 2
        first = cluster.endpoints[0]
        ticket = first.breaker.acquire()
        assert ticket is not None
        first.breaker.record(ticket, True)  # ejected
        picked = [cluster.pick()[0] for _ in range(4)]
        assert first not in picked
        assert set(picked) == set(cluster.endpoints[1:])
    finally:
        cluster.close()


async def test_pick_avoids_the_previous_endpoint_unless_it_is_the_only_one_left() -> None:
    cluster = three_endpoint_cluster()
    try:
        a, b, c = cluster.endpoints
        assert all(cluster.pick(avoid=a)[0] is not a for _ in range(6))
        for endpoint in (b, c):
            ticket = endpoint.breaker.acquire()
            assert ticket is not None
            endpoint.breaker.record(ticket, True)
        assert cluster.pick(avoid=a)[0] is a
    finally:
        cluster.close()


async def test_pick_raises_circuit_open_with_the_shortest_wait_when_all_are_open() -> None:
    cluster = three_endpoint_cluster()
    try:
        for endpoint in cluster.endpoints:
            ticket = endpoint.breaker.acquire()
            assert ticket is not None
            endpoint.breaker.record(ticket, True)
        with pytest.raises(CircuitOpen) as caught:
            cluster.pick()
        assert caught.value.retry_after == 30
        assert all(e.breaker.state == "open" for e in cluster.endpoints)
        assert cluster.endpoints[0].breaker.snapshot()["state"] == "open"
    finally:
        cluster.close()


def test_upstream_error_kinds_map_to_retry_reasons() -> None:
    policy = RetryPolicy(Retry(retry_on=["connect-failure", "5xx"]))
    assert policy.reason(ConnectFailure("x")) == "connect-failure"
    assert policy.reason(UpstreamError("garbage", sent=True)) == "protocol"
    assert policy.reason(ConnectionReset("x", sent=True)) is None
    assert policy.reason(FakeResponse(504)) == "504"
    assert policy.reason(FakeResponse(404)) is None


# -- configuration ------------------------------------------------------------------------


def test_status_codes_may_be_written_as_yaml_numbers() -> None:
    config = parse_config(
        "upstreams:\n  app:\n    url: http://127.0.0.1:3000\n"
        "    retry: {retry_on: [connect-failure, reset, 502, 503, 504]}\n"
        "    circuit_breaker: {failure_on: [timeout, 503]}\n",
        "f.yaml",
        {},
    )
    assert config.upstreams["app"].retry.retry_on == [
        "connect-failure",
        "reset",
        "502",
        "503",
        "504",
    ]
    assert config.upstreams["app"].circuit_breaker.failure_on == ["timeout", "503"]


def test_breaker_needs_a_consecutive_or_a_ratio_mode() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            "upstreams:\n  app:\n    url: http://127.0.0.1:3000\n"
            "    circuit_breaker: {failure_threshold: null}\n",
            "f.yaml",
            {},
        )
    assert "f.yaml: upstreams.app.circuit_breaker" in str(info.value)
    assert "failure_threshold: give it, failure_ratio, or both" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_config(
            "upstreams:\n  app:\n    url: http://127.0.0.1:3000\n    retry: {retry_on: [teapot]}\n",
            "f.yaml",
            {},
        )
    assert "unknown retry condition 'teapot'" in str(info.value)
