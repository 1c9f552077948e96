"""Active health checks of every upstream endpoint, run in the background.

Each endpoint of an upstream with ``health_check.enabled`` gets its own task that sends
``GET <path>`` every ``interval`` (fixed rate: a slow probe does not push the next one
back) on a fresh connection, bounded as a whole by ``timeout``. ``unhealthy_threshold``
consecutive failures mark the endpoint unhealthy, ``healthy_threshold`` consecutive passes
healthy again; the first probe decides at once. Readers (the health checks, the metrics
view) only look at the latest results, so nothing ever waits on a probe.

httpx rather than the proxy's own pool: probes must not borrow (or poison) the connections
that carry traffic, and a new connection per probe also proves the endpoint still accepts
them. Keep-alive is off because a reused idle connection can race the upstream's own
keep-alive timeout and fail a probe spuriously.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import httpx

from proxy.config.schema import HealthCheck
from proxy.pipeline import Runtime
from proxy.upstream.cluster import Endpoint

logger = logging.getLogger("sidecar.health")

_HEADERS = {"user-agent": "sidecar-health-check", "connection": "close"}


@dataclass(slots=True)
class ProbeResult:
    """One probe of one endpoint."""

    ok: bool
    detail: str
    duration: float  # seconds
    checked_at: float = field(default_factory=time.time)  # wall clock
    status_code: int | None = None


@dataclass(slots=True)
class EndpointHealth:
    """An endpoint's health as the probes established it, with the streaks behind it."""

    last: ProbeResult | None = None
    healthy: bool | None = None  # None until the first probe
    passes: int = 0  # consecutive
    failures: int = 0  # consecutive
    ever_healthy: bool = False
    since: float = field(default_factory=time.time)  # when `healthy` last changed

    def record(self, result: ProbeResult, check: HealthCheck) -> bool:
        """Apply one probe result; True when the endpoint's health changed."""
        self.last = result
        if result.ok:
            self.passes += 1
            self.failures = 0
        else:
            self.failures += 1
            self.passes = 0
        previous = self.healthy
        if previous is None:
            self.healthy = result.ok
        elif not previous and self.passes >= check.healthy_threshold:
            self.healthy = True
        elif previous and self.failures >= check.unhealthy_threshold:
            self.healthy = False
        if self.healthy:
            self.ever_healthy = True
        if self.healthy != previous:
            self.since = result.checked_at
            return True
        return False


class UpstreamProber:
    """Probes each endpoint's health path on its upstream's interval."""

    def __init__(self) -> None:
        self.health: dict[tuple[str, str], EndpointHealth] = {}  # by (upstream, endpoint URL)
        self.results: dict[str, ProbeResult] = {}  # latest probe by endpoint URL
        self._tasks: list[asyncio.Task[None]] = []
        self._client = httpx.AsyncClient(
            limits=httpx.Limits(max_keepalive_connections=0),
            trust_env=False,  # an HTTP_PROXY in the pod must not sit between us and the app
            follow_redirects=False,
        )

    def start(self, runtime: Runtime) -> None:
        """(Re)start probing ``runtime``'s endpoints; known endpoints keep their state."""
        self.stop_tasks()
        wanted: set[tuple[str, str]] = set()
        for cluster in runtime.clusters.values():
            check = cluster.config.health_check
            if not check.enabled:
                continue
            for endpoint in cluster.endpoints:
                key = (cluster.name, endpoint.url)
                wanted.add(key)
                endpoint.healthy = self.health.setdefault(key, EndpointHealth()).healthy
                self._tasks.append(asyncio.create_task(self._run(key, endpoint, check)))
        for key in set(self.health) - wanted:
            del self.health[key]

    def endpoint_health(self, upstream: str, url: str) -> EndpointHealth | None:
        return self.health.get((upstream, url))

    def ever_healthy(self, upstream: str) -> bool:
        """Has any endpoint of ``upstream`` passed a probe since the process started?"""
        return any(h.ever_healthy for (name, _), h in self.health.items() if name == upstream)

    async def probe(self, url: str, check: HealthCheck) -> ProbeResult:
        """One ``GET`` of ``url``'s health path, never longer than ``check.timeout``."""
        target = url.rstrip("/") + check.path
        checked_at = time.time()
        start = time.perf_counter()
        status_code: int | None = None
        try:
            async with asyncio.timeout(check.timeout):
                response = await self._client.get(target, headers=_HEADERS, timeout=check.timeout)
            status_code = response.status_code
            ok = 200 <= status_code < 300
            detail = f"GET {target} answered {status_code}"
        except (TimeoutError, httpx.TimeoutException):
            ok, detail = False, f"GET {target} timed out after {check.timeout * 1000:g} ms"
        except httpx.ConnectError as exc:
            ok, detail = False, f"GET {target} could not connect: {exc or 'connection refused'}"
        except Exception as exc:  # any failure is a failed probe, never a dead probe task
            ok, detail = False, f"GET {target} failed: {exc.__class__.__name__}: {exc}"
        return ProbeResult(ok, detail, time.perf_counter() - start, checked_at, status_code)

    async def _run(self, key: tuple[str, str], endpoint: Endpoint, check: HealthCheck) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            result = await self.probe(endpoint.url, check)
            health = self.health.setdefault(key, EndpointHealth())
            if health.record(result, check):
                log = logger.info if health.healthy else logger.warning
                log(
                    "upstream %s endpoint %s is now %s: %s",
                    key[0],
                    endpoint.url,
                    "healthy" if health.healthy else "unhealthy",
                    result.detail,
                )
            endpoint.healthy = health.healthy
            self.results[endpoint.url] = result
            next_at = max(next_at + check.interval, loop.time())
            await asyncio.sleep(next_at - loop.time())

    def stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []

    async def close(self) -> None:
        self.stop_tasks()
        try:
            await self._client.aclose()
        except Exception:  # pragma: no cover - closing at exit
            logger.debug("closing the probe client failed", exc_info=True)
