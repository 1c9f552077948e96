"""The ``/api/metrics?format=json`` document: a human- and script-friendly summary.

Per endpoint (route template): request counts by status and method, error rates and
latency p50/p90/p95/p99 (from the endpoint's :class:`~proxy.sketch.QuantileSketch`, within
1% of the exact value of that rank, counted since the process started); then process
memory and CPU, system load, event-loop lag and each upstream endpoint's health and circuit
breaker state. Counts are read from the Prometheus counters themselves, so both views agree.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import psutil

from proxy import system
from proxy.metrics import BREAKER_STATE, HTTP_REQUESTS, LATENCY_SKETCHES, LOOP_LAG
from proxy.sketch import QuantileSketch

if TYPE_CHECKING:
    from proxy.app import ProxyState
    from proxy.health import UpstreamProber

QUANTILES = (0.5, 0.9, 0.95, 0.99)
BREAKER_STATES = {0: "closed", 1: "half_open", 2: "open"}


def metrics_document(state: ProxyState, prober: UpstreamProber | None = None) -> dict[str, Any]:
    """Build the JSON metrics view from the live counters, sketches and system readings."""
    endpoints = _endpoint_counts()
    totals = _empty_counts()
    for counts in endpoints.values():
        totals["requests"] += counts["requests"]
        for status, count in counts["by_status"].items():
            totals["by_status"][status] = totals["by_status"].get(status, 0) + count
        for method, count in counts["by_method"].items():
            totals["by_method"][method] = totals["by_method"].get(method, 0) + count
    for counts in [totals, *endpoints.values()]:
        _add_rates(counts)
    overall = QuantileSketch()
    for name, sketch in LATENCY_SKETCHES.items():
        if sketch.count and name in endpoints:
            overall.merge(sketch)
            endpoints[name]["latency_ms"] = _latency(sketch)
    totals["latency_ms"] = _latency(overall)
    totals["in_flight"] = state.in_flight
    return {
        "uptime_seconds": round(time.time() - _PROCESS_START, 3),
        "draining": state.draining,
        "requests": totals,
        "endpoints": dict(sorted(endpoints.items())),
        "quantiles": {
            "method": "log-bucketed sketch per endpoint since start (DDSketch mapping)",
            "relative_accuracy": overall.relative_accuracy,
        },
        "process": _process(),
        "system": _system(),
        "event_loop": {"lag_seconds": _gauge_value(LOOP_LAG)},
        "upstreams": _upstreams(state, prober),
    }


# -- requests -----------------------------------------------------------------------------
def _empty_counts() -> dict[str, Any]:
    return {"requests": 0, "by_status": {}, "by_method": {}}


def _endpoint_counts() -> dict[str, dict[str, Any]]:
    endpoints: dict[str, dict[str, Any]] = {}
    for family in HTTP_REQUESTS.collect():
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            count = int(sample.value)
            labels = sample.labels
            entry = endpoints.setdefault(labels["endpoint"], _empty_counts())
            entry["requests"] += count
            by_status, by_method = entry["by_status"], entry["by_method"]
            by_status[labels["status"]] = by_status.get(labels["status"], 0) + count
            by_method[labels["method"]] = by_method.get(labels["method"], 0) + count
    for entry in endpoints.values():
        entry["by_status"] = dict(sorted(entry["by_status"].items()))
        entry["by_method"] = dict(sorted(entry["by_method"].items()))
    return endpoints


def _add_rates(counts: dict[str, Any]) -> None:
    """``error_rate``: share of 5xx answers; ``client_error_rate``: share of 4xx."""
    total = counts["requests"]
    server = sum(n for status, n in counts["by_status"].items() if status.startswith("5"))
    client = sum(n for status, n in counts["by_status"].items() if status.startswith("4"))
    counts["errors"] = server
    counts["client_errors"] = client
    counts["error_rate"] = round(server / total, 6) if total else 0.0
    counts["client_error_rate"] = round(client / total, 6) if total else 0.0


def _latency(sketch: QuantileSketch) -> dict[str, float | int | None]:
    values = sketch.quantiles(QUANTILES)
    document: dict[str, float | int | None] = {"count": sketch.count}
    for q, value in zip(QUANTILES, values, strict=True):
        document[f"p{round(q * 100)}"] = None if value is None else round(value * 1000, 3)
    document["mean"] = round(sketch.sum / sketch.count * 1000, 3) if sketch.count else None
    document["max"] = round(sketch.max * 1000, 3) if sketch.count else None
    return document


# -- process and system -------------------------------------------------------------------
_PROCESS_START = psutil.Process().create_time()


class _CpuMeter:
    """Process CPU percent between successive readings (first: average since start)."""

    def __init__(self) -> None:
        self.last_wall = _PROCESS_START
        self.last_cpu = 0.0

    def percent(self, cpu_total: float) -> float:
        now = time.time()
        elapsed = now - self.last_wall
        used = cpu_total - self.last_cpu
        self.last_wall, self.last_cpu = now, cpu_total
        return round(100.0 * used / elapsed, 2) if elapsed > 0 else 0.0


_CPU = _CpuMeter()


def _process() -> dict[str, Any]:
    rss = system.rss_bytes()
    limit = system.memory_limit_bytes()
    user, sys_ = system.cpu_times()
    return {
        "pid": os.getpid(),
        "memory": {
            "rss_bytes": rss,
            "limit_bytes": limit,
            "limit_ratio": round(rss / limit, 6) if limit else None,
        },
        "cpu": {
            "user_seconds": round(user, 3),
            "system_seconds": round(sys_, 3),
            "percent": _CPU.percent(user + sys_),
        },
        "threads": system.threads(),
        "open_fds": system.open_fds(),
    }


def _system() -> dict[str, Any]:
    one, five, fifteen = system.load_average()
    memory = psutil.virtual_memory()
    return {
        "load_average": {"1m": round(one, 3), "5m": round(five, 3), "15m": round(fifteen, 3)},
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": int(memory.total),
        "memory_available_bytes": int(memory.available),
    }


# -- upstreams ----------------------------------------------------------------------------
def _upstreams(state: ProxyState, prober: UpstreamProber | None) -> dict[str, Any]:
    gauges: dict[tuple[str, str], str] = {}
    for family in BREAKER_STATE.collect():
        for sample in family.samples:
            key = (sample.labels["upstream"], sample.labels["endpoint"])
            gauges[key] = BREAKER_STATES.get(int(sample.value), str(sample.value))
    results = prober.results if prober is not None else {}
    upstreams: dict[str, Any] = {}
    for name, cluster in state.runtime.clusters.items():
        endpoints = []
        for endpoint in cluster.endpoints:
            probe = results.get(endpoint.url)
            breaker = getattr(endpoint, "breaker", None)
            if not cluster.config.circuit_breaker.enabled:
                breaker_state = "disabled"
            elif breaker is not None:
                breaker_state = breaker.state  # applies time-driven open -> half_open
            else:
                breaker_state = gauges.get((name, endpoint.url), "closed")
            endpoints.append(
                {
                    "url": endpoint.url,
                    "healthy": endpoint.healthy,
                    "health_check": None if probe is None else probe.detail,
                    "circuit_breaker": breaker_state,
                }
            )
        upstreams[name] = {"endpoints": endpoints}
    return upstreams


def _gauge_value(gauge: Any) -> float | None:
    for family in gauge.collect():
        for sample in family.samples:
            return float(sample.value)
    return None
