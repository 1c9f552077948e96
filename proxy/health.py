"""Active health checks of every upstream endpoint, run in the background.

The admin endpoints answer from the latest results and never wait on a dependency: each
probe has its own timeout and runs on its own interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import httpx

from proxy.config.schema import HealthCheck
from proxy.pipeline import Runtime
from proxy.upstream.cluster import Endpoint

logger = logging.getLogger("sidecar.health")


@dataclass
class ProbeResult:
    ok: bool
    detail: str
    duration: float
    checked_at: float = field(default_factory=time.time)


class UpstreamProber:
    """Probes each endpoint's health path on its upstream's interval."""

    def __init__(self) -> None:
        self.results: dict[str, ProbeResult] = {}  # by endpoint URL
        self._tasks: list[asyncio.Task[None]] = []
        self._client = httpx.AsyncClient()

    def start(self, runtime: Runtime) -> None:
        self.stop_tasks()
        for cluster in runtime.clusters.values():
            check = cluster.config.health_check
            if not check.enabled:
                continue
            for endpoint in cluster.endpoints:
                task = asyncio.create_task(self._run(endpoint, cluster.config.health_check))
                self._tasks.append(task)

    async def _run(self, endpoint: Endpoint, check: HealthCheck) -> None:
        url = endpoint.url.rstrip("/") + check.path
        while True:
            start = time.perf_counter()
            try:
                response = await self._client.get(url, timeout=check.timeout)
                ok = 200 <= response.status_code < 300
                detail = f"GET {check.path} answered {response.status_code}"
            except httpx.TimeoutException:
                ok, detail = False, f"GET {check.path} timed out after {check.timeout:g}s"
            except httpx.HTTPError as exc:
                ok, detail = False, f"GET {check.path} failed: {exc.__class__.__name__}: {exc}"
            result = ProbeResult(ok, detail, time.perf_counter() - start)
            self._record(endpoint, result)
            await asyncio.sleep(check.interval)

    def _record(self, endpoint: Endpoint, result: ProbeResult) -> None:
        previous = self.results.get(endpoint.url)
        if previous is not None and previous.ok != result.ok:
            logger.warning(
                "upstream %s is now %s: %s",
                endpoint.url,
                "healthy" if result.ok else "unhealthy",
                result.detail,
            )
        self.results[endpoint.url] = result
        endpoint.healthy = result.ok

    def stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []

    async def close(self) -> None:
        self.stop_tasks()
        with contextlib.suppress(Exception):
            await self._client.aclose()
