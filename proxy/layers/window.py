"""A sliding time window of two counters, kept in a ring of buckets: O(1) per event.

Used by the retry budget (requests, retries) and the circuit breaker's failure-ratio mode
(calls, failures). The window slides one bucket at a time, so totals cover between
``window - window/buckets`` and ``window`` seconds of history; that granularity is the
price of constant-time updates and constant memory, the same trade-off Linkerd's and
tower's retry budgets make.
"""

from __future__ import annotations


class SlidingWindow:
    """Two event counts over the last ``window`` seconds of a caller-supplied clock."""

    __slots__ = ("_a", "_b", "_newest", "_size", "_width", "total_a", "total_b")

    def __init__(self, window: float, buckets: int = 10) -> None:
        self._size = buckets
        self._width = max(window, 1e-3) / buckets
        self._a = [0] * buckets
        self._b = [0] * buckets
        self._newest: int | None = None
        self.total_a = 0
        self.total_b = 0

    def _advance(self, now: float) -> int:
        """Expire buckets older than the window; return the current bucket's slot."""
        index = int(now / self._width)
        newest = self._newest
        if newest is None:
            self._newest = index
        elif index > newest:
            a, b, size = self._a, self._b, self._size
            for step in range(1, min(index - newest, size) + 1):
                slot = (newest + step) % size
                self.total_a -= a[slot]
                self.total_b -= b[slot]
                a[slot] = 0
                b[slot] = 0
            self._newest = index
        else:
            index = newest  # same bucket (or a clock step backwards: stay put)
        return index % self._size

    def add(self, now: float, a: int = 0, b: int = 0) -> None:
        slot = self._advance(now)
        self._a[slot] += a
        self._b[slot] += b
        self.total_a += a
        self.total_b += b

    def totals(self, now: float) -> tuple[int, int]:
        self._advance(now)
        return self.total_a, self.total_b

    def clear(self) -> None:
        self._a = [0] * self._size
        self._b = [0] * self._size
        self.total_a = 0
        self.total_b = 0
