"""Every metric the sidecar exports, defined in one place (names are a contract: SPEC.md).

Layers import the objects they record into. Label values are always bounded: ``endpoint``
is a route template (or ``unmatched``), ``method`` is a known method or ``_OTHER``, and
other labels come from fixed vocabularies (outcomes, reasons, states).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

from proxy.sketch import QuantileSketch

# `*_created` series double the series count and nothing here reads them.
disable_created_metrics()

# Sub-millisecond through tens of seconds.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "_OTHER"


# -- seed-compatible request metrics ------------------------------------------------------
HTTP_REQUESTS = Counter(
    "http_requests_total",
    "Requests answered by the proxy listener.",
    ["method", "endpoint", "status"],
)
HTTP_DURATION = Histogram(
    "http_request_duration_seconds",
    "Time from request arrival to the end of the response, by route template.",
    ["method", "endpoint"],
    buckets=LATENCY_BUCKETS,
)

# Latency per endpoint for the JSON view's p50/p90/p95/p99 (1% relative accuracy, see
# proxy/sketch.py), shared by every route with that label and kept across reloads.
LATENCY_SKETCHES: dict[str, QuantileSketch] = {}


def latency_sketch(endpoint: str) -> QuantileSketch:
    sketch = LATENCY_SKETCHES.get(endpoint)
    if sketch is None:
        sketch = LATENCY_SKETCHES[endpoint] = QuantileSketch()
    return sketch


# -- sidecar-specific ---------------------------------------------------------------------
IN_FLIGHT = Gauge("sidecar_requests_in_flight", "Requests being handled by the proxy listener.")
UPSTREAM_REQUESTS = Counter(
    "sidecar_upstream_requests_total",
    "Attempts sent to upstreams, by outcome (status class or failure kind).",
    ["upstream", "outcome"],
)
UPSTREAM_DURATION = Histogram(
    "sidecar_upstream_request_duration_seconds",
    "Time from sending an attempt to its response head.",
    ["upstream"],
    buckets=LATENCY_BUCKETS,
)
RETRIES = Counter(
    "sidecar_retries_total", "Retries sent, by upstream and reason.", ["upstream", "reason"]
)
RETRIES_DENIED = Counter(
    "sidecar_retries_denied_total",
    "Retries not sent, by upstream and why (budget, unsafe, deadline).",
    ["upstream", "reason"],
)
BREAKER_STATE = Gauge(
    "sidecar_circuit_breaker_state",
    "Circuit breaker state per endpoint: 0 closed, 1 half-open, 2 open.",
    ["upstream", "endpoint"],
)
BREAKER_TRANSITIONS = Counter(
    "sidecar_circuit_breaker_transitions_total",
    "Circuit breaker state changes.",
    ["upstream", "endpoint", "from_state", "to_state"],
)
BREAKER_REJECTIONS = Counter(
    "sidecar_circuit_breaker_rejections_total",
    "Requests failed fast because every endpoint's circuit was open.",
    ["upstream"],
)
IDEMPOTENCY = Counter(
    "sidecar_idempotency_requests_total",
    "Keyed requests by outcome: stored, replayed, conflict, mismatch, unknown, "
    "not_replayable, released, store_error, invalid_key, missing_key.",
    ["endpoint", "outcome"],
)
RATE_LIMITED = Counter(
    "sidecar_rate_limit_rejections_total", "Requests answered 429.", ["endpoint"]
)
RATE_LIMIT_STORE_ERRORS = Counter(
    "sidecar_rate_limit_store_errors_total",
    "Rate-limit decisions the store could not make, by what was done (allowed or rejected).",
    ["endpoint", "action"],
)
CACHE = Counter(
    "sidecar_cache_requests_total",
    "Cache lookups by result: hit, miss, stale, bypass.",
    ["endpoint", "result"],
)
STORE_ERRORS = Counter(
    "sidecar_store_errors_total",
    "Store operations that failed or timed out.",
    ["backend", "operation"],
)
STORE_DURATION = Histogram(
    "sidecar_store_operation_duration_seconds",
    "Store operation latency.",
    ["backend", "operation"],
    buckets=LATENCY_BUCKETS,
)
CONFIG_RELOADS = Counter(
    "sidecar_config_reloads_total", "Config reload attempts by result (success, error).", ["result"]
)
for _result in ("success", "error"):  # both series exist (at 0) before the first reload
    CONFIG_RELOADS.labels(_result)
LOOP_LAG = Gauge("sidecar_event_loop_lag_seconds", "Last measured event-loop scheduling delay.")
DRAINING = Gauge("sidecar_draining", "1 while the sidecar drains before shutdown.")
