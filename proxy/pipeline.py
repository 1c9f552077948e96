"""Builds each route's layer stack from the validated config: the sidecar's filter chain.

Order, outermost first (a request walks down, the response walks back up):

0. metrics            counts/times every answer, inner layers' too  layers/metrics.py
                      (wrapped around the stack in build_runtime, so it stays outermost)
1. body limit         413 before anything else reads the body      layers/body_limit.py
2. rate limit         token bucket per client key, 429              layers/rate_limit.py
3. idempotency        claim/replay keyed requests (inside rate      layers/idempotency.py
                      limiting, so a 429 is never stored)
4. cache              GET/HEAD replay, coalescing, stale-if-error   layers/cache.py
5. forward            headers, streaming, 502/504                   forward.py
     └ upstream call:
       retry            backoff, timeouts, budget, safety rules;      layers/retry.py
                        503 circuit-open when every circuit is open
       └ cluster        endpoint choice skipping open circuits,       upstream/cluster.py
                        per-endpoint breaker, pooled HTTP/1.1          layers/circuit_breaker.py

Everything is built once per config load; a request allocates no policy objects.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.config.schema import Config, Route
from proxy.forward import Forwarder
from proxy.headers import TrustedProxies
from proxy.layers.body_limit import BodyLimitLayer
from proxy.layers.cache import cache_layer
from proxy.layers.idempotency import IdempotencyLayer
from proxy.layers.metrics import MetricsLayer
from proxy.layers.rate_limit import rate_limit_layer
from proxy.layers.retry import RetryingCall
from proxy.layers.retry_budget import RetryBudget
from proxy.routing import UNMATCHED, CompiledRoute, Router, compile_route
from proxy.store.idempotency import open_idempotency_store
from proxy.store.redis_client import open_redis
from proxy.store.redis_pipe import RedisPipe
from proxy.types import ASGIApp
from proxy.upstream.cluster import Cluster


class Shared:
    """Process-wide resources that outlive config reloads (the store connection)."""

    def __init__(self, config: Config) -> None:
        self.store_config = config.store
        redis = config.store.backend == "redis" and config.store.url is not None
        # redis-py for what is off the hot path (cache, health PING); one multiplexed,
        # auto-pipelined connection for per-request commands (idempotency, rate limits).
        self.redis = open_redis(config.store) if redis else None
        self.pipe = RedisPipe(config.store.url, config.store.timeout) if redis else None
        self.idempotency = open_idempotency_store(config.store, self.pipe)
        # In-process state of memory-backend stores that must survive reloads (rate-limit
        # buckets, cached responses), keyed by (feature, route endpoint).
        self.memory: dict[tuple[str, str], object] = {}

    async def close(self) -> None:
        self.idempotency.close()
        if self.pipe is not None:
            self.pipe.close()
        if self.redis is not None:
            await self.redis.aclose()


@dataclass
class Runtime:
    """Everything built from one config: swapped as a whole on reload."""

    config: Config
    router: Router
    clusters: dict[str, Cluster]
    trusted: TrustedProxies
    shared: Shared

    def close(self) -> None:
        for cluster in self.clusters.values():
            cluster.close()


def build_runtime(config: Config, shared: Shared) -> Runtime:
    """Compile routes and build every route's pipeline (needs a running event loop)."""
    clusters = {name: Cluster(name, upstream) for name, upstream in config.upstreams.items()}
    compiled = [compile_route(i, route) for i, route in enumerate(config.routes)]
    default = CompiledRoute(-1, Route(upstream=config.default_upstream), UNMATCHED, None)
    for route in [*compiled, default]:
        route.app = build_route_app(route, config, clusters, shared)
        if config.metrics.enabled:
            route.app = MetricsLayer(route.app, route.endpoint)
    trusted = TrustedProxies(config.trusted_proxies)
    return Runtime(config, Router(compiled, default), clusters, trusted, shared)


def build_route_app(
    route: CompiledRoute, config: Config, clusters: dict[str, Cluster], shared: Shared
) -> ASGIApp:
    """The layer stack of one route, innermost first."""
    settings = route.config
    cluster = clusters[settings.upstream]
    retry = settings.retry or cluster.config.retry
    budget = cluster.retry_budget  # the upstream's, unless the route's retry sets its own
    if settings.retry is not None and "budget" in settings.retry.model_fields_set:
        budget = RetryBudget(settings.retry.budget)
    call = RetryingCall(cluster, retry, budget)
    app: ASGIApp = Forwarder(call, max_buffered_body=retry.max_buffered_body)
    max_body = settings.limits.max_body_bytes
    if max_body is None:
        max_body = config.limits.max_body_bytes
    if settings.cache is not None:
        app = cache_layer(app, settings.cache, route.endpoint, shared)
    idempotency = settings.idempotency
    if idempotency is not None and idempotency.enabled:
        app = IdempotencyLayer(
            app, idempotency, shared.idempotency, endpoint=route.endpoint, max_body=max_body
        )
    if settings.rate_limit is not None:
        app = rate_limit_layer(app, settings.rate_limit, route, shared)
    if max_body is not None:
        app = BodyLimitLayer(app, max_body)
    return app
