"""An upstream cluster: its endpoints, their connection pools, and endpoint choice.

A :class:`Cluster` is the innermost upstream call of every route's pipeline: :meth:`attempt`
picks an endpoint round-robin among those whose circuit breaker admits a call (outlier
ejection in Envoy's sense), sends one attempt, records its outcome in that endpoint's breaker
and in the upstream metrics. Retries wrap it (``proxy/layers/retry.py``); the breaker state
machine is ``proxy/layers/circuit_breaker.py``.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from proxy.config.schema import Upstream
from proxy.layers.circuit_breaker import CircuitBreaker, CircuitOpen
from proxy.layers.retry_budget import RetryBudget
from proxy.metrics import UPSTREAM_DURATION, UPSTREAM_REQUESTS
from proxy.types import Headers
from proxy.upstream.errors import UpstreamError
from proxy.upstream.http11 import (
    EndpointPool,
    RequestBody,
    Response,
    parse_endpoint,
    send_request,
)


@dataclass(slots=True)
class UpstreamRequest:
    """One request as the upstream will see it (headers already rewritten)."""

    method: str
    target: str
    headers: Headers
    body: RequestBody
    chunked: bool = False
    # May this request be sent again after the upstream might have seen it? True for
    # idempotent methods with a buffered body.
    replayable: bool = False
    # The idempotency layer holds this request's key: it may be sent again after the
    # upstream *answered* a retryable status (no client duplicate can interleave), but
    # never after an ambiguous failure (reset or timeout once sent), which idempotency
    # records as an unknown outcome: the upstream may have executed it.
    keyed: bool = False
    # Overrides the upstream's response timeout for one attempt (per-try timeout); also
    # caps its connect timeout.
    timeout: float | None = None
    attempts: int = 0  # attempts sent so far (retries included), counted by Cluster.attempt
    # Set by Cluster.send once any attempt may have reached the upstream; it stays set
    # across retries (pass this object along, or carry the flag over when copying it), so
    # idempotency knows whether a failed request can be released or must be kept unknown.
    sent: bool = False


class Endpoint:
    """One URL of an upstream with its own pool and circuit breaker.

    ``breaker.state`` is ``closed``/``open``/``half_open``; ``breaker.snapshot()`` is the
    small dict ``/api/health`` shows.
    """

    def __init__(self, cluster_name: str, url: str, config: Upstream) -> None:
        self.url = url
        self.cluster_name = cluster_name
        self.host, self.port = parse_endpoint(url)
        self.pool = EndpointPool(
            self.host,
            self.port,
            max_idle=config.pool.max_idle_per_endpoint,
            idle_timeout=config.pool.idle_timeout,
        )
        self.healthy: bool | None = None  # from active health checks; None = not yet known
        timeouts = config.timeouts
        self.breaker = CircuitBreaker(
            config.circuit_breaker,
            upstream=cluster_name,
            endpoint=url,
            # The longest one attempt can take: a probe still running past it has hung.
            probe_timeout=timeouts.connect
            + max(timeouts.request, config.retry.per_try_timeout or 0.0),
            schedule=asyncio.get_running_loop().call_later,
        )

    def __repr__(self) -> str:
        return f"Endpoint({self.url})"


class Cluster:
    """The endpoints of one named upstream and how to send one attempt to one of them."""

    def __init__(self, name: str, config: Upstream) -> None:
        self.name = name
        self.config = config
        self.endpoints = [Endpoint(name, url, config) for url in config.endpoints]
        self._next = 0
        # Shared by every route retrying to this upstream (unless a route sets its own).
        self.retry_budget = RetryBudget(config.retry.budget)
        self._duration = UPSTREAM_DURATION.labels(name)
        self._outcomes = {
            outcome: UPSTREAM_REQUESTS.labels(name, outcome)
            for outcome in (
                "1xx", "2xx", "3xx", "4xx", "5xx",
                "connect-failure", "reset", "timeout", "protocol",
            )
        }  # fmt: skip
        self._sweeper: asyncio.TimerHandle | None = None
        self._schedule_sweep()

    def pick(self, avoid: Endpoint | None = None) -> tuple[Endpoint, int]:
        """The next endpoint round-robin whose breaker admits a call, and its breaker ticket.

        ``avoid`` (the endpoint a retry's previous attempt went to) is taken only when no
        other endpoint admits the call; endpoints failing their active health check only
        when no healthy one does. Raises :class:`CircuitOpen` when none does.
        """
        endpoints = self.endpoints
        count = len(endpoints)
        if count == 1:
            endpoint = endpoints[0]
            ticket = endpoint.breaker.acquire()
            if ticket is None:
                raise self._all_open()
            return endpoint, ticket
        start = self._next
        # First pass: endpoints not failing their active health check; second pass, when
        # none of those admits the call: any endpoint (Envoy's "panic mode": better to try
        # an endpoint the probe dislikes than to fail every request).
        for require_healthy in (True, False):
            for step in range(count):
                index = (start + step) % count
                endpoint = endpoints[index]
                if endpoint is avoid or (require_healthy and endpoint.healthy is False):
                    continue
                ticket = endpoint.breaker.acquire()
                if ticket is not None:
                    if avoid is None:  # a retry does not shift the rotation of first attempts
                        self._next = index + 1
                    return endpoint, ticket
        if avoid is not None:
            ticket = avoid.breaker.acquire()
            if ticket is not None:
                return avoid, ticket
        raise self._all_open()

    def _all_open(self) -> CircuitOpen:
        wait = min(endpoint.breaker.retry_after() for endpoint in self.endpoints)
        return CircuitOpen(
            f"circuit open for upstream {self.name!r}: failing fast without calling it",
            max(1, math.ceil(wait)),
        )

    async def attempt(
        self, request: UpstreamRequest, avoid: Endpoint | None = None
    ) -> tuple[Endpoint, Response | UpstreamError]:
        """One attempt through an endpoint's breaker: the response or the error, as a value.

        Raises :class:`CircuitOpen` (nothing sent) when every endpoint's circuit is open.
        """
        endpoint, ticket = self.pick(avoid)
        breaker = endpoint.breaker
        request.attempts += 1
        started = time.perf_counter()
        try:
            response = await self.send(request, endpoint)
        except UpstreamError as exc:
            self._duration.observe(time.perf_counter() - started)
            self._outcomes[exc.kind].inc()
            breaker.record(ticket, breaker.fails_on_error(exc.kind))
            return endpoint, exc
        except BaseException:
            breaker.release(ticket)  # cancelled (client gone): says nothing about the upstream
            raise
        self._duration.observe(time.perf_counter() - started)
        status = response.status
        self._outcomes[_STATUS_CLASS.get(status // 100, "5xx")].inc()
        breaker.record(ticket, breaker.fails_on_status(status))
        return endpoint, response

    async def send(self, request: UpstreamRequest, endpoint: Endpoint) -> Response:
        """Send one attempt to ``endpoint`` (no breaker, no retry)."""
        timeouts = self.config.timeouts
        connect_timeout, response_timeout = timeouts.connect, timeouts.request
        if request.timeout is not None:
            connect_timeout = min(connect_timeout, request.timeout)
            response_timeout = request.timeout
        sent = True  # unless the failure proves the upstream saw nothing
        try:
            return await send_request(
                endpoint.pool,
                request.method,
                request.target,
                request.headers,
                request.body,
                chunked=request.chunked,
                connect_timeout=connect_timeout,
                response_timeout=response_timeout,
                idle_timeout=timeouts.idle,
            )
        except UpstreamError as exc:
            sent = exc.sent
            raise
        finally:
            if sent:
                request.sent = True

    def _schedule_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(self.config.pool.idle_timeout, self._sweep)

    def _sweep(self) -> None:
        for endpoint in self.endpoints:
            endpoint.pool.sweep()
        self._schedule_sweep()

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for endpoint in self.endpoints:
            endpoint.pool.close()
            endpoint.breaker.close()


_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
