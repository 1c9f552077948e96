"""Request metrics: the outermost layer of every route, so it sees every answer, including
the 413/429/503 that inner layers produce themselves.

Records ``http_requests_total{method,endpoint,status}``, ``http_request_duration_seconds
{method,endpoint}`` and the endpoint's latency sketch (JSON quantiles). ``endpoint`` is
fixed per route (its template), so labelled children are resolved once and cached here:
a request costs a frozenset test, two dict lookups, a closure and the observations.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from proxy.forward import ClientDisconnected
from proxy.metrics import HTTP_DURATION, HTTP_REQUESTS, KNOWN_METHODS, latency_sketch
from proxy.types import ASGIApp, Message, Receive, Scope, Send

# Status recorded when the client went away before any response head (nginx's convention).
CLIENT_CLOSED = 499


class MetricsLayer:
    """Counts and times each request under its route's ``endpoint`` label."""

    def __init__(self, app: ASGIApp, endpoint: str) -> None:
        self.app = app
        self.endpoint = endpoint
        self._sketch = latency_sketch(endpoint)
        self._durations: dict[str, Any] = {}  # method label -> histogram child
        self._counters: dict[str, dict[int, Any]] = {}  # method label -> status -> counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        ctx = scope.get("sidecar")
        start = ctx.start if ctx is not None else time.perf_counter()
        try:
            await self.app(scope, receive, recording_send)
        except (ClientDisconnected, asyncio.CancelledError):
            status = status or CLIENT_CLOSED
            raise
        except BaseException:
            status = status or 500  # the proxy app answers 500 for what escapes the pipeline
            raise
        finally:
            # A pipeline that returns without a response head gets a 500 from the server.
            self.record(scope["method"], status or 500, time.perf_counter() - start)

    def record(self, method: str, status: int, duration: float) -> None:
        """Observe one finished request (also the micro-benchmark's unit of work)."""
        if method not in KNOWN_METHODS:
            method = "_OTHER"
        by_status = self._counters.get(method)
        if by_status is None:
            by_status = self._counters[method] = {}
            self._durations[method] = HTTP_DURATION.labels(method, self.endpoint)
        counter = by_status.get(status)
        if counter is None:
            counter = by_status[status] = HTTP_REQUESTS.labels(method, self.endpoint, str(status))
        counter.inc()
        self._durations[method].observe(duration)
        self._sketch.add(duration)
