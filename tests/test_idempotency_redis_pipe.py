"""The pipelined Redis connection behind the idempotency store, against real redis-servers."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from proxy.store.redis_pipe import RedisPipe, RedisReplyError, RedisUnavailable, encode_command
from tests.support.processes import (
    Process,
    RedisServer,
    free_port,
    redis_server_binary,
    wait_for_port,
)


async def test_concurrent_commands_from_many_tasks_each_get_their_own_reply(
    redis_server: RedisServer,
) -> None:
    pipe = RedisPipe(redis_server.url, 2.0)
    prefix = uuid.uuid4().hex

    async def roundtrip(i: int) -> bytes:
        await pipe.execute("SET", f"{prefix}:{i}", f"value-{i}")
        return await pipe.execute("GET", f"{prefix}:{i}")

    replies = await asyncio.gather(*(roundtrip(i) for i in range(500)))
    assert replies == [f"value-{i}".encode() for i in range(500)]
    assert await pipe.execute("EVAL", "return {1, 'two', false}", 0) == [1, b"two", None]
    pipe.close()


async def test_error_replies_raise_without_desynchronising_later_commands(
    redis_server: RedisServer,
) -> None:
    pipe = RedisPipe(redis_server.url, 2.0)
    results = await asyncio.gather(
        pipe.execute("PING"),
        pipe.execute("NOSUCHCOMMAND"),
        pipe.execute("ECHO", b"\x00binary\r\n"),
        return_exceptions=True,
    )
    assert results[0] == b"PONG"
    assert isinstance(results[1], RedisReplyError) and "unknown command" in str(results[1])
    assert results[2] == b"\x00binary\r\n"
    pipe.close()


async def test_a_cancelled_callers_reply_is_discarded_and_the_next_gets_its_own(
    redis_server: RedisServer,
) -> None:
    pipe = RedisPipe(redis_server.url, 5.0)
    blocked = asyncio.ensure_future(pipe.execute("BLPOP", f"empty-{uuid.uuid4().hex}", "0.3"))
    await asyncio.sleep(0.05)
    blocked.cancel()
    assert await pipe.execute("ECHO", "mine") == b"mine"  # queued behind the BLPOP's nil
    pipe.close()


async def test_a_reply_past_the_timeout_fails_waiters_and_the_next_command_reconnects(
    redis_server: RedisServer,
) -> None:
    pipe = RedisPipe(redis_server.url, 0.2)
    stuck = pipe.execute("BLPOP", f"empty-{uuid.uuid4().hex}", "2")
    behind = pipe.execute("PING")
    results = await asyncio.gather(stuck, behind, return_exceptions=True)
    assert all(isinstance(r, RedisUnavailable) for r in results)
    assert await pipe.execute("PING") == b"PONG"
    pipe.close()


async def test_unreachable_redis_is_unavailable_and_recovers_when_it_listens() -> None:
    server = RedisServer(port=free_port())
    pipe = RedisPipe(server.url, 0.5)
    with pytest.raises(RedisUnavailable):
        await pipe.execute("PING")
    server.start()
    try:
        assert await pipe.execute("PING") == b"PONG"
        server.restart()
        # The command caught on the dead connection fails; the next one reconnects.
        replies = [await _ping_or_error(pipe) for _ in range(2)]
        assert replies[-1] == b"PONG"
    finally:
        pipe.close()
        server.kill()


async def _ping_or_error(pipe: RedisPipe) -> object:
    try:
        return await pipe.execute("PING")
    except RedisUnavailable as exc:
        return exc


async def test_password_and_database_from_the_url_are_used() -> None:
    port = free_port()
    server = Process(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--requirepass", "s3cret"],
        name="redis-auth",
    ).start()  # fmt: skip
    try:
        wait_for_port(port, server.proc)
        pipe = RedisPipe(f"redis://:s3cret@127.0.0.1:{port}/3", 2.0)
        await pipe.execute("SET", "where", "db3")
        check = aioredis.Redis.from_url(f"redis://:s3cret@127.0.0.1:{port}/3")
        assert await check.get("where") == b"db3"
        await check.aclose()
        pipe.close()
        wrong = RedisPipe(f"redis://:nope@127.0.0.1:{port}/0", 2.0)
        with pytest.raises((RedisReplyError, RedisUnavailable)):
            await wrong.execute("PING")
    finally:
        server.kill()


def test_commands_are_encoded_as_resp_bulk_strings() -> None:
    assert (
        encode_command(("SET", b"k\r\n", 42)) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n42\r\n"
    )
