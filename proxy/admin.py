"""The admin listener: liveness, readiness, health, metrics and the effective config.

Never proxies. Every answer comes from in-memory state kept fresh by background tasks, so
a slow dependency can never make a probe slow.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from proxy.app import ProxyState
from proxy.collectors import register_system_collector
from proxy.health_monitor import HealthMonitor, parse_include, unknown_checks
from proxy.metrics_json import metrics_document
from proxy.problem import problem_body, send_problem
from proxy.redact import redacted_config
from proxy.types import Receive, Scope, Send

Handler = Callable[[Scope], Awaitable[tuple[int, str, bytes]]]


class AdminApp:
    """ASGI app for the admin listener."""

    def __init__(self, state: ProxyState, health: HealthMonitor) -> None:
        self.state = state
        self.health_monitor = health
        self.prober = health.prober
        self.started = time.time()
        register_system_collector()

    def _routes(self) -> dict[str, Handler]:
        paths = self.state.runtime.config.admin.paths
        return {
            paths.live: self.live,
            paths.ready: self.ready,
            paths.health: self.health,
            paths.metrics: self.metrics,
            paths.config: self.config,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        handler = self._routes().get(scope["path"].rstrip("/") or "/")
        if handler is None:
            await send_problem(send, 404, "not-found", f"no admin endpoint at {scope['path']}")
            return
        if scope["method"] not in ("GET", "HEAD"):
            await send_problem(
                send,
                405,
                "method-not-allowed",
                "admin endpoints answer GET and HEAD",
                [(b"allow", b"GET, HEAD")],
            )
            return
        status, content_type, body = await handler(scope)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )

    # -- endpoints ----------------------------------------------------------------------
    async def live(self, scope: Scope) -> tuple[int, str, bytes]:
        """200 whenever the event loop runs this; never consults a dependency."""
        body = {"status": "pass", "uptimeSeconds": round(time.time() - self.started, 3)}
        return 200, "application/health+json", _json(body)

    async def ready(self, scope: Scope) -> tuple[int, str, bytes]:
        status, document = self.health_monitor.readiness()
        return status, "application/health+json", _json(document)

    async def health(self, scope: Scope) -> tuple[int, str, bytes]:
        query = parse_qs(scope["query_string"].decode("latin-1"))
        include = parse_include(query["include"]) if "include" in query else None
        if include is not None:
            unknown = unknown_checks(include)
            if unknown:
                detail = (
                    f"unknown check(s) {', '.join(unknown)}: "
                    "use upstream, store, circuit_breakers or system (or check:name)"
                )
                return 400, "application/problem+json", problem_body(400, "bad-include", detail)
        status, document = self.health_monitor.health(include)
        return status, "application/health+json", _json(document)

    async def metrics(self, scope: Scope) -> tuple[int, str, bytes]:
        query = parse_qs(scope["query_string"].decode("latin-1"))
        wanted = query.get("format", [""])[-1]
        if wanted == "json":
            return 200, "application/json", _json(metrics_document(self.state, self.prober))
        if wanted not in ("", "prometheus", "openmetrics"):
            detail = f"unknown format {wanted!r}: use json, prometheus or openmetrics"
            return 400, "application/problem+json", problem_body(400, "bad-format", detail)
        accept = b""
        for name, value in scope["headers"]:
            if name == b"accept":
                accept = value
        if wanted == "openmetrics" or (not wanted and b"application/openmetrics-text" in accept):
            return 200, OPENMETRICS_TYPE, generate_openmetrics(REGISTRY)
        return 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)

    async def config(self, scope: Scope) -> tuple[int, str, bytes]:
        return 200, "application/json", _json(redacted_config(self.state.runtime.config))


def _json(document: object) -> bytes:
    return json.dumps(document, indent=2).encode() + b"\n"
