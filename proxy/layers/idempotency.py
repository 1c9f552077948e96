"""Idempotency keys: a keyed request is executed at most once; its retries get the answer.

For the route's ``methods`` (POST and PATCH by default), a request carrying
``Idempotency-Key`` (or ``X-Idempotency-Key``) is handled like this:

1. The key is validated (1..255 printable characters, an RFC 8941 quoted string is unquoted)
   and scoped by a client identity the client cannot choose (its address, or a hash of a
   header such as ``Authorization``), so one client never sees another's response.
2. The body is read (bounded by the route's body limit) and handed to the forwarder in
   ``scope["sidecar.body"]``; method, route, path, query, chosen headers and the body digest
   form the request's fingerprint.
3. One atomic store operation claims the key or returns its record: a different fingerprint
   is a 422, an in-flight claim a 409 with ``Retry-After``, a completed one is replayed
   byte-identically (plus ``Idempotent-Replayed: true``), an unknown outcome is a 409.
4. The claimed request is forwarded with the scoped key in ``forward_header`` and
   ``ctx.idempotency_key`` set (which lets the retry layer retry it). Its response streams to
   the client while being captured; the record is written before the final body chunk goes
   out, so a client that has seen the answer always gets it replayed.

What is recorded: the upstream's answer (5xx too unless ``store_server_errors: false``);
``unknown`` when the sidecar answered an upstream failure after the request may have reached
the upstream (timeout, reset); nothing (the claim is released) when it certainly did not
(connect refused, open circuit) or the sidecar refused it; ``not_replayable`` when the
response exceeded ``max_stored_body`` or was cut short. A store failure answers 503
(``on_store_error: fail_closed``, the default) or forwards without protection (``fail_open``).
Requests of other methods, and unkeyed requests on optional routes, never touch the store.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets

from proxy.config.schema import Idempotency
from proxy.context import RequestContext
from proxy.forward import answer_upstream_error, read_body
from proxy.metrics import IDEMPOTENCY
from proxy.problem import send_problem
from proxy.store.idempotency import IdempotencyStore, Record, StoredResponse, StoreUnavailable
from proxy.types import ASGIApp, Headers, Message, Receive, Scope, Send
from proxy.upstream.errors import UpstreamError

logger = logging.getLogger("sidecar.idempotency")

OUTCOMES = (
    "stored",
    "replayed",
    "conflict",
    "mismatch",
    "unknown",
    "not_replayable",
    "released",
    "store_error",
    "invalid_key",
    "missing_key",
)
_KEY_RE = re.compile(rb"[\x20-\x7e]{1,255}")
_REPLAY_MARKERS = ((b"x-idempotent-replayed", b"true"), (b"idempotent-replayed", b"true"))
_NOT_STORED = frozenset({b"connection", b"x-request-id", b"x-idempotency-key"})
_RETRY_AFTER = (b"retry-after", b"1")


class IdempotencyLayer:
    """ASGI layer applying one route's ``idempotency`` settings."""

    def __init__(
        self,
        app: ASGIApp,
        settings: Idempotency,
        store: IdempotencyStore,
        *,
        endpoint: str,
        max_body: int | None,
    ) -> None:
        self.app = app
        self.store = store
        self.methods = frozenset(settings.methods)
        self.key_headers = frozenset(h.lower().encode("latin-1") for h in settings.headers)
        self.required = settings.required
        self.ttl = settings.ttl
        self.lease = settings.lease
        self.max_stored_body = settings.max_stored_body
        # The body must be buffered to fingerprint it: the route's limit, else a sane bound.
        self.max_request_body = max_body if max_body is not None else settings.max_stored_body
        self.scope_by = settings.scope.by
        self.scope_header = settings.scope.header.lower().encode("latin-1")
        self.fingerprint_headers = tuple(
            h.lower().encode("latin-1") for h in settings.fingerprint_headers
        )
        self.store_server_errors = settings.store_server_errors
        self.forward_header = (
            settings.forward_header.lower().encode("latin-1") if settings.forward_header else None
        )
        self.strip_headers = self.key_headers | (
            {self.forward_header} if self.forward_header else set()
        )
        self.fail_open = settings.on_store_error == "fail_open"
        self.route_tag = endpoint.encode()
        self.outcomes = {name: IDEMPOTENCY.labels(endpoint, name) for name in OUTCOMES}
        self._store_failing = False
        self._background: set[asyncio.Task[None]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in self.methods:
            await self.app(scope, receive, send)
            return
        raw_key: bytes | None = None
        conflicting = False
        content_length: int | None = None
        key_headers = self.key_headers
        for name, value in scope["headers"]:
            if name in key_headers:
                conflicting = conflicting or (raw_key is not None and value != raw_key)
                raw_key = value
            elif name == b"content-length":
                content_length = int(value)
        ctx: RequestContext = scope["sidecar"]
        if raw_key is None:
            if self.required:
                self.outcomes["missing_key"].inc()
                await self._problem(
                    ctx,
                    send,
                    400,
                    "idempotency-key-missing",
                    "this route requires an Idempotency-Key header",
                    None,
                )
                return
            await self.app(scope, receive, send)
            return
        key = _unquote(raw_key)
        if conflicting or not _KEY_RE.fullmatch(key):
            self.outcomes["invalid_key"].inc()
            detail = (
                "conflicting idempotency key headers"
                if conflicting
                else "an idempotency key must be 1 to 255 printable ASCII characters"
            )
            await self._problem(ctx, send, 400, "idempotency-key-invalid", detail, None)
            return
        key_header = (b"x-idempotency-key", raw_key)

        limit = self.max_request_body
        if content_length is not None and content_length > limit:
            await self._too_large(ctx, send, limit)
            return
        body = await _read_body(receive, limit)
        if body is None:
            await self._too_large(ctx, send, limit)
            return

        identity = self._identity(scope, ctx)
        record_id = hashlib.sha256(identity + b"\n" + key).hexdigest()
        fingerprint = self._fingerprint(scope, body)
        owner = secrets.token_hex(8)
        try:
            found = await self.store.claim(record_id, owner, fingerprint, self.lease, self.ttl)
        except StoreUnavailable as exc:
            self._release_later(record_id, owner)
            await self._store_unavailable(exc, scope, receive, send, body, key_header)
            return
        if self._store_failing:
            self._store_failing = False
            logger.info("idempotency store reachable again")
        if found is not None:
            await self._answer_duplicate(ctx, send, found, fingerprint, key_header)
            return

        forwarded = key.decode("ascii")
        if identity:
            forwarded = hashlib.sha256(identity).hexdigest()[:16] + ":" + forwarded
        ctx.idempotency_key = forwarded
        scope["headers"] = self._upstream_headers(scope["headers"], forwarded)
        scope["sidecar.body"] = body
        exchange = _Exchange(self, ctx, send, record_id, owner, fingerprint, key_header)
        try:
            await self.app(scope, receive, exchange.send)
        except UpstreamError as exc:
            if exchange.pending_start is None:
                raise  # part of the answer is out: the server cuts it short
            # The upstream failed after its head but before any body byte, and the head
            # was held here: the client gets a 502/504 rather than a truncated answer.
            exchange.pending_start = None
            ctx.error = exc.kind
            await exchange.settle(complete=False)
            await answer_upstream_error(send, exc, ctx.request_id)
        finally:
            if not exchange.settled:
                await exchange.settle(complete=False)

    # -- request side ------------------------------------------------------------------

    def _identity(self, scope: Scope, ctx: RequestContext) -> bytes:
        """Who the key belongs to, in a form the client cannot pick by choosing a key."""
        if self.scope_by == "none":
            return b""
        if self.scope_by == "header":
            for name, value in scope["headers"]:
                if name == self.scope_header:
                    return b"h:" + hashlib.sha256(value).digest()
            # Without the header, fall back to the address rather than one shared namespace.
        return b"ip:" + ctx.client_ip.encode()

    def _fingerprint(self, scope: Scope, body: bytes) -> str:
        digest = hashlib.sha256()
        digest.update(scope["method"].encode() + b"\n" + self.route_tag + b"\n")
        digest.update(scope.get("raw_path") or scope["path"].encode())
        digest.update(b"?" + scope["query_string"])
        if self.fingerprint_headers:
            values = dict.fromkeys(self.fingerprint_headers, b"")
            for name, value in scope["headers"]:
                if name in values:
                    values[name] += value + b","
            for name, value in values.items():
                digest.update(b"\n" + name + b":" + value)
        digest.update(b"\n\n" + body)
        return digest.hexdigest()

    def _upstream_headers(self, headers: Headers, forwarded: str) -> Headers:
        """The client's key headers replaced by the scoped key in ``forward_header``."""
        strip = self.strip_headers
        out = [(name, value) for name, value in headers if name not in strip]
        if self.forward_header is not None:
            out.append((self.forward_header, forwarded.encode()))
        return out

    # -- answers -----------------------------------------------------------------------

    async def _answer_duplicate(
        self,
        ctx: RequestContext,
        send: Send,
        found: Record,
        fingerprint: str,
        key_header: tuple[bytes, bytes],
    ) -> None:
        if found.fingerprint != fingerprint:
            self.outcomes["mismatch"].inc()
            await self._problem(
                ctx,
                send,
                422,
                "idempotency-key-mismatch",
                "this idempotency key was used with a different request (method, path, "
                "headers or body)",
                key_header,
            )
        elif found.state == "done":
            assert found.response is not None
            self.outcomes["replayed"].inc()
            await self._replay(ctx, send, found.response, key_header)
        elif found.state == "pending":
            self.outcomes["conflict"].inc()
            await self._problem(
                ctx,
                send,
                409,
                "idempotency-key-in-flight",
                "a request with this idempotency key is still being processed; retry later",
                key_header,
                _RETRY_AFTER,
            )
        elif found.state == "unknown":
            self.outcomes["conflict"].inc()
            await self._problem(
                ctx,
                send,
                409,
                "idempotency-outcome-unknown",
                "an earlier request with this idempotency key may or may not have been "
                "executed by the upstream (it timed out or failed after being sent); it will "
                "not be executed again with this key",
                key_header,
            )
        else:
            self.outcomes["conflict"].inc()
            await self._problem(
                ctx,
                send,
                409,
                "idempotency-response-not-stored",
                "an earlier request with this idempotency key was executed, but its response "
                "could not be stored (too large or interrupted) and cannot be replayed",
                key_header,
                original_status=found.status,
            )

    async def _replay(
        self,
        ctx: RequestContext,
        send: Send,
        response: StoredResponse,
        key_header: tuple[bytes, bytes],
    ) -> None:
        headers = [
            *response.headers,
            (b"x-request-id", ctx.request_id),
            key_header,
            *_REPLAY_MARKERS,
        ]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})

    async def _problem(
        self,
        ctx: RequestContext,
        send: Send,
        status: int,
        slug: str,
        detail: str,
        key_header: tuple[bytes, bytes] | None,
        *extra_headers: tuple[bytes, bytes],
        **extra: object,
    ) -> None:
        ctx.error = slug
        headers = [(b"x-request-id", ctx.request_id), *extra_headers]
        if key_header is not None:
            headers.append(key_header)
        await send_problem(send, status, slug, detail, headers, **extra)

    async def _too_large(self, ctx: RequestContext, send: Send, limit: int) -> None:
        ctx.error = "body_too_large"
        await send_problem(
            send,
            413,
            "body-too-large",
            f"a request with an idempotency key must have a body of at most {limit} bytes "
            "(it is kept to fingerprint the request)",
            [(b"x-request-id", ctx.request_id), (b"connection", b"close")],
        )

    # -- store failures ----------------------------------------------------------------

    async def _store_unavailable(
        self,
        exc: StoreUnavailable,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: bytes,
        key_header: tuple[bytes, bytes],
    ) -> None:
        self.outcomes["store_error"].inc()
        if not self._store_failing:
            self._store_failing = True
            logger.warning(
                "idempotency store unavailable (%s): keyed requests are %s",
                exc,
                "forwarded unprotected" if self.fail_open else "answered 503",
            )
        ctx: RequestContext = scope["sidecar"]
        if self.fail_open:
            scope["sidecar.body"] = body

            async def keyed_send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message["headers"], key_header]
                await send(message)

            await self.app(scope, receive, keyed_send)
            return
        await self._problem(
            ctx,
            send,
            503,
            "idempotency-store-unavailable",
            "the idempotency store is unavailable, so this keyed request was not forwarded; "
            "retry later",
            key_header,
            _RETRY_AFTER,
        )

    def _release_later(self, record_id: str, owner: str) -> None:
        """A claim whose reply was lost may still have been taken: give it back if we can."""
        task = asyncio.ensure_future(self._quiet_release(record_id, owner))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _quiet_release(self, record_id: str, owner: str) -> None:
        """Retry the release with backoff until the lease would end: a store that was slow
        or cut off may have taken the claim, and the request was never forwarded, so the
        key must become free again once the store answers (not ``unknown`` for a day)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lease
        delay = 0.1
        while True:
            try:
                await self.store.release(record_id, owner)
                return
            except StoreUnavailable:
                if loop.time() + delay >= deadline:
                    return  # the lease turns it into "unknown": conservative, never a rerun
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


class _Exchange:
    """A claimed request's response on its way to the client, captured for the record."""

    __slots__ = (
        "ctx",
        "fingerprint",
        "headers",
        "key_header",
        "layer",
        "overflow",
        "owner",
        "parts",
        "pending_start",
        "record_id",
        "send_downstream",
        "settled",
        "sidecar_answer",
        "size",
        "status",
    )

    def __init__(
        self,
        layer: IdempotencyLayer,
        ctx: RequestContext,
        send: Send,
        record_id: str,
        owner: str,
        fingerprint: str,
        key_header: tuple[bytes, bytes],
    ) -> None:
        self.layer = layer
        self.ctx = ctx
        self.send_downstream = send
        self.record_id = record_id
        self.owner = owner
        self.fingerprint = fingerprint
        self.key_header = key_header
        self.status: int | None = None
        self.headers: Headers = []
        self.sidecar_answer = False
        self.parts: list[bytes] = []
        self.size = 0
        self.overflow = False
        self.settled = False
        self.pending_start: Message | None = None

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            # The forwarder sets ctx.error before answering an upstream failure itself.
            self.sidecar_answer = self.ctx.error is not None
            self.headers = message["headers"]
            message["headers"] = [*self.headers, self.key_header]
            # Held until the first body message: when that is the whole body, the record is
            # written first and head and body then leave together (one write, not two).
            self.pending_start = message
            return
        if kind == "http.response.body":
            chunk = message.get("body", b"")
            if chunk and not self.overflow:
                self.size += len(chunk)
                if self.size > self.layer.max_stored_body:
                    self.overflow = True
                    self.parts = []
                else:
                    self.parts.append(bytes(chunk))
            if not message.get("more_body", False) and not self.settled:
                # Record before the client sees the end: a retry after it is always replayed.
                await self.settle(complete=True)
        start = self.pending_start
        if start is not None:
            self.pending_start = None
            await self.send_downstream(start)
        await self.send_downstream(message)

    async def settle(self, *, complete: bool) -> None:
        """Write what happened to the record (once)."""
        self.settled = True
        layer, ctx = self.layer, self.ctx
        status = self.status
        record: Record | None
        if status is None or self.sidecar_answer:
            # The sidecar answered (or nothing was sent): was the upstream possibly reached?
            if ctx.upstream_sent:
                record, outcome = Record("unknown", self.fingerprint), "unknown"
            else:
                record, outcome = None, "released"
        elif complete and not self.overflow and ctx.error is None:
            if status >= 500 and not layer.store_server_errors:
                record, outcome = None, "released"
            else:
                headers = [(n, v) for n, v in self.headers if n not in _NOT_STORED]
                response = StoredResponse(status, headers, b"".join(self.parts))
                record, outcome = Record("done", self.fingerprint, response=response), "stored"
        else:
            record = Record("not_replayable", self.fingerprint, status=status)
            outcome = "not_replayable"
        try:
            if record is None:
                await layer.store.release(self.record_id, self.owner)
            else:
                await layer.store.finish(self.record_id, self.owner, record, layer.ttl)
        except StoreUnavailable as exc:
            # The claim stays pending, then reads as unknown after its lease: never re-executed.
            layer.outcomes["store_error"].inc()
            logger.warning("could not record an idempotent request's outcome: %s", exc)
            return
        layer.outcomes[outcome].inc()


def _unquote(raw: bytes) -> bytes:
    """``"abc"`` (an RFC 8941 string, as the IETF draft sends it) and ``abc`` are one key."""
    if len(raw) >= 2 and raw[0] == 0x22 and raw[-1] == 0x22:
        return raw[1:-1].replace(b'\\"', b'"').replace(b"\\\\", b"\\")
    return raw


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None once it grows past ``limit``."""
    parts, complete = await read_body(receive, limit)
    size = sum(map(len, parts))
    return b"".join(parts) if complete and size <= limit else None
