"""Cache stores: the memory LRU's byte bound, the Redis record format, Redis failures as misses."""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis

from proxy.config.schema import Store
from proxy.metrics import STORE_ERRORS
from proxy.store.cache import (
    CachedResponse,
    MemoryCacheStore,
    RedisCacheStore,
    VaryMarker,
    dumps,
    loads,
)
from proxy.store.redis_client import open_redis
from tests.support.processes import RedisServer, free_port


def entry(body: bytes = b"x", *, lifetime: float = 60.0) -> CachedResponse:
    now = time.time()
    return CachedResponse(
        200,
        [(b"content-type", b"text/plain"), (b"etag", b'"\xe9"')],
        body,
        stored_at=now,
        fresh_until=now + lifetime,
        stale_until=now + lifetime + 10,
        initial_age=3,
        vary=(b"accept",),
        vary_values=(b"text/html",),
        shared_auth=True,
    )


def test_records_survive_the_redis_encoding_byte_for_byte() -> None:
    original = entry(b"\x00\xffbinary body")
    assert loads(dumps(original)) == original
    marker = loads(dumps(VaryMarker((b"accept", b"accept-language"), 0.0)))
    assert isinstance(marker, VaryMarker)
    assert marker.names == (b"accept", b"accept-language")
    with pytest.raises(ValueError):
        loads(b"garbage")


async def test_memory_store_evicts_least_recently_used_to_stay_within_max_bytes() -> None:
    body = b"b" * 1000
    size = entry(body).size + len(b"k1") + 256
    store = MemoryCacheStore(max_bytes=size * 3)
    for key in (b"k1", b"k2", b"k3"):
        await store.set([(key, entry(body))])
    assert await store.get(b"k1") is not None  # k1 is now the most recently used
    await store.set([(b"k4", entry(body))])
    assert await store.get(b"k2") is None
    assert all([await store.get(k) for k in (b"k1", b"k3", b"k4")])
    assert store.used <= store.max_bytes
    store.resize(size)
    assert len(store) == 1 and store.used <= size


async def test_memory_store_refuses_an_entry_bigger_than_the_whole_cache() -> None:
    store = MemoryCacheStore(max_bytes=500)
    await store.set([(b"big", entry(b"x" * 1000))])
    assert await store.get(b"big") is None
    assert store.used == 0


async def test_memory_store_forgets_entries_past_their_stale_window() -> None:
    store = MemoryCacheStore(max_bytes=1 << 20)
    expired = entry(lifetime=-20.0)
    await store.set([(b"old", expired)])
    assert await store.get(b"old") is None
    assert store.used == 0


async def test_redis_store_round_trips_entries_with_a_ttl(redis_server: RedisServer) -> None:
    client = open_redis(Store(backend="redis", url=redis_server.url))
    try:
        store = RedisCacheStore(client, "test-store:")
        record = entry(b"hello")
        await store.set(
            [(b"GET h /p?", record), (b"marker", VaryMarker((b"accept",), record.stale_until))]
        )
        assert await store.get(b"GET h /p?") == record
        assert isinstance(await store.get(b"marker"), VaryMarker)
        ttl = await client.pttl(store.redis_key(b"GET h /p?"))
        assert 60_000 < ttl <= 70_000
    finally:
        await client.aclose()


async def test_redis_store_failures_are_misses_and_counted() -> None:
    client = open_redis(Store(backend="redis", url=f"redis://127.0.0.1:{free_port()}/0"))
    errors = STORE_ERRORS.labels("redis", "cache_get")
    before = errors._value.get()
    try:
        store = RedisCacheStore(client, "test-store:")
        await store.set([(b"k", entry())])  # must not raise
        assert await store.get(b"k") is None
        assert errors._value.get() == before + 1
    finally:
        await client.aclose()


async def test_redis_store_ignores_a_corrupt_record(redis_server: RedisServer) -> None:
    client: aioredis.Redis = open_redis(Store(backend="redis", url=redis_server.url))
    try:
        store = RedisCacheStore(client, "test-store:")
        await client.set(store.redis_key(b"corrupt"), b"E\x00\x00\x00\x05nope")
        assert await store.get(b"corrupt") is None
    finally:
        await client.aclose()
