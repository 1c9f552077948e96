"""Retries of upstream attempts: backoff with full jitter, timeouts, a budget, safety rules.

The upstream call the forwarder makes (``forward → retry → cluster``). One call:

* sends an attempt through :meth:`Cluster.attempt` (endpoint choice + circuit breaker), each
  with ``per_try_timeout`` and never past the overall ``timeout`` (which includes backoffs);
* retries an outcome listed in ``retry_on`` (``connect-failure``, ``reset``, ``timeout`` for a
  per-try timeout, ``5xx`` or status codes) up to ``max_attempts`` attempts in all, preferring
  another endpoint, after ``uniform(0, min(max_delay, base_delay * 2**n))`` (AWS's "full
  jitter", Envoy's fully jittered backoff) and never sooner than the upstream's
  ``Retry-After``;
* retries only what is safe: a request the upstream may have seen is retried only when it is
  replayable (idempotent method with a buffered body); a request whose idempotency key the
  idempotency layer holds is also retried after a retryable *answer* (the upstream declined
  it), never after a reset or timeout once sent (it may have executed: idempotency records
  it as unknown); anything else only after a failure that proves nothing was sent;
* stops, returning the last outcome, when the budget (:mod:`proxy.layers.retry_budget`) is
  spent, the wait would pass the deadline (or a ``Retry-After`` exceeds it), or every circuit
  is open. The client then gets the upstream's own last answer (say its 503), or the 502/504
  of the last failure.

While every endpoint's circuit is open the first attempt is refused with a 503
``circuit-open`` problem carrying ``Retry-After`` (seconds to half-open), without any
upstream traffic. Every retry is logged (reason, attempt) and counted.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time

from prometheus_client import Counter

from proxy.config.schema import Retry
from proxy.forward import UpstreamRejected
from proxy.layers.circuit_breaker import CircuitOpen, failure_kinds, failure_statuses
from proxy.layers.retry_budget import RetryBudget
from proxy.metrics import BREAKER_REJECTIONS, RETRIES, RETRIES_DENIED
from proxy.upstream.cluster import Cluster, Endpoint, UpstreamRequest
from proxy.upstream.errors import UpstreamError
from proxy.upstream.http11 import Response

logger = logging.getLogger("sidecar.retry")

Outcome = Response | UpstreamError


class RetryPolicy:
    """``retry_on`` and the timing settings of one retry config, compiled once."""

    __slots__ = (
        "base_delay", "kinds", "max_attempts", "max_delay", "per_try_timeout", "statuses",
        "timeout",
    )  # fmt: skip

    def __init__(self, config: Retry) -> None:
        self.max_attempts = config.max_attempts
        self.base_delay = config.base_delay
        self.max_delay = config.max_delay
        self.per_try_timeout = config.per_try_timeout
        self.timeout = config.timeout
        self.statuses = failure_statuses(config.retry_on)
        self.kinds = failure_kinds(config.retry_on)

    def reason(self, outcome: Outcome) -> str | None:
        """Why ``outcome`` may be retried (a status code or failure kind), else ``None``."""
        if isinstance(outcome, UpstreamError):
            return outcome.kind if outcome.kind in self.kinds else None
        status = outcome.status
        return str(status) if status in self.statuses else None

    def backoff(self, retry: int) -> float:
        """Full jitter: uniform over [0, min(max_delay, base_delay * 2**retry)]."""
        ceiling = min(self.max_delay, self.base_delay * (1 << min(retry, 30)))
        return random.uniform(0.0, ceiling)


class RetryingCall:
    """The upstream call of the routes sharing one retry policy and budget."""

    def __init__(self, cluster: Cluster, config: Retry, budget: RetryBudget) -> None:
        self.cluster = cluster
        self.policy = RetryPolicy(config)
        self.budget = budget
        self.default_timeout = cluster.config.timeouts.request
        name = cluster.name
        self._rejections = BREAKER_REJECTIONS.labels(name)
        self._retries: dict[str, Counter] = {}
        self._denied = {
            reason: RETRIES_DENIED.labels(name, reason)
            for reason in ("budget", "unsafe", "deadline", "circuit_open")
        }

    async def __call__(self, request: UpstreamRequest) -> Response:
        policy = self.policy
        cluster = self.cluster
        retries_allowed = policy.max_attempts > 1
        self.budget.deposit()
        deadline = None if policy.timeout is None else time.monotonic() + policy.timeout
        avoid: Endpoint | None = None
        attempt = 1
        # The last failed response, kept (unread) until the next attempt is admitted: if
        # every circuit opens meanwhile, the client still gets it.
        previous: Outcome | None = None
        reason: str | None = None  # why the attempt about to be sent is a retry
        try:
            while True:
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    request.timeout = min(policy.per_try_timeout or self.default_timeout, remaining)
                else:
                    request.timeout = policy.per_try_timeout
                try:
                    endpoint, outcome = await cluster.attempt(request, avoid)
                except CircuitOpen as exc:
                    if previous is None:
                        self._rejections.inc()
                        raise UpstreamRejected(
                            503,
                            "circuit-open",
                            str(exc),
                            [(b"retry-after", str(math.ceil(exc.retry_after)).encode())],
                        ) from None
                    self._deny("circuit_open", request, attempt, "every circuit is open")
                    outcome, previous = previous, None
                    return _finish(outcome)
                if reason is not None:
                    self._count_retry(reason)  # admitted, so sent
                if isinstance(previous, Response):
                    await _discard(previous)
                previous = None
                if not retries_allowed or attempt >= policy.max_attempts:
                    return _finish(outcome)
                reason = policy.reason(outcome)
                if reason is None:
                    return _finish(outcome)
                wait = self._wait(outcome, request, attempt, reason, deadline)
                if wait is None:
                    return _finish(outcome)
                previous = outcome
                logger.info(
                    "retrying %s %s: attempt %d of %d failed with %s on %s; next in %.0f ms",
                    request.method,
                    request.target,
                    attempt,
                    policy.max_attempts,
                    reason,
                    endpoint.url,
                    wait * 1000,
                )
                if wait > 0:
                    await asyncio.sleep(wait)
                avoid = endpoint
                attempt += 1
        finally:
            if isinstance(previous, Response):
                previous.close()  # cancelled while waiting (client gone)

    def _wait(
        self,
        outcome: Outcome,
        request: UpstreamRequest,
        attempt: int,
        reason: str,
        deadline: float | None,
    ) -> float | None:
        """How long to wait before the next attempt, or ``None`` when it must not happen."""
        if isinstance(outcome, UpstreamError):
            safe = request.replayable or not outcome.sent
        else:  # the upstream answered (say 503): a held idempotency key makes it safe too
            safe = request.replayable or request.keyed
        if not safe:
            self._deny("unsafe", request, attempt, f"{reason}, but the request may have been seen")
            return None
        policy = self.policy
        wait = policy.backoff(attempt - 1)
        limit = math.inf if deadline is None else deadline - time.monotonic()
        if isinstance(outcome, Response):
            retry_after = parse_retry_after(outcome.header(b"retry-after"))
            if retry_after is not None:
                # No retry sooner than the upstream asked; none at all past the deadline
                # (or, without one, past max_delay): the client gets the answer instead.
                if retry_after > (policy.max_delay if deadline is None else limit):
                    self._deny("deadline", request, attempt, f"Retry-After {retry_after:g}s")
                    return None
                wait = max(wait, retry_after)
        if wait >= limit:
            self._deny("deadline", request, attempt, "the overall timeout would pass")
            return None
        if not self.budget.withdraw():
            self._deny("budget", request, attempt, "the retry budget is spent")
            return None
        return wait

    def _deny(self, reason: str, request: UpstreamRequest, attempt: int, detail: str) -> None:
        self._denied[reason].inc()
        logger.debug(
            "not retrying %s %s after attempt %d: %s",
            request.method,
            request.target,
            attempt,
            detail,
        )

    def _count_retry(self, reason: str) -> None:
        child = self._retries.get(reason)
        if child is None:
            child = self._retries[reason] = RETRIES.labels(self.cluster.name, reason)
        child.inc()


def _finish(outcome: Outcome) -> Response:
    if isinstance(outcome, UpstreamError):
        raise outcome
    return outcome


async def _discard(response: Response) -> None:
    """Let go of a response we will not relay: reuse its connection if it is complete."""
    if response.complete:
        try:
            await response.read_all()  # already received: returns at once, releases to the pool
            return
        except UpstreamError:
            pass
    response.close()


def parse_retry_after(value: bytes | None) -> float | None:
    """Seconds from ``Retry-After`` (delta-seconds or an HTTP-date); ``None`` if absent/bad."""
    if not value:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())
