"""The idempotency store: one small interface, a ``memory`` and a ``redis`` implementation.

A record lives under one id (the scoped key, hashed) and moves through these states:

``pending``         claimed by one request (``owner``) that is executing it; after its lease
                    runs out without completion it reads as ``unknown`` (the owner may have
                    crashed after the upstream executed it), never as free
``done``            completed: holds the response to replay
``unknown``         the upstream may or may not have executed it (timeout or reset after
                    sending): answered with a 409 problem until the TTL, never re-forwarded
``not_replayable``  executed, but the response could not be kept (too large, cut short)

A claim is atomic: exactly one caller gets ``None`` (it owns the record); everyone else gets
the existing record. Completion and release are compare-and-set on the owner token, so a
late or duplicate writer can never overwrite another request's record.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from proxy.config.schema import Store
    from proxy.store.redis_pipe import RedisPipe
    from proxy.types import Headers

State = Literal["pending", "done", "unknown", "not_replayable"]


class StoreUnavailable(Exception):
    """The store failed or timed out: the caller decides whether to fail open or closed."""


@dataclass(slots=True, frozen=True)
class StoredResponse:
    """An upstream answer as the client saw it (end-to-end headers only)."""

    status: int
    headers: Headers
    body: bytes


@dataclass(slots=True, frozen=True)
class Record:
    """What a claim found under an id."""

    state: State
    fingerprint: str
    owner: str = ""
    response: StoredResponse | None = None  # when done
    status: int = 0  # when not_replayable: the status the first client got


class IdempotencyStore(Protocol):
    backend: str

    async def claim(
        self, key: str, owner: str, fingerprint: str, lease: float, ttl: float
    ) -> Record | None:
        """Take ``key`` for ``owner`` (None), or return the record already there."""

    async def finish(self, key: str, owner: str, record: Record, ttl: float) -> bool:
        """Replace ``owner``'s pending claim by ``record`` kept for ``ttl`` seconds."""

    async def release(self, key: str, owner: str) -> bool:
        """Delete ``owner``'s claim: the request certainly never reached the upstream."""

    def close(self) -> None:
        """Let go of connections (process shutdown)."""


def open_idempotency_store(config: Store, pipe: RedisPipe | None) -> IdempotencyStore:
    """The store selected by ``store.backend`` (process-wide: it survives config reloads)."""
    if config.backend == "redis":
        from proxy.store.idempotency_redis import RedisIdempotencyStore

        assert pipe is not None
        return RedisIdempotencyStore(pipe, config.key_prefix)
    from proxy.store.idempotency_memory import MemoryIdempotencyStore

    return MemoryIdempotencyStore(config.max_entries)


_HEAD = struct.Struct(">HH")  # status, header count
_FIELD = struct.Struct(">HI")  # name length, value length


def encode_response(response: StoredResponse) -> bytes:
    """status, headers and body in one compact binary string."""
    parts = [_HEAD.pack(response.status, len(response.headers))]
    for name, value in response.headers:
        parts += (_FIELD.pack(len(name), len(value)), name, value)
    parts.append(response.body)
    return b"".join(parts)


def decode_response(data: bytes) -> StoredResponse:
    status, count = _HEAD.unpack_from(data)
    offset = _HEAD.size
    headers: Headers = []
    for _ in range(count):
        name_len, value_len = _FIELD.unpack_from(data, offset)
        offset += _FIELD.size
        name = data[offset : offset + name_len]
        offset += name_len
        headers.append((name, data[offset : offset + value_len]))
        offset += value_len
    return StoredResponse(status, headers, data[offset:])
