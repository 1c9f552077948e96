"""Per-route rate limiting: a token bucket per client key, 429 when it is empty.

The key is the client address (``ctx.client_ip``, which believes ``X-Forwarded-For`` only
from ``trusted_proxies``, so a client cannot pick its own bucket), a request header
(``header:NAME``, hashed; requests without it fall back to their client address), or the
whole route (``route``). Buckets live in the configured store (see
``proxy/store/rate_limit.py``): in process for ``memory``, one Lua script per decision for
``redis`` so every replica draws from the same bucket.

Every answer carries the IETF ``RateLimit-Policy`` and ``RateLimit`` fields
(draft-ietf-httpapi-ratelimit-headers, structured-field syntax): the policy is
``q`` = burst in a window ``w`` = burst / rate seconds, and ``r`` / ``t`` are the tokens left
and the seconds until the bucket is full again. A refusal is a 429 problem with
``Retry-After`` (seconds until one token is back). When Redis fails, the route fails open
(allowed without headers, counted) or closed (503), per ``on_store_error``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from typing import TYPE_CHECKING

from proxy.config.schema import RateLimit
from proxy.context import RequestContext
from proxy.metrics import RATE_LIMIT_STORE_ERRORS, RATE_LIMITED, STORE_DURATION, STORE_ERRORS
from proxy.problem import send_problem
from proxy.store.rate_limit import MemoryRateLimiter, RedisRateLimiter
from proxy.store.redis_client import STORE_FAILURES
from proxy.store.redis_pipe import RedisReplyError
from proxy.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from proxy.pipeline import Shared
    from proxy.routing import CompiledRoute

logger = logging.getLogger("sidecar.rate_limit")

_POLICY_ID_RE = re.compile(r"[^A-Za-z0-9_.:/*-]")
_STORE_FAILURES = (*STORE_FAILURES, RedisReplyError)
_LOG_EVERY = 10.0  # seconds between two warnings about the store


def policy_id(name: str | None) -> str:
    """The policy identifier: the route's name (printable, no quotes) or ``default``."""
    cleaned = _POLICY_ID_RE.sub("_", name or "")
    return cleaned or "default"


def rate_limit_layer(
    app: ASGIApp, config: RateLimit, route: CompiledRoute, shared: Shared
) -> RateLimitLayer:
    """Build the layer for a route; memory buckets are process-wide and survive reloads."""
    memory = redis = None
    if shared.pipe is not None:
        redis = RedisRateLimiter(shared.pipe)
    else:
        existing = shared.memory.get(("rate_limit", ""))
        if not isinstance(existing, MemoryRateLimiter):
            existing = MemoryRateLimiter(shared.store_config.max_entries)
            shared.memory[("rate_limit", "")] = existing
        memory = existing
    return RateLimitLayer(
        app,
        config,
        endpoint=route.endpoint,
        name=route.config.name,
        memory=memory,
        redis=redis,
        redis_prefix=shared.store_config.key_prefix,
    )


class RateLimitLayer:
    """ASGI layer enforcing one route's ``rate_limit`` before anything else runs."""

    def __init__(
        self,
        app: ASGIApp,
        config: RateLimit,
        *,
        endpoint: str,
        name: str | None,
        memory: MemoryRateLimiter | None,
        redis: RedisRateLimiter | None,
        redis_prefix: str,
    ) -> None:
        if (memory is None) == (redis is None):
            raise ValueError("give exactly one of memory or redis")
        self.app = app
        self.rate = config.requests_per_second
        self.burst = config.burst or max(1, math.ceil(config.requests_per_second))
        self.interval = 1.0 / self.rate
        self.memory = memory
        self.redis = redis
        self.fail_open = config.on_store_error == "fail_open"
        mode = config.key
        self.by_route = mode == "route"
        self.header = mode[7:].lower().encode("latin-1") if mode.startswith("header:") else None
        # Memory buckets are per process: a short prefix; Redis keys are namespaced.
        self.prefix = (endpoint + "\x00") if memory is not None else f"{redis_prefix}rl:{endpoint}:"
        self.id = policy_id(name)
        window = max(1, math.ceil(self.burst / self.rate))
        self.policy_header = f'"{self.id}";q={self.burst};w={window}'.encode()
        self.rejected = RATE_LIMITED.labels(endpoint)
        self.failed_open = RATE_LIMIT_STORE_ERRORS.labels(endpoint, "allowed")
        self.failed_closed = RATE_LIMIT_STORE_ERRORS.labels(endpoint, "rejected")
        self.store_errors = STORE_ERRORS.labels("redis", "rate_limit")
        self.store_duration = STORE_DURATION.labels("redis", "rate_limit")
        self._last_warning = 0.0

    def key(self, scope: Scope, ctx: RequestContext) -> str:
        if self.by_route:
            return self.prefix + "*"
        if self.header is not None:
            for name, value in scope["headers"]:
                if name == self.header:
                    return self.prefix + "h:" + hashlib.blake2b(value, digest_size=16).hexdigest()
        return self.prefix + "ip:" + ctx.client_ip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx: RequestContext = scope["sidecar"]
        key = self.key(scope, ctx)
        if self.memory is not None:
            allowed, remaining, reset, retry_after = self.memory.hit(key, self.interval, self.burst)
        else:
            try:
                allowed, remaining, reset, retry_after = await self._redis_hit(key)
            except _STORE_FAILURES as exc:
                await self._store_failed(exc, ctx, scope, receive, send)
                return
        quota = b'"%s";r=%d;t=%d' % (self.id.encode(), remaining, math.ceil(reset))
        if not allowed:
            self.rejected.inc()
            ctx.error = "rate_limited"
            wait = max(1, math.ceil(retry_after))
            await send_problem(
                send,
                429,
                "rate-limited",
                f"rate limit of {self.rate:g} requests/s (burst {self.burst}) exceeded; "
                f"retry in {wait}s",
                [
                    (b"retry-after", str(wait).encode()),
                    (b"ratelimit-policy", self.policy_header),
                    (b"ratelimit", quota),
                    (b"x-request-id", ctx.request_id),
                ],
            )
            return
        extra = [(b"ratelimit-policy", self.policy_header), (b"ratelimit", quota)]

        async def send_with_quota(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"], *extra]
            await send(message)

        await self.app(scope, receive, send_with_quota)

    async def _redis_hit(self, key: str) -> tuple[bool, int, float, float]:
        assert self.redis is not None
        start = time.perf_counter()
        try:
            return await self.redis.hit(key, self.interval, self.burst)
        finally:
            self.store_duration.observe(time.perf_counter() - start)

    async def _store_failed(
        self, exc: BaseException, ctx: RequestContext, scope: Scope, receive: Receive, send: Send
    ) -> None:
        self.store_errors.inc()
        now = time.monotonic()
        if now - self._last_warning > _LOG_EVERY:
            self._last_warning = now
            logger.warning(
                "rate-limit store failed (%s: %s); failing %s",
                exc.__class__.__name__,
                exc,
                "open" if self.fail_open else "closed",
            )
        if self.fail_open:
            self.failed_open.inc()
            await self.app(scope, receive, send)
            return
        self.failed_closed.inc()
        ctx.error = "store_unavailable"
        await send_problem(
            send,
            503,
            "rate-limit-store-unavailable",
            "the rate-limit store is unavailable and this route fails closed",
            [(b"retry-after", b"1"), (b"x-request-id", ctx.request_id)],
        )
