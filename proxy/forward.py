"""The innermost layer: forward the request upstream and stream the answer back.

Bodies stream both ways without being held in memory; a request body is buffered only when
it is small enough for the retry policy to replay it. Failures map to problem documents:
connect failures, resets and malformed responses to 502, timeouts to 504.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable

from proxy.context import RequestContext
from proxy.headers import add_forwarding, response_headers, scan_request
from proxy.problem import send_problem
from proxy.types import Receive, Scope, Send
from proxy.upstream.cluster import UpstreamRequest
from proxy.upstream.errors import UpstreamError
from proxy.upstream.http11 import IDEMPOTENT_METHODS, Response

logger = logging.getLogger("sidecar.forward")

UpstreamCall = Callable[[UpstreamRequest], Awaitable[Response]]

# Responses at most this long whose body has fully arrived are sent in one message and
# need no disconnect watcher.
_WATCH_THRESHOLD = 65536


class ClientDisconnected(Exception):
    """The client went away while we were reading its request body."""


class UpstreamRejected(Exception):
    """A wrapping upstream layer refused the call (open circuit, exhausted budget...).

    Carries the problem to answer with, so the forwarder stays ignorant of the policy.
    """

    def __init__(
        self, status: int, slug: str, detail: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.headers = headers or []


_ERROR_STATUS = {"connect-failure": 502, "reset": 502, "protocol": 502, "timeout": 504}
_ERROR_SLUG = {
    "connect-failure": "upstream-unreachable",
    "reset": "upstream-reset",
    "protocol": "upstream-malformed-response",
    "timeout": "upstream-timeout",
}


class Forwarder:
    """ASGI app that proxies to ``call`` (a cluster, usually wrapped by retry/breaker)."""

    def __init__(self, call: UpstreamCall, *, max_buffered_body: int) -> None:
        self.call = call
        self.max_buffered_body = max_buffered_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx: RequestContext = scope["sidecar"]
        req = scan_request(scope["headers"])
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        add_forwarding(req, peer, ctx.peer_trusted, scope["scheme"], ctx.request_id)
        method = scope["method"]
        target = scope["raw_path"].decode("latin-1") if scope.get("raw_path") else scope["path"]
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")

        body: bytes | AsyncIterator[bytes] | None
        length = req.content_length
        chunked = False
        if req.chunked:
            if scope.get("sidecar.body") is not None:
                body = scope["sidecar.body"]
            else:
                # Like nginx's request buffering, but bounded: a small chunked body is read
                # whole first, so a framing error or a size limit is caught before the
                # upstream sees anything, and it is sent with a Content-Length.
                body = await _buffer_or_stream(receive, self.max_buffered_body)
            if isinstance(body, bytes):
                length = len(body)
            else:
                chunked = True
        elif length:
            buffered = scope.get("sidecar.body")
            if buffered is not None:
                body = buffered
            elif length <= self.max_buffered_body:
                body = b"".join((await read_body(receive))[0])
            else:
                body = _stream(receive)
        else:
            body = None
        if chunked:
            req.headers.append((b"transfer-encoding", b"chunked"))
        elif length is not None or method in ("POST", "PUT", "PATCH"):
            req.headers.append((b"content-length", str(length or 0).encode()))

        buffered = not chunked and not isinstance(body, AsyncIterator)
        request = UpstreamRequest(
            method,
            target,
            req.headers,
            body,
            chunked,
            replayable=buffered and method in IDEMPOTENT_METHODS,
            keyed=buffered and ctx.idempotency_key is not None,
        )
        try:
            response = await self.call(request)
        except UpstreamError as exc:
            ctx.error = exc.kind
            ctx.upstream_sent = request.sent or exc.sent
            await answer_upstream_error(send, exc, ctx.request_id)
            return
        except UpstreamRejected as exc:
            ctx.error = exc.slug
            ctx.upstream_sent = request.sent
            await send_problem(
                send,
                exc.status,
                exc.slug,
                exc.detail,
                [*exc.headers, (b"x-request-id", ctx.request_id)],
            )
            return
        except BaseException:
            ctx.upstream_sent = request.sent  # cancelled or failed: may it have been seen?
            raise
        await relay_response(response, ctx, receive, send)


async def answer_upstream_error(send: Send, exc: UpstreamError, request_id: bytes) -> None:
    """The problem answer (502/504) for an upstream failure."""
    await send_problem(
        send,
        _ERROR_STATUS.get(exc.kind, 502),
        _ERROR_SLUG.get(exc.kind, "upstream-error"),
        str(exc),
        [(b"x-request-id", request_id)],
    )


async def relay_response(
    response: Response, ctx: RequestContext, receive: Receive, send: Send
) -> None:
    """Stream an upstream response to the client, releasing the connection on every path."""
    try:
        headers = response_headers(response.headers, ctx.request_id)
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        if response.at_eof:
            response.release()
            await send({"type": "http.response.body", "body": b""})
            return
        first = await response.read()
        if response.at_eof:
            await send({"type": "http.response.body", "body": first})
            return
        watcher = asyncio.ensure_future(_watch_disconnect(receive, response))
        try:
            await send({"type": "http.response.body", "body": first, "more_body": True})
            while True:
                chunk = await response.read()
                done = response.at_eof
                await send({"type": "http.response.body", "body": chunk, "more_body": not done})
                if done:
                    return
        finally:
            watcher.cancel()
    except UpstreamError as exc:
        # Mid-body failure: the head is out, so all we can do is cut the stream short.
        ctx.error = exc.kind
        logger.warning("upstream failed mid-response: %s", exc)
        raise
    finally:
        response.close()  # no-op when already released after a complete body


async def _watch_disconnect(receive: Receive, response: Response) -> None:
    """Abort the upstream exchange as soon as the client disconnects."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            response.close()
            return


async def read_body(receive: Receive, limit: float = math.inf) -> tuple[list[bytes], bool]:
    """Body chunks until the body ends (``True``) or their size passes ``limit`` (``False``,
    the chunk that crossed it included, the rest still unread)."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk = message.get("body", b"")
        parts.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            return parts, True
        if size > limit:
            return parts, False


async def _buffer_or_stream(receive: Receive, limit: int) -> bytes | AsyncIterator[bytes]:
    """The whole body if it ends within ``limit`` bytes, else a stream of all of it."""
    parts, complete = await read_body(receive, limit)
    return b"".join(parts) if complete else _chain(parts, receive)


async def _chain(prefix: list[bytes], receive: Receive) -> AsyncIterator[bytes]:
    for chunk in prefix:
        if chunk:
            yield chunk
    async for chunk in _stream(receive):
        yield chunk


async def _stream(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return
