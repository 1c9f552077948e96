"""The four health checks and how each grades its latest reading as pass, warn or fail.

- ``upstream``: the active probes (``proxy/health.py``) combined with the passive circuit
  breaker state, per endpoint. An endpoint that fails is ``fail`` only when no endpoint of
  its upstream can serve; otherwise the upstream still works and it is ``warn``.
- ``store``: Redis ``PING`` and its latency, measured in the background (:class:`StoreCheck`).
- ``system``: RSS against the container's memory limit, event-loop lag and CPU use, sampled
  in the background (:class:`SystemCheck`).
- ``circuit_breakers``: each endpoint's breaker; open or half-open warns, and every
  endpoint of an upstream open fails when the upstream check is critical.

Every observation is a :class:`CheckResult` in the IETF health-check draft's terms. Grading
reads only memory (probe results, breaker attributes), so answering is never slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from redis.asyncio import Redis

from proxy import system
from proxy.config.schema import HealthSettings, Store
from proxy.health import UpstreamProber
from proxy.metrics import STORE_DURATION, STORE_ERRORS
from proxy.upstream.cluster import Cluster, Endpoint

Status = Literal["pass", "warn", "fail"]
CHECKS = ("upstream", "store", "circuit_breakers", "system")
_RANK: dict[str, int] = {"pass": 0, "warn": 1, "fail": 2}
_MIB = 1024 * 1024
_MIN_CPU_WINDOW = 1.0  # seconds: shorter windows (startup) say more about noise than load


def worst(statuses: Iterable[Status]) -> Status:
    """The most severe status (``pass`` for none)."""
    result: Status = "pass"
    for status in statuses:
        if _RANK[status] > _RANK[result]:
            result = status
    return result


@dataclass(slots=True)
class CheckResult:
    """One observation of one component: a ``checks`` entry of ``application/health+json``."""

    check: str  # upstream | store | circuit_breakers | system
    name: str  # the second half of the key: an upstream's name, "redis", "memory"...
    component_id: str
    component_type: str
    status: Status
    output: str
    observed_value: float | str | None = None
    observed_unit: str | None = None
    threshold: dict[str, float] | None = None  # "warn"/"fail" limits in observed_unit
    time: float = field(default_factory=time.time)  # wall clock of the observation
    duration: float = 0.0  # seconds the measurement took
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.check}:{self.name}"

    def document(self, *, critical: bool) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "componentId": self.component_id,
            "componentType": self.component_type,
            "status": self.status,
        }
        if self.observed_value is not None:
            doc["observedValue"] = self.observed_value
            if self.observed_unit:
                doc["observedUnit"] = self.observed_unit
        if self.threshold:
            doc["threshold"] = self.threshold
        doc["output"] = self.output
        doc["time"] = iso_time(self.time)
        doc["durationMs"] = round(self.duration * 1000, 3)
        doc["critical"] = critical
        doc.update(self.details)
        return doc


def iso_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


# -- circuit breakers (built by the breaker layer; read defensively) ----------------------
def breaker_state(endpoint: Endpoint) -> str | None:
    """``closed``/``open``/``half_open`` from ``endpoint.breaker``, or None without one."""
    breaker = getattr(endpoint, "breaker", None)
    if breaker is None or not getattr(breaker, "enabled", True):
        return None
    state = getattr(breaker, "state", None)
    state = getattr(state, "value", state)  # an Enum or a plain string
    if state is None:
        return None
    return str(state).lower().replace("-", "_").replace(" ", "_")


def breaker_snapshot(endpoint: Endpoint) -> dict[str, Any] | None:
    breaker = getattr(endpoint, "breaker", None)
    for name in ("snapshot", "as_dict", "to_dict"):
        method = getattr(breaker, name, None)
        if callable(method):
            with contextlib.suppress(Exception):
                value = method()
                # JSON-safe whatever it holds (enums, datetimes...)
                return (
                    json.loads(json.dumps(value, default=str)) if isinstance(value, dict) else None
                )
    return None


def breaker_results(cluster: Cluster, upstream_critical: bool) -> list[CheckResult]:
    states = [breaker_state(endpoint) for endpoint in cluster.endpoints]
    all_open = all(state == "open" for state in states)
    results = []
    for endpoint, state in zip(cluster.endpoints, states, strict=True):
        details: dict[str, Any] = {"upstream": cluster.name}
        if state is None:
            status: Status = "pass"
            enabled = cluster.config.circuit_breaker.enabled
            output = "no circuit breaker" + ("" if enabled else " (disabled in the config)")
        elif state == "closed":
            status, output = "pass", "circuit closed"
        elif state == "open":
            if all_open and upstream_critical:
                status = "fail"
                output = f"circuit open on every endpoint of {cluster.name}: requests fail fast"
            else:
                status, output = "warn", "circuit open: requests to this endpoint fail fast"
        else:
            status, output = "warn", f"circuit {state}: trial requests decide"
        snapshot = breaker_snapshot(endpoint)
        if snapshot is not None:
            details["breaker"] = snapshot
        results.append(
            CheckResult(
                "circuit_breakers",
                cluster.name,
                endpoint.url,
                "circuit-breaker",
                status,
                output,
                observed_value=state or "none",
                details=details,
            )
        )
    return results


# -- upstream -----------------------------------------------------------------------------
def upstream_results(cluster: Cluster, prober: UpstreamProber) -> list[CheckResult]:
    """Per endpoint: the active probe's verdict with the breaker's passive view."""
    check = cluster.config.health_check
    readings: list[tuple[bool, CheckResult]] = []  # (down, reading) per endpoint
    for endpoint in cluster.endpoints:
        state = breaker_state(endpoint)
        health = prober.endpoint_health(cluster.name, endpoint.url) if check.enabled else None
        last = health.last if health is not None else None
        down = False
        status: Status = "pass"
        if not check.enabled:
            output = "no active health check; judged by its circuit breaker"
        elif health is None or last is None:
            status, output = "warn", "not probed yet"
        elif health.healthy is False:
            down = True
            output = f"{last.detail} ({health.failures} failed probe(s) in a row)"
        elif not last.ok:
            status = "warn"
            output = (
                f"{last.detail} ({health.failures} of {check.unhealthy_threshold} failures "
                "before unhealthy)"
            )
        else:
            output = last.detail
        if state == "open":
            if check.enabled:
                status = worst((status, "warn"))
                output += "; circuit open (passive: recent requests failed)"
            else:
                down = True
                output = "circuit open: recent requests failed"
        elif state == "half_open":
            status = worst((status, "warn"))
            output += "; circuit half-open"
        details: dict[str, Any] = {"upstream": cluster.name}
        if state is not None:
            details["breakerState"] = state
        if last is not None and last.status_code is not None:
            details["statusCode"] = last.status_code
        result = CheckResult(
            "upstream",
            cluster.name,
            endpoint.url,
            "upstream",
            status,
            output,
            observed_value=None if last is None else round(last.duration * 1000, 3),
            observed_unit="ms",
            threshold={"fail": round(check.timeout * 1000, 3)} if check.enabled else None,
            time=last.checked_at if last is not None else time.time(),
            duration=last.duration if last is not None else 0.0,
            details=details,
        )
        readings.append((down, result))
    all_down = all(down for down, _ in readings)
    for down, result in readings:
        if down and all_down:
            result.status = "fail"
        elif down:
            result.status = "warn"
            result.output += "; other endpoints still serve"
    return [result for _, result in readings]


# -- store --------------------------------------------------------------------------------
class StoreCheck:
    """PINGs the Redis store in the background; the memory store needs no check."""

    def __init__(self, config: Store, redis: Redis | None) -> None:
        self.config = config
        self.redis = redis
        self.latest: CheckResult | None = None
        if redis is not None and config.url:
            parts = urlsplit(config.url)  # no credentials in the answer
            self.component_id = (
                f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"
            )
        else:
            self.component_id = "memory"

    async def run_once(self, settings: HealthSettings) -> CheckResult:
        assert self.redis is not None
        timeout = self.config.timeout
        threshold = {
            "warn": round(settings.store_latency_warn * 1000, 3),
            "fail": round(timeout * 1000, 3),
        }
        checked_at = time.time()
        start = time.perf_counter()
        value: float | None = None
        try:
            async with asyncio.timeout(timeout):
                await self.redis.ping()
        except TimeoutError:
            status: Status = "fail"
            output = f"PING: no answer within {timeout * 1000:g} ms"
        except Exception as exc:  # connection refused, auth, protocol...
            status, output = "fail", f"PING failed: {exc.__class__.__name__}: {exc}"
        else:
            value = round((time.perf_counter() - start) * 1000, 3)
            slow = value >= threshold["warn"]
            status = "warn" if slow else "pass"
            output = f"PONG in {value:g} ms" + (" (slow)" if slow else "")
        duration = time.perf_counter() - start
        STORE_DURATION.labels("redis", "ping").observe(duration)
        if status == "fail":
            STORE_ERRORS.labels("redis", "ping").inc()
        self.latest = CheckResult(
            "store",
            "redis",
            self.component_id,
            "datastore",
            status,
            output,
            observed_value=value,
            observed_unit="ms",
            threshold=threshold,
            time=checked_at,
            duration=duration,
        )
        return self.latest

    def result(self) -> CheckResult:
        if self.redis is None:
            return CheckResult(
                "store", "memory", "memory", "datastore", "pass", "in-process memory store"
            )
        if self.latest is None:
            return CheckResult(
                "store", "redis", self.component_id, "datastore", "warn", "not checked yet"
            )
        return self.latest


# -- system -------------------------------------------------------------------------------
class SystemCheck:
    """Memory against the container limit, event-loop lag and CPU, sampled in the background."""

    def __init__(self, loop_lag: system.LoopLagMonitor) -> None:
        self.loop_lag = loop_lag
        self.latest: list[CheckResult] = []
        self._cpu_mark = (sum(system.cpu_times()), time.monotonic())
        self._cpu_ratio: float | None = None  # over the last window; None before the first

    def sample(self, settings: HealthSettings) -> list[CheckResult]:
        start = time.perf_counter()
        checked_at = time.time()
        memory = memory_result(system.rss_bytes(), system.memory_limit_bytes(), settings)
        lag = loop_lag_result(self.loop_lag.lag, settings)
        lag.time = self.loop_lag.last_sample
        cpu_used, now = sum(system.cpu_times()), time.monotonic()
        used, since = self._cpu_mark
        if now - since >= _MIN_CPU_WINDOW:
            self._cpu_mark = (cpu_used, now)
            self._cpu_ratio = (cpu_used - used) / (now - since)
        cpu = cpu_result(self._cpu_ratio, system.load_average(), settings)
        duration = time.perf_counter() - start
        for result in (memory, cpu):
            result.time, result.duration = checked_at, duration
        self.latest = [memory, lag, cpu]
        return self.latest

    def results(self, settings: HealthSettings) -> list[CheckResult]:
        return self.latest or self.sample(settings)


def memory_result(rss: int, limit: int | None, settings: HealthSettings) -> CheckResult:
    if limit is None:
        return CheckResult(
            "system",
            "memory",
            "process",
            "system",
            "pass",
            f"RSS {rss / _MIB:.1f} MiB; no container memory limit found",
            observed_value=rss,
            observed_unit="bytes",
        )
    ratio = rss / limit
    status: Status = (
        "fail"
        if ratio >= settings.memory_fail_ratio
        else "warn"
        if ratio >= settings.memory_warn_ratio
        else "pass"
    )
    return CheckResult(
        "system",
        "memory",
        "process",
        "system",
        status,
        f"RSS {rss / _MIB:.1f} MiB of the {limit / _MIB:.1f} MiB container limit ({ratio:.0%})",
        observed_value=rss,
        observed_unit="bytes",
        threshold={
            "warn": int(limit * settings.memory_warn_ratio),
            "fail": int(limit * settings.memory_fail_ratio),
        },
        details={"limitBytes": limit},
    )


def loop_lag_result(lag: float, settings: HealthSettings) -> CheckResult:
    status: Status = (
        "fail"
        if lag >= settings.loop_lag_fail
        else "warn"
        if lag >= settings.loop_lag_warn
        else "pass"
    )
    return CheckResult(
        "system",
        "event_loop_lag",
        "event-loop",
        "system",
        status,
        f"timers run {lag * 1000:.1f} ms late",
        observed_value=round(lag * 1000, 3),
        observed_unit="ms",
        threshold={
            "warn": round(settings.loop_lag_warn * 1000, 3),
            "fail": round(settings.loop_lag_fail * 1000, 3),
        },
    )


def cpu_result(
    ratio: float | None, load: tuple[float, float, float], settings: HealthSettings
) -> CheckResult:
    """CPU as a share of one core (the proxy runs one event loop); warns, never fails."""
    status: Status = "warn" if ratio is not None and ratio >= settings.cpu_warn_ratio else "pass"
    used = "not measured yet" if ratio is None else f"{ratio:.0%} of one core"
    return CheckResult(
        "system",
        "cpu",
        "process",
        "system",
        status,
        f"{used}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        observed_value=None if ratio is None else round(ratio * 100, 1),
        observed_unit="percent",
        threshold={"warn": round(settings.cpu_warn_ratio * 100, 1)},
        details={"loadAverage": [round(x, 2) for x in load]},
    )
