"""Coarse timeouts for the hot path: arming and cancelling are set operations.

A proxy arms a timeout on every upstream request and almost always cancels it. On uvloop,
``loop.call_later`` plus ``cancel`` costs about 2.2 µs (a libuv timer per handle), a few
per cent of a proxied request. Here a timeout goes into the bucket of its deadline rounded
up to ``resolution``, and one loop timer, running only while timeouts are pending, fires
each bucket when its time has come: a timeout fires up to ``resolution`` late, never early.
Buckets are sets, so a cancelled timeout is forgotten at once (no heap of dead entries).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("sidecar.timers")

RESOLUTION = 0.01  # seconds


class Timeout:
    """One pending timeout; :meth:`cancel` it when the awaited thing happened."""

    __slots__ = ("args", "bucket", "callback", "wheel")

    def __init__(
        self, wheel: TimerWheel, bucket: int, callback: Callable[..., Any], args: tuple[Any, ...]
    ) -> None:
        self.wheel = wheel
        self.bucket = bucket
        self.callback = callback
        self.args = args

    def cancel(self) -> None:
        pending = self.wheel.buckets.get(self.bucket)
        if pending is not None:
            pending.discard(self)
            if not pending:
                del self.wheel.buckets[self.bucket]


class TimerWheel:
    """Timeouts of one event loop, fired by a single ticker every ``resolution`` seconds."""

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float = RESOLUTION) -> None:
        self.loop = loop
        self.resolution = resolution
        self.buckets: dict[int, set[Timeout]] = {}
        self._next = 0  # the first bucket not fired yet
        self._ticker: asyncio.TimerHandle | None = None

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timeout:
        now = self.loop.time() / self.resolution
        bucket = int(now + delay / self.resolution) + 1
        timeout = Timeout(self, bucket, callback, args)
        pending = self.buckets.get(bucket)
        if pending is None:
            self.buckets[bucket] = {timeout}
        else:
            pending.add(timeout)
        if self._ticker is None:
            self._next = int(now)
            self._ticker = self.loop.call_later(self.resolution, self._tick)
        return timeout

    def _tick(self) -> None:
        now = int(self.loop.time() / self.resolution)
        buckets = self.buckets
        for bucket in range(self._next, now + 1):
            due = buckets.pop(bucket, None)
            if due:
                for timeout in due:
                    try:
                        timeout.callback(*timeout.args)
                    except Exception:  # one failing callback must not stop the others
                        logger.exception("timeout callback %r failed", timeout.callback)
        self._next = now + 1
        self._ticker = self.loop.call_later(self.resolution, self._tick) if buckets else None

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        self.buckets.clear()


def expire(waiter: asyncio.Future[Any]) -> None:
    """A timeout callback: fail ``waiter`` with ``TimeoutError`` unless it is done."""
    if not waiter.done():
        waiter.set_exception(TimeoutError())


_wheels: dict[asyncio.AbstractEventLoop, TimerWheel] = {}


def wheel_for(loop: asyncio.AbstractEventLoop) -> TimerWheel:
    """The loop's timer wheel (one per loop, created on first use)."""
    wheel = _wheels.get(loop)
    if wheel is None:
        if len(_wheels) > 8:  # loops of finished test runs: forget them
            for old in [old for old in _wheels if old.is_closed()]:
                del _wheels[old]
        wheel = _wheels[loop] = TimerWheel(loop)
    return wheel
