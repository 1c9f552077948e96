"""In-process idempotency records: a bounded LRU with per-record TTL, for one replica.

Hand-written (an ``OrderedDict``) because the claim must be atomic: on one event loop there
is no ``await`` between looking a key up and taking it, so two concurrent requests can never
both claim. Records are lost when the process restarts, and the least recently used record
is evicted beyond ``store.max_entries``: use the ``redis`` backend for several replicas or
for records that must survive restarts.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

from proxy.store.idempotency import Record


class _Entry:
    __slots__ = ("expires", "lease_until", "record")

    def __init__(self, record: Record, expires: float, lease_until: float) -> None:
        self.record = record
        self.expires = expires
        self.lease_until = lease_until


class MemoryIdempotencyStore:
    backend = "memory"

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def claim(
        self, key: str, owner: str, fingerprint: str, lease: float, ttl: float
    ) -> Record | None:
        now = self._clock()
        entries = self._entries
        self._sweep(now)
        entry = entries.get(key)
        if entry is None or entry.expires <= now:
            entries[key] = _Entry(Record("pending", fingerprint, owner), now + ttl, now + lease)
            entries.move_to_end(key)
            if len(entries) > self.max_entries:
                entries.popitem(last=False)
            return None
        entries.move_to_end(key)
        record = entry.record
        if record.state == "pending" and entry.lease_until <= now:
            return replace(record, state="unknown")  # abandoned: its owner may have executed it
        return record

    async def finish(self, key: str, owner: str, record: Record, ttl: float) -> bool:
        entry = self._owned(key, owner)
        if entry is None:
            return False
        entry.record = replace(record, owner=owner)
        entry.expires = self._clock() + ttl
        return True

    async def release(self, key: str, owner: str) -> bool:
        if self._owned(key, owner) is None:
            return False
        del self._entries[key]
        return True

    def close(self) -> None:
        self._entries.clear()

    def _owned(self, key: str, owner: str) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None or entry.record.owner != owner:
            return None
        if entry.expires <= self._clock():
            return None
        return entry

    def _sweep(self, now: float) -> None:
        """Drop a few expired records from the cold end: amortised, no background task."""
        entries = self._entries
        for _ in range(2):
            if not entries:
                return
            key, entry = next(iter(entries.items()))
            if entry.expires > now:
                return
            del entries[key]
