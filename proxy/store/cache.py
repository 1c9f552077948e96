"""Where cached responses live: an in-process LRU bounded by bytes, or Redis.

A key maps to a :class:`CachedResponse` or, for responses with ``Vary``, to a
:class:`VaryMarker` naming the request headers whose values pick the variant (stored under
a second key). Entries expire when their stale window ends.

The Redis store never raises: an error or a timeout (``store.timeout``) is counted in
``sidecar_store_errors_total`` and behaves as a miss (reads) or as nothing (writes), so a
Redis outage costs cache hits, never requests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import redis.asyncio as aioredis

from proxy.metrics import STORE_DURATION, STORE_ERRORS
from proxy.store.redis_client import STORE_FAILURES
from proxy.types import Headers

logger = logging.getLogger("sidecar.cache")

_ENTRY_OVERHEAD = 256  # bytes of bookkeeping counted per memory entry
_STORE_FAILURES = (*STORE_FAILURES, ValueError)


@dataclass(slots=True)
class CachedResponse:
    """A stored response and the times that govern its reuse (wall clock, seconds)."""

    status: int
    headers: Headers  # end-to-end headers as first sent (no Age, X-Request-ID, X-Cache)
    body: bytes
    stored_at: float
    fresh_until: float
    stale_until: float
    initial_age: int
    vary: tuple[bytes, ...] = ()  # request header names the response varies on
    vary_values: tuple[bytes, ...] = ()  # their values in the request that produced it
    shared_auth: bool = False  # may answer requests that carry Authorization

    def age(self, now: float) -> int:
        return self.initial_age + max(0, int(now - self.stored_at))

    @property
    def expires(self) -> float:
        return self.stale_until

    @property
    def size(self) -> int:
        return len(self.body) + sum(len(n) + len(v) + 16 for n, v in self.headers)


@dataclass(slots=True)
class VaryMarker:
    """Stored under the primary key of a response that has ``Vary``."""

    names: tuple[bytes, ...]
    expires: float
    size = 64


Record = CachedResponse | VaryMarker


def dumps(record: Record) -> bytes:
    """Redis value: ``E`` + 4-byte meta length + JSON meta + body, or ``V`` + JSON names."""
    if isinstance(record, VaryMarker):
        return b"V" + json.dumps([n.decode("latin-1") for n in record.names]).encode()
    meta = json.dumps(
        [
            record.status,
            [[n.decode("latin-1"), v.decode("latin-1")] for n, v in record.headers],
            record.stored_at,
            record.fresh_until,
            record.stale_until,
            record.initial_age,
            [n.decode("latin-1") for n in record.vary],
            [v.decode("latin-1") for v in record.vary_values],
            record.shared_auth,
        ],
        separators=(",", ":"),
    ).encode()
    return b"E" + len(meta).to_bytes(4, "big") + meta + record.body


def loads(data: bytes, expires: float = 0.0) -> Record:
    """The inverse of :func:`dumps`; raises ``ValueError`` on anything malformed."""
    kind = data[:1]
    if kind == b"V":
        return VaryMarker(tuple(n.encode("latin-1") for n in json.loads(data[1:])), expires)
    if kind != b"E" or len(data) < 5:
        raise ValueError("not a cache record")
    length = int.from_bytes(data[1:5], "big")
    status, headers, stored, fresh, stale, age, vary, values, auth = json.loads(
        data[5 : 5 + length]
    )
    return CachedResponse(
        int(status),
        [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers],
        data[5 + length :],
        float(stored),
        float(fresh),
        float(stale),
        int(age),
        tuple(n.encode("latin-1") for n in vary),
        tuple(v.encode("latin-1") for v in values),
        bool(auth),
    )


class MemoryCacheStore:
    """LRU of records bounded by their total size in bytes (one per cached route)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._items: OrderedDict[bytes, tuple[Record, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    async def get(self, key: bytes) -> Record | None:
        item = self._items.get(key)
        if item is None:
            return None
        record = item[0]
        if record.expires <= time.time():
            self._remove(key)
            return None
        self._items.move_to_end(key)
        return record

    async def set(self, items: list[tuple[bytes, Record]]) -> None:
        for key, record in items:
            size = record.size + len(key) + _ENTRY_OVERHEAD
            if key in self._items:
                self._remove(key)
            if size > self.max_bytes:
                continue
            self._items[key] = (record, size)
            self.used += size
        while self.used > self.max_bytes and self._items:
            self._remove(next(iter(self._items)))

    def resize(self, max_bytes: int) -> None:
        """Apply a reloaded ``max_bytes``, evicting the least recently used if smaller."""
        self.max_bytes = max_bytes
        while self.used > self.max_bytes and self._items:
            self._remove(next(iter(self._items)))

    def _remove(self, key: bytes) -> None:
        _, size = self._items.pop(key)
        self.used -= size


class RedisCacheStore:
    """Records in Redis under ``{key_prefix}cache:{hash of the key}``, expiring by TTL."""

    def __init__(self, client: aioredis.Redis, key_prefix: str) -> None:
        self.client = client
        self.prefix = f"{key_prefix}cache:".encode()
        self._get_errors = STORE_ERRORS.labels("redis", "cache_get")
        self._set_errors = STORE_ERRORS.labels("redis", "cache_set")
        self._get_duration = STORE_DURATION.labels("redis", "cache_get")
        self._set_duration = STORE_DURATION.labels("redis", "cache_set")
        self._last_warning = 0.0

    def redis_key(self, key: bytes) -> bytes:
        return self.prefix + hashlib.blake2b(key, digest_size=20).hexdigest().encode()

    async def get(self, key: bytes) -> Record | None:
        start = time.perf_counter()
        try:
            data = await self.client.get(self.redis_key(key))
            if data is None:
                return None
            record = loads(data, expires=time.time() + 1.0)
        except _STORE_FAILURES as exc:
            self._get_errors.inc()
            self._warn("read", exc)
            return None
        finally:
            self._get_duration.observe(time.perf_counter() - start)
        if record.expires <= time.time() and isinstance(record, CachedResponse):
            return None
        return record

    async def set(self, items: list[tuple[bytes, Record]]) -> None:
        start = time.perf_counter()
        now = time.time()
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, record in items:
                ttl_ms = max(1, int((record.expires - now) * 1000))
                pipe.set(self.redis_key(key), dumps(record), px=ttl_ms)
            await pipe.execute()
        except _STORE_FAILURES as exc:
            self._set_errors.inc()
            self._warn("write", exc)
        finally:
            self._set_duration.observe(time.perf_counter() - start)

    def _warn(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_warning > 10.0:
            self._last_warning = now
            logger.warning(
                "cache store %s failed (%s: %s); serving as a miss",
                what,
                exc.__class__.__name__,
                exc,
            )
