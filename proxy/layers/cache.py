"""Per-route response cache for GET and HEAD, with request coalescing and stale-if-error.

Key: method, ``Host``, raw path and query, the route's ``vary_headers``, then the request
values of the headers the stored response's ``Vary`` names (a :class:`VaryMarker` under
the first key points to the variant). What may be stored and for how long is decided once
per response by ``proxy/cache_policy.py``; a lookup compares timestamps.

- fresh entry → replayed with its end-to-end headers, ``Age`` and ``X-Cache: HIT``; the
  upstream is not called;
- otherwise one request per key and process goes upstream (``X-Cache: MISS``) while
  concurrent requests for the same key wait for it and share its stored answer; with
  Redis, coalescing is still per process (N replicas make at most N calls);
- an expired entry still inside its stale window is kept at hand: if the answer comes back
  500/502/503/504 (the upstream's, or the sidecar's own 502/504 and the 503 of an open
  circuit) it is dropped unseen and the stale copy is served with ``X-Cache: STALE``;
- answers larger than ``max_entry_bytes`` stream through and are not stored.

Request ``Cache-Control`` is not honoured (as nginx and Varnish by default): the sidecar
caches on the upstream's behalf, and clients cannot bust it. ``Range`` requests bypass.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from proxy.cache_policy import ERROR_STATUSES, storage_plan
from proxy.config.schema import Cache
from proxy.context import RequestContext
from proxy.metrics import CACHE
from proxy.store.cache import CachedResponse, MemoryCacheStore, RedisCacheStore, VaryMarker
from proxy.types import ASGIApp, Headers, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from proxy.pipeline import Shared

CacheStore = MemoryCacheStore | RedisCacheStore
Outcome = tuple[CachedResponse, bytes] | None  # what a leader hands its followers

# Response headers that belong to one exchange, not to the stored representation.
_NOT_STORED = frozenset({b"x-request-id", b"connection", b"age", b"x-cache"})


def cache_layer(app: ASGIApp, config: Cache, endpoint: str, shared: Shared) -> CacheLayer:
    """Build the layer for a route, reusing its memory store across config reloads."""
    store: CacheStore
    if shared.redis is not None:
        store = RedisCacheStore(shared.redis, shared.store_config.key_prefix)
    else:
        existing = shared.memory.get(("cache", endpoint))
        if isinstance(existing, MemoryCacheStore):
            existing.resize(config.max_bytes)
            store = existing
        else:
            store = MemoryCacheStore(config.max_bytes)
            shared.memory[("cache", endpoint)] = store
    return CacheLayer(app, config, endpoint=endpoint, store=store)


def _vary_values(headers: Headers, names: tuple[bytes, ...]) -> tuple[bytes, ...]:
    values = []
    for wanted in names:
        found = [value.strip() for name, value in headers if name == wanted]
        values.append(b",".join(found))
    return tuple(values)


def _vary_key(names: tuple[bytes, ...], values: tuple[bytes, ...]) -> bytes:
    return b"".join(
        b"\x00" + name + b"=" + value for name, value in zip(names, values, strict=True)
    )


class CacheLayer:
    """ASGI layer serving one route's cacheable requests from ``store``."""

    def __init__(self, app: ASGIApp, config: Cache, *, endpoint: str, store: CacheStore) -> None:
        self.app = app
        self.store = store
        self.ttl = config.ttl
        self.stale_if_error = config.stale_if_error
        self.max_entry_bytes = config.max_entry_bytes
        self.config_vary = tuple(sorted({h.lower().encode("latin-1") for h in config.vary_headers}))
        self.inflight: dict[bytes, asyncio.Future[Outcome]] = {}
        self.hits = CACHE.labels(endpoint, "hit")
        self.misses = CACHE.labels(endpoint, "miss")
        self.stales = CACHE.labels(endpoint, "stale")
        self.bypasses = CACHE.labels(endpoint, "bypass")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method != "GET" and method != "HEAD":
            self.bypasses.inc()
            await self.app(scope, receive, send)
            return
        headers: Headers = scope["headers"]
        host = b""
        auth = False
        for name, value in headers:
            if name == b"host":
                host = value
            elif name == b"authorization":
                auth = True
            elif name == b"range":
                self.bypasses.inc()
                await self.app(scope, receive, send)
                return
        path = scope.get("raw_path") or scope["path"].encode("utf-8")
        key = method.encode() + b" " + host + b" " + path + b"?" + scope["query_string"]
        if self.config_vary:
            key += _vary_key(self.config_vary, _vary_values(headers, self.config_vary))
        primary = key

        record = await self.store.get(key)
        if isinstance(record, VaryMarker):
            key = primary + _vary_key(record.names, _vary_values(headers, record.names))
            record = await self.store.get(key)
        stale: CachedResponse | None = None
        if isinstance(record, CachedResponse) and self._usable(record, headers, auth):
            now = time.time()
            if now < record.fresh_until:
                self.hits.inc()
                await self._replay(record, b"HIT", scope, send)
                return
            if now < record.stale_until:
                stale = record

        future = self.inflight.get(key)
        if future is not None:
            outcome = await asyncio.shield(future)
            if outcome is not None and self._usable(outcome[0], headers, auth):
                entry, label = outcome
                (self.stales if label == b"STALE" else self.hits).inc()
                await self._replay(entry, label, scope, send)
                return
            await self._fetch(scope, receive, send, primary, stale, auth)  # not shareable
            return

        future = asyncio.get_running_loop().create_future()
        self.inflight[key] = future
        outcome = None
        try:
            outcome = await self._fetch(scope, receive, send, primary, stale, auth)
        finally:
            if self.inflight.get(key) is future:
                del self.inflight[key]
            future.set_result(outcome)

    def _usable(self, record: CachedResponse, headers: Headers, auth: bool) -> bool:
        if auth and not record.shared_auth:
            return False
        return not record.vary or _vary_values(headers, record.vary) == record.vary_values

    async def _replay(self, record: CachedResponse, label: bytes, scope: Scope, send: Send) -> None:
        ctx: RequestContext = scope["sidecar"]
        headers = [
            *record.headers,
            (b"age", str(record.age(time.time())).encode()),
            (b"x-cache", label),
            (b"x-request-id", ctx.request_id),
        ]
        await send({"type": "http.response.start", "status": record.status, "headers": headers})
        body = b"" if scope["method"] == "HEAD" else record.body
        await send({"type": "http.response.body", "body": body})

    async def _fetch(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        primary: bytes,
        stale: CachedResponse | None,
        auth: bool,
    ) -> Outcome:
        """Call the upstream, relay (or, on error with a stale copy, swallow) its answer,
        and store it when the policy allows."""
        max_bytes = self.max_entry_bytes
        storing = False
        swallow = False
        complete = False
        status = 0
        kept: Headers = []
        parts: list[bytes] = []
        size = 0
        plan = None

        async def capture(message: Message) -> None:
            nonlocal storing, swallow, complete, status, kept, size, plan, parts
            if message["type"] == "http.response.start":
                status = message["status"]
                if stale is not None and status in ERROR_STATUSES:
                    swallow = True
                    return
                response_headers: Headers = message["headers"]
                plan = storage_plan(
                    status,
                    response_headers,
                    now=time.time(),
                    request_has_auth=auth,
                    ttl=self.ttl,
                    stale_if_error=self.stale_if_error,
                )
                if plan is not None:
                    storing = True
                    kept = [(n, v) for n, v in response_headers if n not in _NOT_STORED]
                    for name, value in kept:
                        if name == b"content-length" and (
                            not value.isdigit() or int(value) > max_bytes
                        ):
                            storing = False
                await send({**message, "headers": [*response_headers, (b"x-cache", b"MISS")]})
                return
            if swallow:
                return
            if storing:
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > max_bytes:
                    storing = False
                    parts = []
                else:
                    parts.append(chunk)
                    if not message.get("more_body", False):
                        complete = True
            await send(message)

        await self.app(scope, receive, capture)
        if swallow:
            assert stale is not None
            self.stales.inc()
            await self._replay(stale, b"STALE", scope, send)
            return stale, b"STALE"
        self.misses.inc()
        if not (storing and complete) or plan is None:
            return None
        body = b"".join(parts)
        if scope["method"] == "GET" and not any(n == b"content-length" for n, _ in kept):
            kept.append((b"content-length", str(len(body)).encode()))
        now = time.time()
        fresh_until = now + plan.fresh_for
        vary = plan.vary
        headers: Headers = scope["headers"]
        entry = CachedResponse(
            status,
            kept,
            body,
            stored_at=now,
            fresh_until=fresh_until,
            stale_until=fresh_until + plan.stale_for,
            initial_age=plan.initial_age,
            vary=vary,
            vary_values=_vary_values(headers, vary) if vary else (),
            shared_auth=plan.shared_auth,
        )
        if vary:
            marker = VaryMarker(vary, entry.stale_until)
            await self.store.set(
                [(primary, marker), (primary + _vary_key(vary, entry.vary_values), entry)]
            )
        else:
            await self.store.set([(primary, entry)])
        return entry, b"HIT"
