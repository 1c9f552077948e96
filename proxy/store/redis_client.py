"""The one Redis connection pool of the process (redis-py asyncio with hiredis).

Every operation is bounded by ``store.timeout``: a slow Redis is a failing Redis, and the
features decide what that means (idempotency fails closed, rate limiting fails open).
After Redis restarts, redis-py reconnects on the next command, so no sidecar restart is
needed.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.config.schema import Store

# What a failing Redis raises through redis-py: its own errors, socket errors, timeouts, and
# RuntimeError from uvloop when a command meets a transport closed under it.
STORE_FAILURES: tuple[type[BaseException], ...] = (
    RedisError,
    OSError,
    asyncio.TimeoutError,
    RuntimeError,
)


def open_redis(config: Store) -> aioredis.Redis:
    """A client for ``config.url`` whose every command times out after ``config.timeout``."""
    assert config.url
    return aioredis.Redis.from_url(
        config.url,
        socket_timeout=config.timeout,
        socket_connect_timeout=config.timeout,
        retry_on_timeout=False,
        health_check_interval=0,
        max_connections=256,
        decode_responses=False,
    )
