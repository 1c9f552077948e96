"""The validated configuration model: one pydantic class per YAML section.

Every model forbids unknown keys, so a typo is an error naming its field instead of a
silently ignored setting. Defaults are the documented behaviour; ``config/sidecar.yaml``
spells them out with comments.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proxy.config.units import Duration, Size

HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
RETRY_CONDITIONS = frozenset({"connect-failure", "reset", "timeout", "5xx"})
BREAKER_FAILURES = frozenset({"connect-failure", "reset", "timeout", "5xx"})


class Model(BaseModel):
    """Base for every section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Listen(Model):
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)


class AdminPaths(Model):
    live: str = "/api/live"
    ready: str = "/api/ready"
    health: str = "/api/health"
    metrics: str = "/api/metrics"
    config: str = "/api/config"


class Admin(Model):
    host: str = "127.0.0.1"
    port: int = Field(9901, ge=0, le=65535)
    paths: AdminPaths = AdminPaths()


class Store(Model):
    backend: Literal["memory", "redis"] = "memory"
    url: str | None = Field(
        None, description="redis://[:password@]host:port/db; secrets are redacted"
    )
    key_prefix: str = "sidecar:"
    timeout: Duration = Field(0.25, description="per store operation")
    max_entries: int = Field(100_000, ge=1, description="memory backend: LRU bound per namespace")

    @model_validator(mode="after")
    def _redis_needs_url(self) -> Store:
        if self.backend == "redis" and not self.url:
            raise ValueError("url: required when backend is redis")
        return self


class Timeouts(Model):
    connect: Duration = 1.0
    request: Duration = Field(30.0, description="until the upstream's response headers arrive")
    idle: Duration = Field(60.0, description="between two reads of a streamed response body")


class Pool(Model):
    max_idle_per_endpoint: int = Field(64, ge=0)
    idle_timeout: Duration = Field(
        4.0, description="close pooled connections idle this long (keep below the upstream's)"
    )


class HealthCheck(Model):
    enabled: bool = True
    path: str = "/healthz"
    interval: Duration = 5.0
    timeout: Duration = 1.0
    healthy_threshold: int = Field(1, ge=1)
    unhealthy_threshold: int = Field(1, ge=1)


class CircuitBreaker(Model):
    enabled: bool = True
    failure_threshold: int | None = Field(
        5, ge=1, description="consecutive failures that open it; null: ratio mode only"
    )
    failure_ratio: float | None = Field(
        None, gt=0, le=1, description="also open when this share of the window failed"
    )
    window: Duration = 10.0
    min_requests: int = Field(20, ge=1)
    success_threshold: int = Field(2, ge=1)
    open_timeout: Duration = 60.0
    half_open_max_requests: int = Field(1, ge=1)
    failure_on: list[str] = ["connect-failure", "reset", "timeout", "5xx"]

    @field_validator("failure_on", mode="before")
    @classmethod
    def _failure_codes_as_text(cls, value: object) -> object:
        return _status_codes_as_text(value)

    @field_validator("failure_on")
    @classmethod
    def _known_failures(cls, value: list[str]) -> list[str]:
        return _check_conditions(value, BREAKER_FAILURES, "failure kind")

    @model_validator(mode="after")
    def _one_mode(self) -> CircuitBreaker:
        if self.failure_threshold is None and self.failure_ratio is None:
            raise ValueError("failure_threshold: give it, failure_ratio, or both")
        return self


class RetryBudget(Model):
    ratio: float = Field(0.2, ge=0, le=10)
    min_per_second: float = Field(10, ge=0)
    window: Duration = 10.0


class Retry(Model):
    max_attempts: int = Field(3, ge=1, le=10)
    base_delay: Duration = 0.1
    max_delay: Duration = 2.0
    per_try_timeout: Duration | None = None
    timeout: Duration | None = Field(None, description="overall, across all attempts and backoffs")
    retry_on: list[str] = ["connect-failure", "reset", "502", "503", "504"]
    budget: RetryBudget = RetryBudget()
    max_buffered_body: Size = Field(65536, description="larger request bodies are sent once")

    @field_validator("retry_on", mode="before")
    @classmethod
    def _retry_codes_as_text(cls, value: object) -> object:
        return _status_codes_as_text(value)

    @field_validator("retry_on")
    @classmethod
    def _known_conditions(cls, value: list[str]) -> list[str]:
        return _check_conditions(value, RETRY_CONDITIONS, "retry condition")

    @model_validator(mode="after")
    def _delays_ordered(self) -> Retry:
        if self.max_delay < self.base_delay:
            raise ValueError("max_delay: must be >= base_delay")
        return self


class Upstream(Model):
    url: str | None = None
    urls: list[str] | None = None
    timeouts: Timeouts = Timeouts()
    pool: Pool = Pool()
    health_check: HealthCheck = HealthCheck()
    circuit_breaker: CircuitBreaker = CircuitBreaker()
    retry: Retry = Retry()

    @model_validator(mode="after")
    def _one_or_more_urls(self) -> Upstream:
        if bool(self.url) == bool(self.urls):
            raise ValueError("give exactly one of url or urls")
        for url in self.endpoints:
            if not re.match(r"^http://[^/\s:]+(:\d+)?/?$", url):
                raise ValueError(
                    f"{url!r}: must look like http://host:port (https is not supported)"
                )
        return self

    @property
    def endpoints(self) -> list[str]:
        return list(self.urls) if self.urls else [self.url or ""]


class Limits(Model):
    max_header_bytes: Size = 65536
    max_headers: int = Field(100, ge=1)
    max_url_bytes: Size = 8192
    max_body_bytes: Size | None = None
    request_headers_timeout: Duration = 10.0
    body_idle_timeout: Duration = 30.0


class RouteLimits(Model):
    max_body_bytes: Size | None = None


class Shutdown(Model):
    drain_delay: Duration = Field(
        5.0, description="after SIGTERM, keep serving (readiness failing) this long"
    )
    drain_timeout: Duration = Field(
        25.0, description="from SIGTERM, the longest wait for in-flight requests before exit"
    )

    @model_validator(mode="after")
    def _delay_within_timeout(self) -> Shutdown:
        if self.drain_delay > self.drain_timeout:
            raise ValueError("drain_delay: must be <= drain_timeout")
        return self


class IdempotencyScope(Model):
    by: Literal["client_ip", "header", "none"] = "client_ip"
    header: str = "Authorization"


class Idempotency(Model):
    enabled: bool = True
    required: bool = False
    ttl: Duration = 86400.0
    lease: Duration = Field(
        60.0, description="how long an in-flight claim holds without completing"
    )
    methods: list[str] = ["POST", "PATCH"]
    headers: list[str] = ["Idempotency-Key", "X-Idempotency-Key"]
    max_stored_body: Size = 1048576
    scope: IdempotencyScope = IdempotencyScope()
    fingerprint_headers: list[str] = []
    store_server_errors: bool = Field(True, description="store upstream 5xx answers, like Stripe")
    forward_header: str | None = Field(
        "Idempotency-Key", description="header carrying the scoped key to the upstream"
    )
    on_store_error: Literal["fail_closed", "fail_open"] = "fail_closed"

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        return _check_methods(value)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one header carrying the key")
        return value

    @model_validator(mode="after")
    def _lease_within_ttl(self) -> Idempotency:
        # A claim kept shorter than its lease could vanish while its request still runs.
        if self.lease > self.ttl:
            raise ValueError("lease: must not exceed ttl")
        return self


class RateLimit(Model):
    requests_per_second: float = Field(gt=0)
    burst: int | None = Field(
        None, ge=1, description="bucket size; defaults to requests_per_second"
    )
    key: str = Field("client_ip", description="client_ip, route, or header:NAME")
    on_store_error: Literal["fail_open", "fail_closed"] = "fail_open"

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        if value in ("client_ip", "route") or (value.startswith("header:") and len(value) > 7):
            return value
        raise ValueError("must be client_ip, route, or header:NAME")


class Cache(Model):
    ttl: Duration = Field(description="freshness when the upstream gives none")
    stale_if_error: Duration = 0.0
    max_entry_bytes: Size = 1048576
    max_bytes: Size = Field(67108864, description="memory backend: total size bound")
    vary_headers: list[str] = []


class Match(Model):
    path: str | None = None
    path_prefix: str | None = None
    methods: list[str] | None = None

    @model_validator(mode="after")
    def _one_path(self) -> Match:
        if self.path is not None and self.path_prefix is not None:
            raise ValueError("give path or path_prefix, not both")
        for value in (self.path, self.path_prefix):
            if value is not None and not value.startswith("/"):
                raise ValueError(f"{value!r}: must start with /")
        return self

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _check_methods(value)


class Route(Model):
    name: str | None = Field(None, description="metrics label; defaults to the path template")
    match: Match = Match()
    upstream: str = "app"
    idempotency: Idempotency | None = None
    limits: RouteLimits = RouteLimits()
    rate_limit: RateLimit | None = None
    cache: Cache | None = None
    retry: Retry | None = Field(None, description="overrides the upstream's retry policy")


class HealthSettings(Model):
    critical: list[Literal["upstream", "store", "circuit_breakers", "system"]] = [
        "upstream",
        "store",
    ]
    interval: Duration = Field(5.0, gt=0, description="how often the store and system checks run")
    store_latency_warn: Duration = Field(0.1, description="PING slower than this warns")
    memory_warn_ratio: float = Field(0.8, gt=0, le=1, description="RSS / container limit")
    memory_fail_ratio: float = Field(0.95, gt=0, le=1)
    loop_lag_warn: Duration = 0.1
    loop_lag_fail: Duration = 1.0
    cpu_warn_ratio: float = Field(0.9, gt=0, description="share of one core (warn only)")

    @model_validator(mode="after")
    def _warn_before_fail(self) -> HealthSettings:
        if self.memory_warn_ratio > self.memory_fail_ratio:
            raise ValueError("memory_warn_ratio: must be <= memory_fail_ratio")
        if self.loop_lag_warn > self.loop_lag_fail:
            raise ValueError("loop_lag_warn: must be <= loop_lag_fail")
        return self


class Metrics(Model):
    enabled: bool = True


class Logging(Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = False


class Reload(Model):
    watch: bool = Field(True, description="reload when the file changes (and on SIGHUP)")
    interval: Duration = 2.0


class Config(Model):
    listen: Listen = Listen()
    admin: Admin = Admin()
    store: Store = Store()
    upstreams: dict[str, Upstream] = {"app": Upstream(url="http://127.0.0.1:3000")}
    trusted_proxies: list[str] = []
    limits: Limits = Limits()
    shutdown: Shutdown = Shutdown()
    health: HealthSettings = HealthSettings()
    metrics: Metrics = Metrics()
    logging: Logging = Logging()
    reload: Reload = Reload()
    routes: list[Route] = []
    default_upstream: str = Field("app", description="where requests that match no route go")

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR") from None
        return value

    @model_validator(mode="after")
    def _references(self) -> Config:
        if not self.upstreams:
            raise ValueError("upstreams: at least one upstream is required")
        for index, route in enumerate(self.routes):
            if route.upstream not in self.upstreams:
                raise ValueError(
                    f"routes[{index}].upstream: unknown upstream {route.upstream!r} "
                    f"(defined: {', '.join(sorted(self.upstreams))})"
                )
        if self.default_upstream not in self.upstreams:
            raise ValueError(f"default_upstream: unknown upstream {self.default_upstream!r}")
        if self.listen.port and self.listen.port == self.admin.port:
            raise ValueError("admin.port: must differ from listen.port")
        return self


def _status_codes_as_text(value: object) -> object:
    """YAML reads ``[reset, 503]`` as a string and an int: accept codes written either way."""
    if isinstance(value, list):
        return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    return value


def _check_conditions(value: list[str], known: frozenset[str], what: str) -> list[str]:
    """Every item a known condition name or a status code (``retry_on``, ``failure_on``)."""
    value = [str(v) for v in value]
    for item in value:
        if item not in known and not _is_status(item):
            raise ValueError(
                f"unknown {what} {item!r} (use {', '.join(sorted(known))} "
                "or a status code such as 503)"
            )
    return value


def _is_status(item: str) -> bool:
    return item.isdigit() and 100 <= int(item) <= 599


def _check_methods(value: list[str]) -> list[str]:
    upper = [m.upper() for m in value]
    for method in upper:
        if method not in HTTP_METHODS:
            raise ValueError(f"unknown HTTP method {method!r}")
    return upper
