"""Token-bucket state for rate limiting: in process (``memory``) or shared (``redis``).

The bucket is kept as GCRA (the generic cell rate algorithm): one "theoretical arrival
time" per key instead of a token count and a timestamp. It is the same token bucket
(capacity ``burst``, refill ``rate`` per second) with one number of state, so a memory
decision is a dict lookup and some arithmetic, and a Redis decision is one Lua script
(``EVALSHA``, atomic, timed by the Redis server's clock so replicas agree).

Written here rather than with the ``limits`` package: ``limits`` offers fixed, moving and
sliding windows but no token bucket, its async memory storage takes an ``asyncio.Lock``
per key and runs a background expiry task, and its Redis storage builds its own client;
the sidecar needs burst semantics, a lock-free O(1) memory path and the process's one
Redis pool.

A decision is ``(allowed, remaining, reset, retry_after)``: tokens left after this
request, seconds until the bucket is full again, and (when refused) seconds until one
token is available.
"""

from __future__ import annotations

import time

from proxy.store.redis_pipe import RedisPipe, Script

Decision = tuple[bool, int, float, float]

_EPSILON = 1e-9


class MemoryRateLimiter:
    """GCRA buckets in a dict (one replica). No locks: a decision never awaits."""

    def __init__(self, max_entries: int) -> None:
        self.tats: dict[str, float] = {}
        self.max_entries = max_entries

    def hit(self, key: str, interval: float, burst: int) -> Decision:
        """Take one token from ``key``'s bucket (``interval`` = 1/rate seconds)."""
        now = time.monotonic()
        tolerance = burst * interval
        tats = self.tats
        tat = tats.get(key, now)
        if tat < now:
            tat = now
        new_tat = tat + interval
        allow_at = new_tat - tolerance
        if allow_at > now + _EPSILON:
            return False, 0, tat - now, allow_at - now
        if len(tats) >= self.max_entries and key not in tats:
            self._evict(now)
        tats[key] = new_tat
        backlog = new_tat - now
        return True, int((tolerance - backlog) / interval + _EPSILON), backlog, 0.0

    def _evict(self, now: float) -> None:
        """Drop full buckets (same as absent); if still too many, the oldest tenth."""
        tats = self.tats
        for key in [k for k, tat in tats.items() if tat <= now]:
            del tats[key]
        excess = len(tats) - int(self.max_entries * 0.9)
        if excess > 0:
            for key in list(tats)[:excess]:
                del tats[key]


# KEYS[1] bucket; ARGV[1] interval (µs), ARGV[2] burst.
# Returns {allowed, remaining, reset µs, retry-after µs}.
_GCRA_LUA = """
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - tolerance
if allow_at > now then
  return {0, 0, tat - now, allow_at - now}
end
local backlog = new_tat - now
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil(backlog / 1000) + 1)
return {1, math.floor((tolerance - backlog) / interval), backlog, 0}
"""


class RedisRateLimiter:
    """GCRA buckets in Redis, one atomic script per decision (replicas share the limit).

    Runs over the process's multiplexed Redis connection; raises ``RedisUnavailable``
    (including timeouts, bounded by ``store.timeout``) or ``RedisReplyError``; the layer
    decides whether that fails open or closed.
    """

    def __init__(self, pipe: RedisPipe) -> None:
        self.pipe = pipe
        self.script = Script(_GCRA_LUA)

    async def hit(self, key: str, interval: float, burst: int) -> Decision:
        allowed, remaining, reset, retry = await self.script.run(
            self.pipe, key, max(1, round(interval * 1e6)), burst
        )
        return bool(allowed), int(remaining), reset / 1e6, retry / 1e6
