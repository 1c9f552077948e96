"""Idempotency records in Redis, shared by every replica (and surviving their restarts).

One hash per record (``s`` state, ``o`` owner token, ``f`` fingerprint, ``l`` lease deadline
in Redis time, ``r`` payload) and one round trip per operation, each a Lua script so it is
atomic on the server:

* claim: create the pending record if absent, else return the existing one (so a replay
  costs a single round trip, and a pending record past its lease reads as ``unknown``,
  judged by the Redis clock so replicas with skewed clocks agree);
* finish / release: compare-and-set on the owner token.

Commands go through :class:`~proxy.store.redis_pipe.RedisPipe` (one pipelined connection,
see there why not redis-py on this hot path). Scripts run by ``EVALSHA``; after a Redis
restart emptied its script cache, the ``NOSCRIPT`` answer is followed by one ``EVAL`` that
reloads it. Every command is bounded by ``store.timeout``: a slow Redis is an unavailable
one.
"""

from __future__ import annotations

import time
from typing import Any

from proxy.metrics import STORE_DURATION, STORE_ERRORS
from proxy.store.idempotency import (
    Record,
    State,
    StoreUnavailable,
    decode_response,
    encode_response,
)
from proxy.store.redis_pipe import RedisPipe, RedisReplyError, RedisUnavailable, Script

_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = redis.call('HMGET', KEYS[1], 's', 'o', 'f', 'l', 'r')
if not cur[1] then
  redis.call('HSET', KEYS[1], 's', 'p', 'o', ARGV[1], 'f', ARGV[2], 'l', now + tonumber(ARGV[3]))
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return false
end
if cur[1] == 'p' and tonumber(cur[4]) <= now then cur[1] = 'u' end
return {cur[1], cur[2], cur[3], cur[5] or ''}
"""
_FINISH = """
if redis.call('HGET', KEYS[1], 'o') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 's', ARGV[2], 'r', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""
_RELEASE = """
if redis.call('HGET', KEYS[1], 'o') ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""

_STATE_CODE: dict[State, bytes] = {
    "pending": b"p",
    "done": b"d",
    "unknown": b"u",
    "not_replayable": b"n",
}
_CODE_STATE: dict[bytes, State] = {code: state for state, code in _STATE_CODE.items()}


class RedisIdempotencyStore:
    backend = "redis"

    def __init__(self, pipe: RedisPipe, key_prefix: str) -> None:
        self.pipe = pipe
        self.prefix = key_prefix + "idem:"
        self._claim = Script(_CLAIM)
        self._finish = Script(_FINISH)
        self._release = Script(_RELEASE)
        self._errors = {op: STORE_ERRORS.labels("redis", f"idempotency_{op}") for op in _OPS}
        self._durations = {op: STORE_DURATION.labels("redis", f"idempotency_{op}") for op in _OPS}

    async def claim(
        self, key: str, owner: str, fingerprint: str, lease: float, ttl: float
    ) -> Record | None:
        found = await self._run("claim", self._claim, key, owner, fingerprint, _ms(lease), _ms(ttl))
        if found is None:
            return None
        code, found_owner, found_fingerprint, payload = found
        if found_owner.decode() == owner:
            return None  # our own claim, seen again after a lost reply: it is ours
        state = _CODE_STATE[code]
        record = Record(state, found_fingerprint.decode(), found_owner.decode())
        if state == "done":
            return Record(state, record.fingerprint, record.owner, decode_response(payload))
        if state == "not_replayable":
            return Record(state, record.fingerprint, record.owner, status=int(payload or 0))
        return record

    async def finish(self, key: str, owner: str, record: Record, ttl: float) -> bool:
        if record.state == "done":
            assert record.response is not None
            payload = encode_response(record.response)
        elif record.state == "not_replayable":
            payload = str(record.status).encode()
        else:
            payload = b""
        code = _STATE_CODE[record.state]
        return bool(await self._run("finish", self._finish, key, owner, code, payload, _ms(ttl)))

    async def release(self, key: str, owner: str) -> bool:
        return bool(await self._run("release", self._release, key, owner))

    def close(self) -> None:
        self.pipe.close()

    async def _run(self, op: str, script: Script, key: str, *args: Any) -> Any:
        started = time.perf_counter()
        name = self.prefix + key
        try:
            result = await script.run(self.pipe, name, *args)
        except (RedisUnavailable, RedisReplyError) as exc:
            self._errors[op].inc()
            raise StoreUnavailable(f"redis {op} failed: {exc}") from exc
        self._durations[op].observe(time.perf_counter() - started)
        return result


_OPS = ("claim", "finish", "release")


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
