"""An upstream cluster: its endpoints, their connection pools, and endpoint choice.

A :class:`Cluster` is the innermost upstream call of every route's pipeline. It picks an
endpoint round-robin and sends one attempt; retries and circuit breaking wrap it (see
``proxy/layers/retry.py`` and ``proxy/layers/circuit_breaker.py``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from proxy.config.schema import Upstream
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
    # idempotent methods with a replayable body, or when idempotency holds the key.
    replayable: bool = False
    # Overrides the upstream's response timeout for one attempt (per-try timeout).
    timeout: float | None = None
    # Set by Cluster.send once any attempt may have reached the upstream; it stays set
    # across retries (pass this object along, or carry the flag over when copying it), so
    # idempotency knows whether a failed request can be released or must be kept unknown.
    sent: bool = False


class Endpoint:
    """One URL of an upstream with its own pool (and, once configured, breaker)."""

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

    def __repr__(self) -> str:
        return f"Endpoint({self.url})"


class Cluster:
    """The endpoints of one named upstream and how to send one attempt to one of them."""

    def __init__(self, name: str, config: Upstream) -> None:
        self.name = name
        self.config = config
        self.endpoints = [Endpoint(name, url, config) for url in config.endpoints]
        self._next = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._schedule_sweep()

    def pick(self, avoid: Endpoint | None = None) -> Endpoint:
        """Round-robin over the endpoints, skipping ``avoid`` when there is a choice."""
        endpoints = self.endpoints
        count = len(endpoints)
        if count == 1:
            return endpoints[0]
        for _ in range(count):
            endpoint = endpoints[self._next % count]
            self._next += 1
            if endpoint is not avoid:
                return endpoint
        return endpoints[0]

    async def send(self, request: UpstreamRequest, endpoint: Endpoint | None = None) -> Response:
        """Send one attempt to ``endpoint`` (or the next one)."""
        endpoint = endpoint or self.pick()
        timeouts = self.config.timeouts
        sent = True  # unless the failure proves the upstream saw nothing
        try:
            return await send_request(
                endpoint.pool,
                request.method,
                request.target,
                request.headers,
                request.body,
                chunked=request.chunked,
                connect_timeout=timeouts.connect,
                response_timeout=request.timeout or timeouts.request,
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
