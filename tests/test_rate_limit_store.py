"""Token-bucket (GCRA) arithmetic of both rate-limit stores, with a controlled clock for
memory and a real redis-server for the Lua script."""

from __future__ import annotations

import asyncio

import pytest

from proxy.config.schema import Store
from proxy.store import rate_limit
from proxy.store.rate_limit import MemoryRateLimiter, RedisRateLimiter
from proxy.store.redis_client import open_redis
from proxy.store.redis_pipe import RedisPipe
from tests.support.processes import RedisServer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(rate_limit.time, "monotonic", fake)
    return fake


def test_a_full_bucket_allows_burst_then_refuses_with_the_wait_for_one_token(
    clock: Clock,
) -> None:
    limiter = MemoryRateLimiter(max_entries=100)
    decisions = [limiter.hit("k", 0.5, 4) for _ in range(5)]  # 2/s, burst 4
    assert [d[0] for d in decisions] == [True, True, True, True, False]
    assert [d[1] for d in decisions[:4]] == [3, 2, 1, 0]
    assert decisions[3][2] == pytest.approx(2.0)  # empty bucket: 2 s until full again
    allowed, remaining, reset, retry_after = decisions[4]
    assert (allowed, remaining) == (False, 0)
    assert retry_after == pytest.approx(0.5)
    assert reset == pytest.approx(2.0)


def test_tokens_come_back_at_the_configured_rate(clock: Clock) -> None:
    limiter = MemoryRateLimiter(max_entries=100)
    for _ in range(4):
        limiter.hit("k", 0.5, 4)
    clock.now += 0.49
    assert not limiter.hit("k", 0.5, 4)[0]
    clock.now += 0.02
    assert limiter.hit("k", 0.5, 4)[0]
    assert not limiter.hit("k", 0.5, 4)[0]
    clock.now += 60  # long idle: the bucket is full, never more than burst
    assert [limiter.hit("k", 0.5, 4)[0] for _ in range(5)] == [True] * 4 + [False]


def test_keys_have_separate_buckets(clock: Clock) -> None:
    limiter = MemoryRateLimiter(max_entries=100)
    assert limiter.hit("a", 1.0, 1)[0]
    assert not limiter.hit("a", 1.0, 1)[0]
    assert limiter.hit("b", 1.0, 1)[0]


def test_the_bucket_table_stays_bounded_dropping_full_buckets_first(clock: Clock) -> None:
    limiter = MemoryRateLimiter(max_entries=10)
    for i in range(10):
        limiter.hit(f"idle{i}", 0.1, 1)
    clock.now += 1  # all of those are full again (equivalent to absent)
    limiter.hit("busy", 10.0, 5)
    assert list(limiter.tats) == ["busy"]
    for i in range(50):
        limiter.hit(f"k{i}", 10.0, 5)
    assert len(limiter.tats) <= 10


async def test_redis_script_makes_the_same_decisions(redis_server: RedisServer) -> None:
    client = open_redis(Store(backend="redis", url=redis_server.url))
    pipe = RedisPipe(redis_server.url, 2.0)
    try:
        await client.delete("test-rl:k")
        limiter = RedisRateLimiter(pipe)
        decisions = [await limiter.hit("test-rl:k", 0.5, 4) for _ in range(5)]
        assert [d[0] for d in decisions] == [True, True, True, True, False]
        assert [d[1] for d in decisions[:4]] == [3, 2, 1, 0]
        allowed, remaining, reset, retry_after = decisions[4]
        assert not allowed and remaining == 0
        assert 0.3 < retry_after <= 0.5
        assert 1.5 < reset <= 2.0
        ttl = await client.pttl("test-rl:k")
        assert 0 < ttl <= 2100  # the key lives only while the bucket is not full
        await asyncio.sleep(0.6)
        assert (await limiter.hit("test-rl:k", 0.5, 4))[0]
    finally:
        pipe.close()
        await client.aclose()


async def test_redis_script_is_reloaded_after_a_script_flush(redis_server: RedisServer) -> None:
    client = open_redis(Store(backend="redis", url=redis_server.url))
    pipe = RedisPipe(redis_server.url, 2.0)
    try:
        limiter = RedisRateLimiter(pipe)
        await limiter.hit("test-rl:flush", 1.0, 10)
        await client.script_flush()  # what a Redis restart does to cached scripts
        assert (await limiter.hit("test-rl:flush", 1.0, 10))[0]
    finally:
        pipe.close()
        await client.aclose()
