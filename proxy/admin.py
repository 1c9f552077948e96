"""The admin listener: liveness, readiness, health, metrics and the effective config.

Never proxies. Every answer comes from in-memory state kept fresh by background tasks, so
a slow dependency can never make a probe slow.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from proxy.app import ProxyState
from proxy.collectors import register_system_collector
from proxy.health import UpstreamProber
from proxy.metrics_json import metrics_document
from proxy.problem import problem_body, send_problem
from proxy.redact import redacted_config
from proxy.types import Receive, Scope, Send

Handler = Callable[[Scope], Awaitable[tuple[int, str, bytes]]]


class AdminApp:
    """ASGI app for the admin listener."""

    def __init__(self, state: ProxyState, prober: UpstreamProber) -> None:
        self.state = state
        self.prober = prober
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
        return 200, "application/health+json", _json({"status": "pass"})

    async def ready(self, scope: Scope) -> tuple[int, str, bytes]:
        failing = self._readiness_failures()
        if failing:
            return 503, "application/health+json", _json({"status": "fail", "checks": failing})
        return 200, "application/health+json", _json({"status": "pass"})

    def _readiness_failures(self) -> dict[str, str]:
        failing: dict[str, str] = {}
        if self.state.draining:
            failing["draining"] = "shutting down: not accepting new traffic"
        for cluster in self.state.runtime.clusters.values():
            if not cluster.config.health_check.enabled:
                continue
            for endpoint in cluster.endpoints:
                result = self.prober.results.get(endpoint.url)
                if result is None:
                    failing[f"upstream:{cluster.name}"] = f"{endpoint.url}: not probed yet"
                elif not result.ok:
                    failing[f"upstream:{cluster.name}"] = f"{endpoint.url}: {result.detail}"
        return failing

    async def health(self, scope: Scope) -> tuple[int, str, bytes]:
        checks: dict[str, list[dict[str, Any]]] = {}
        for cluster in self.state.runtime.clusters.values():
            for endpoint in cluster.endpoints:
                result = self.prober.results.get(endpoint.url)
                checks.setdefault("upstream", []).append(
                    {
                        "componentId": f"{cluster.name}:{endpoint.url}",
                        "status": "warn" if result is None else ("pass" if result.ok else "fail"),
                        "output": "not probed yet" if result is None else result.detail,
                        "observedValue": None
                        if result is None
                        else round(result.duration * 1000, 3),
                        "observedUnit": "ms",
                        "time": None if result is None else _iso(result.checked_at),
                    }
                )
        query = parse_qs(scope["query_string"].decode("latin-1"))
        if "include" in query:
            wanted = {part for value in query["include"] for part in value.split(",")}
            checks = {name: value for name, value in checks.items() if name in wanted}
        statuses = [item["status"] for items in checks.values() for item in items]
        status = "fail" if "fail" in statuses else "warn" if "warn" in statuses else "pass"
        if self.state.draining:
            status = "fail"
        body = {"status": status, "draining": self.state.draining, "checks": checks}
        return (503 if status == "fail" else 200), "application/health+json", _json(body)

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


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
