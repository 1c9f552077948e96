"""A retry budget: retries may add at most ``ratio`` of recent requests, plus a floor.

Per-request retry limits (``max_attempts``) do not stop retry storms: when an upstream
fails every request, three attempts each triple its load exactly when it can least take it.
A budget bounds the *extra* load instead, like Linkerd's (``retryRatio``,
``minRetriesPerSecond``, ``ttl``) and tower's ``TpsBudget``: within any ``window`` seconds,

    retries <= ratio * requests + min_per_second * window

so upstream attempts stay within ``(1 + ratio)`` of client requests plus the floor, which
keeps retries available to low-traffic routes. Counting is O(1) per request (a ring of
buckets, see :mod:`proxy.layers.window`) and local to the process.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from proxy.config.schema import RetryBudget as BudgetConfig
from proxy.layers.window import SlidingWindow


class RetryBudget:
    """Deposits one unit per request; a retry withdraws one if the balance allows."""

    __slots__ = ("_clock", "_floor", "_ratio", "_window")

    def __init__(self, config: BudgetConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ratio = config.ratio
        self._floor = config.min_per_second * config.window
        self._window = SlidingWindow(config.window)  # a: requests, b: retries

    def deposit(self) -> None:
        """Count one client request (its first attempt)."""
        self._window.add(self._clock(), 1, 0)

    def withdraw(self) -> bool:
        """May one more retry be sent now? Counts it when it may."""
        now = self._clock()
        window = self._window
        requests, retries = window.totals(now)
        if retries + 1 > self._ratio * requests + self._floor:
            return False
        window.add(now, 0, 1)
        return True

    def balance(self) -> float:
        """Retries still allowed in the current window (for introspection and tests)."""
        requests, retries = self._window.totals(self._clock())
        return self._ratio * requests + self._floor - retries
