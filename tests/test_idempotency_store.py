"""The idempotency store contract, proven on both backends (memory and a real redis-server)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from proxy.metrics import STORE_ERRORS
from proxy.store.idempotency import IdempotencyStore, Record, StoredResponse, StoreUnavailable
from proxy.store.idempotency_memory import MemoryIdempotencyStore
from proxy.store.idempotency_redis import (
    RedisIdempotencyStore,
    decode_response,
    encode_response,
)
from proxy.store.redis_pipe import RedisPipe
from tests.support.processes import RedisServer, free_port

RESPONSE = StoredResponse(
    201,
    [(b"content-type", b"application/json"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")],
    b'{"id": 7}\x00\xff binary tail',
)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[IdempotencyStore]:
    if request.param == "memory":
        yield MemoryIdempotencyStore(max_entries=1000)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    store = RedisIdempotencyStore(RedisPipe(server.url, 2.0), f"test-{uuid.uuid4().hex}:")
    yield store
    store.close()


async def test_exactly_one_of_many_concurrent_claims_wins(store: IdempotencyStore) -> None:
    results = await asyncio.gather(
        *(store.claim("k", f"owner{i}", "fp", lease=30, ttl=60) for i in range(50))
    )
    winners = [r for r in results if r is None]
    assert len(winners) == 1
    losers = [r for r in results if r is not None]
    assert all(r.state == "pending" and r.fingerprint == "fp" for r in losers)


async def test_finished_response_is_returned_to_later_claims(store: IdempotencyStore) -> None:
    assert await store.claim("k", "me", "fp", lease=30, ttl=60) is None
    assert await store.finish("k", "me", Record("done", "fp", response=RESPONSE), ttl=60)
    found = await store.claim("k", "other", "fp", lease=30, ttl=60)
    assert found is not None and found.state == "done" and found.fingerprint == "fp"
    assert found.response == RESPONSE


async def test_only_the_owner_can_finish_or_release(store: IdempotencyStore) -> None:
    assert await store.claim("k", "me", "fp", lease=30, ttl=60) is None
    assert not await store.finish("k", "intruder", Record("done", "fp", response=RESPONSE), 60)
    assert not await store.release("k", "intruder")
    found = await store.claim("k", "other", "fp", lease=30, ttl=60)
    assert found is not None and found.state == "pending"


async def test_released_key_can_be_claimed_again(store: IdempotencyStore) -> None:
    assert await store.claim("k", "me", "fp", lease=30, ttl=60) is None
    assert await store.release("k", "me")
    assert await store.claim("k", "next", "fp", lease=30, ttl=60) is None


async def test_claim_past_its_lease_reads_unknown_and_its_owner_can_still_finish(
    store: IdempotencyStore,
) -> None:
    assert await store.claim("k", "me", "fp", lease=0.05, ttl=60) is None
    await asyncio.sleep(0.2)
    found = await store.claim("k", "other", "fp", lease=30, ttl=60)
    assert found is not None and found.state == "unknown"  # never free: it may have executed
    assert await store.finish("k", "me", Record("done", "fp", response=RESPONSE), ttl=60)
    found = await store.claim("k", "other", "fp", lease=30, ttl=60)
    assert found is not None and found.state == "done"


async def test_records_expire_after_their_ttl(store: IdempotencyStore) -> None:
    assert await store.claim("k", "me", "fp", lease=30, ttl=60) is None
    assert await store.finish("k", "me", Record("done", "fp", response=RESPONSE), ttl=0.1)
    await asyncio.sleep(0.3)
    assert await store.claim("k", "next", "fp", lease=30, ttl=60) is None


async def test_unknown_and_not_replayable_records_keep_their_state(
    store: IdempotencyStore,
) -> None:
    assert await store.claim("a", "me", "fp", lease=30, ttl=60) is None
    assert await store.finish("a", "me", Record("unknown", "fp"), ttl=60)
    assert await store.claim("b", "me", "fp2", lease=30, ttl=60) is None
    assert await store.finish("b", "me", Record("not_replayable", "fp2", status=201), ttl=60)
    a = await store.claim("a", "x", "fp", lease=30, ttl=60)
    b = await store.claim("b", "x", "fp2", lease=30, ttl=60)
    assert a is not None and a.state == "unknown"
    assert b is not None and b.state == "not_replayable" and b.status == 201


async def test_memory_store_evicts_the_least_recently_used_beyond_its_bound() -> None:
    store = MemoryIdempotencyStore(max_entries=3)
    for key in ("a", "b", "c"):
        assert await store.claim(key, "me", "fp", lease=30, ttl=60) is None
    assert await store.claim("a", "x", "fp", lease=30, ttl=60) is not None  # touch a
    assert await store.claim("d", "me", "fp", lease=30, ttl=60) is None  # evicts b
    assert len(store) == 3
    assert await store.claim("b", "me", "fp", lease=30, ttl=60) is None
    assert await store.claim("a", "x", "fp", lease=30, ttl=60) is not None


async def test_redis_claim_retried_by_its_owner_is_still_its_own(redis_server) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    store = RedisIdempotencyStore(RedisPipe(redis_server.url, 2.0), f"test-{uuid.uuid4().hex}:")
    assert await store.claim("k", "me", "fp", lease=30, ttl=60) is None
    assert await store.claim("k", "me", "fp", lease=30, ttl=60) is None  # lost reply, retried
    found = await store.claim("k", "other", "fp", lease=30, ttl=60)
    assert found is not None and found.state == "pending"
    ttl_ms = await client.pttl(f"{store.prefix}k")
    assert 0 < ttl_ms <= 60_000  # pending records expire with the TTL, not the lease
    await client.aclose()
    store.close()


async def test_unreachable_redis_fails_within_the_store_timeout() -> None:
    store = RedisIdempotencyStore(RedisPipe(f"redis://127.0.0.1:{free_port()}/0", 0.3), "test:")
    before = STORE_ERRORS.labels("redis", "idempotency_claim")._value.get()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await store.claim("k", "me", "fp", lease=30, ttl=60)
    assert time.monotonic() - started < 5  # bounded (redis-py's own retries are cut short)
    assert STORE_ERRORS.labels("redis", "idempotency_claim")._value.get() == before + 1


async def test_redis_store_works_again_after_a_redis_restart(own_redis: RedisServer) -> None:
    store = RedisIdempotencyStore(RedisPipe(own_redis.url, 1.0), "test:")
    assert await store.claim("before", "me", "fp", lease=30, ttl=60) is None
    own_redis.kill()
    with pytest.raises(StoreUnavailable):
        await store.claim("during", "me", "fp", lease=30, ttl=60)
    own_redis.start()  # empty: scripts are gone too, and get reloaded transparently
    assert await store.claim("after", "me", "fp", lease=30, ttl=60) is None
    assert await store.finish("after", "me", Record("done", "fp", response=RESPONSE), 60)
    found = await store.claim("after", "x", "fp", lease=30, ttl=60)
    assert found is not None and found.response == RESPONSE
    store.close()


def test_response_codec_round_trips_headers_and_binary_bodies() -> None:
    assert decode_response(encode_response(RESPONSE)) == RESPONSE
    empty = StoredResponse(204, [], b"")
    assert decode_response(encode_response(empty)) == empty
