"""A circuit breaker per upstream endpoint: closed → open → half-open → closed.

* **closed**: every call passes. ``failure_threshold`` consecutive failures open it; so does a
  failure share of at least ``failure_ratio`` over the sliding ``window`` once it holds
  ``min_requests`` calls (resilience4j's count + rate modes).
* **open**: calls fail fast (no upstream traffic) for ``open_timeout``; then half-open.
* **half-open**: at most ``half_open_max_requests`` probes are in flight at once; everyone
  else still fails fast. ``success_threshold`` successful probes close it; one failed probe
  re-opens it for another ``open_timeout``. A probe that has not finished within
  ``probe_timeout`` (the longest an attempt can take) counts as failed, so a hung probe can
  never leave the breaker stuck half-open.

What counts as a failure is ``failure_on``: ``connect-failure``, ``reset``, ``timeout``,
``5xx`` or individual status codes (a malformed response counts as the 502 it becomes).

Why hand-written rather than pybreaker/aiobreaker/purgatory: those wrap a function and count
its exceptions, while a proxy must classify HTTP outcomes (a 503 is a response, not an
exception), bound concurrent half-open probes, ignore late results from an earlier state, and
cost next to nothing per request. Time comes from an injectable clock, so the state machine
is tested without sleeping; an optional scheduler (``loop.call_later``) makes time-driven
transitions happen on time for metrics and logs, and without one they happen lazily.

State is per process, like Envoy's outlier detection: see the README's "Circuit breaker".
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

from proxy.config.schema import CircuitBreaker as BreakerConfig
from proxy.layers.window import SlidingWindow
from proxy.metrics import BREAKER_STATE, BREAKER_TRANSITIONS

logger = logging.getLogger("sidecar.circuit_breaker")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
_GAUGE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}

Clock = Callable[[], float]

# The breaker that owns each (upstream, endpoint) state gauge: the newest one. After a reload
# the replaced breaker may still see in-flight results, but must not overwrite the gauge.
_GAUGE_OWNER: dict[tuple[str, str], CircuitBreaker] = {}


class Cancellable(Protocol):
    def cancel(self) -> None: ...


Scheduler = Callable[[float, Callable[[], None]], Cancellable]


class CircuitOpen(Exception):
    """No endpoint would take the call; ``retry_after`` is the wait until one might."""

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


def failure_statuses(failure_on: list[str]) -> frozenset[int]:
    """The response statuses ``failure_on`` (or ``retry_on``) names, ``5xx`` expanded."""
    statuses: set[int] = set()
    for item in failure_on:
        if item == "5xx":
            statuses.update(range(500, 600))
        elif item.isdigit():
            statuses.add(int(item))
    return frozenset(statuses)


def failure_kinds(failure_on: list[str]) -> frozenset[str]:
    """The upstream error kinds ``failure_on`` (or ``retry_on``) names.

    A malformed response (kind ``protocol``) is answered 502, so it is included whenever
    ``5xx`` or ``502`` is.
    """
    kinds = {item for item in failure_on if item in ("connect-failure", "reset", "timeout")}
    if "5xx" in failure_on or "502" in failure_on:
        kinds.add("protocol")
    return frozenset(kinds)


class CircuitBreaker:
    """The breaker of one endpoint. Call :meth:`acquire` before an attempt and hand its
    ticket to :meth:`record` (or :meth:`release` if the attempt was abandoned)."""

    __slots__ = (
        "_clock", "_closed_ticket", "_config", "_consecutive", "_gauge", "_labels",
        "_opened_wall", "_probes", "_schedule", "_seq", "_shut", "_state", "_successes",
        "_timer", "_until", "_wall", "_window", "enabled", "error_kinds", "name",
        "probe_timeout", "statuses",
    )  # fmt: skip

    def __init__(
        self,
        config: BreakerConfig,
        *,
        upstream: str,
        endpoint: str,
        probe_timeout: float,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        schedule: Scheduler | None = None,
    ) -> None:
        self._config = config
        self.enabled = config.enabled
        self.name = f"{upstream} {endpoint}"
        self.probe_timeout = probe_timeout
        self.statuses = failure_statuses(config.failure_on)
        self.error_kinds = failure_kinds(config.failure_on)
        self._clock = clock
        self._wall = wall_clock
        self._schedule = schedule
        self._labels = (upstream, endpoint)
        self._gauge = BREAKER_STATE.labels(upstream, endpoint)
        self._gauge.set(0)
        _GAUGE_OWNER[self._labels] = self
        self._state = CLOSED
        self._seq = 1
        self._closed_ticket = 1  # tickets from an earlier closed period are ignored
        self._consecutive = 0
        self._successes = 0
        self._probes: dict[int, float] = {}  # ticket -> start time
        self._until = 0.0  # open: when it turns half-open
        self._opened_wall: float | None = None
        self._window = SlidingWindow(config.window) if config.failure_ratio else None
        self._timer: Cancellable | None = None
        self._shut = False

    # -- the hot path --------------------------------------------------------------------
    def acquire(self) -> int | None:
        """A ticket for one attempt, or ``None`` when the circuit refuses it."""
        if self._state is CLOSED:
            return self._closed_ticket
        now = self._clock()
        self._refresh(now)
        state = self._state
        if state is CLOSED:
            return self._closed_ticket
        if state is OPEN or len(self._probes) >= self._config.half_open_max_requests:
            return None
        self._seq += 1
        ticket = self._seq
        self._probes[ticket] = now
        if self._timer is None:
            self._arm(now)
        return ticket

    def record(self, ticket: int, failed: bool) -> None:
        """The outcome of the attempt ``ticket`` was admitted for."""
        if not self.enabled:
            return
        state = self._state
        if state is CLOSED:
            if ticket != self._closed_ticket:
                return
            window = self._window
            if failed:
                self._consecutive += 1
                threshold = self._config.failure_threshold
                if threshold is not None and self._consecutive >= threshold:
                    self._open(f"{self._consecutive} consecutive failures")
                    return
                if window is not None:
                    window.add(self._clock(), 1, 1)
                    self._check_ratio(window)
            else:
                self._consecutive = 0
                if window is not None:
                    window.add(self._clock(), 1, 0)
                    self._check_ratio(window)  # a success can complete min_requests
        elif state is HALF_OPEN:
            if self._probes.pop(ticket, None) is None:
                return  # a late result from before the last transition
            if failed:
                self._open("a half-open probe failed")
            else:
                self._successes += 1
                if self._successes >= self._config.success_threshold:
                    self._close()

    def release(self, ticket: int) -> None:
        """The attempt was abandoned (client gone): neither a success nor a failure."""
        self._probes.pop(ticket, None)

    def fails_on_status(self, status: int) -> bool:
        return status in self.statuses

    def fails_on_error(self, kind: str) -> bool:
        return kind in self.error_kinds

    # -- introspection -------------------------------------------------------------------
    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open`` (time-driven transitions applied)."""
        if self._state is not CLOSED:
            self._refresh(self._clock())
        return self._state

    def retry_after(self) -> float:
        """Seconds until this endpoint may take a call again (0 when it would now)."""
        state = self.state
        if state is OPEN:
            return max(0.0, self._until - self._clock())
        if state is HALF_OPEN and len(self._probes) >= self._config.half_open_max_requests:
            return 1.0  # probes in flight decide soon; a second is a fair hint
        return 0.0

    def snapshot(self) -> dict[str, Any]:
        """A small JSON-ready view for ``/api/health``."""
        state = self.state
        return {
            "state": state,
            "failures": self._consecutive,
            "opened_at": None if self._opened_wall is None else round(self._opened_wall, 3),
            "retry_after": math.ceil(self.retry_after()) if state is not CLOSED else 0,
            "probes_in_flight": len(self._probes),
        }

    def close(self) -> None:
        """Stop timers and metric updates (the config that built it was replaced)."""
        self._shut = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- transitions ---------------------------------------------------------------------
    def _check_ratio(self, window: SlidingWindow) -> None:
        calls, failures = window.total_a, window.total_b
        config = self._config
        ratio = config.failure_ratio
        if ratio is not None and calls >= config.min_requests and failures >= calls * ratio:
            self._open(f"{failures} of the last {calls} calls failed")

    def _refresh(self, now: float) -> None:
        """Apply the transitions that time alone causes."""
        if self._state is OPEN:
            if now >= self._until:
                self._transition(HALF_OPEN, f"open for {self._config.open_timeout:g}s")
                self._successes = 0
                self._probes.clear()
        elif self._state is HALF_OPEN and self._probes:
            oldest = min(self._probes.values())
            if now - oldest >= self.probe_timeout:
                self._open(f"a half-open probe did not finish within {self.probe_timeout:g}s")

    def _open(self, reason: str) -> None:
        now = self._clock()
        self._until = now + self._config.open_timeout
        self._opened_wall = self._wall()
        self._probes.clear()
        if self._window is not None:
            self._window.clear()
        self._transition(OPEN, reason)
        self._arm(now)

    def _close(self) -> None:
        self._consecutive = 0
        self._seq += 1
        self._closed_ticket = self._seq
        self._opened_wall = None
        self._transition(CLOSED, f"{self._successes} successful probes")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _transition(self, new: str, reason: str) -> None:
        old = self._state
        self._state = new
        if self._shut:
            return
        if _GAUGE_OWNER.get(self._labels) is self:
            self._gauge.set(_GAUGE_VALUE[new])
        BREAKER_TRANSITIONS.labels(*self._labels, old, new).inc()
        if new is OPEN:
            logger.warning(
                "circuit %s: %s -> open (%s); failing fast for %gs",
                self.name,
                old,
                reason,
                self._config.open_timeout,
            )
        else:
            logger.info("circuit %s: %s -> %s (%s)", self.name, old, new, reason)

    def _arm(self, now: float) -> None:
        """Schedule the next time-driven transition, when a scheduler was given."""
        if self._schedule is None or self._shut:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._state is OPEN:
            delay = self._until - now
        elif self._state is HALF_OPEN and self._probes:
            delay = min(self._probes.values()) + self.probe_timeout - now
        else:
            return
        self._timer = self._schedule(max(delay, 0.0) + 0.001, self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self._clock()
        self._refresh(now)
        self._arm(now)
