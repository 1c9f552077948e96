"""A pooled HTTP/1.1 client on asyncio protocols and httptools: the forwarding path.

Why not httpx or aiohttp: measured on this machine (see README, "Design decisions"), httpx's
stack costs about 110 µs per request before any I/O and its pool bookkeeping grows with
concurrency; aiohttp reaches about half of what a plain ``asyncio.Protocol`` fed by
httptools' C parser does. A proxy only needs a small part of a client (one request at a
time per connection, keep-alive, streaming both ways, no redirects, cookies or TLS), so that
part is written here, in one module, with timeouts on the loop's timer wheel
(``proxy/timers.py``: ~10 ms resolution, O(1) arm and cancel) rather than per-request tasks
or libuv timers.

Semantics that matter to callers:

* :class:`UpstreamError` subclasses say *what* failed and whether any request byte may
  have reached the upstream (``sent``), which decides retry safety and idempotency.
* A reused keep-alive connection that dies before any response byte is retried once on a
  fresh connection when the request is replayable (an idempotent method with a buffered
  body), like Go's ``net/http``; otherwise the error is returned to the caller.
* Responses to HEAD, 1xx, 204 and 304 have no body whatever their headers say.
* Response bodies are streamed with back-pressure: reading from the upstream pauses while
  more than :data:`HIGH_WATER` bytes wait for the client.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httptools

from proxy.timers import expire, wheel_for
from proxy.upstream.errors import (
    ConnectFailure,
    ConnectionReset,
    ProtocolError,
    UpstreamError,
    UpstreamTimeout,
)

Headers = list[tuple[bytes, bytes]]
RequestBody = bytes | AsyncIterator[bytes] | None

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class Connection(asyncio.Protocol):
    """One upstream TCP connection carrying one exchange at a time."""

    def __init__(self, pool: EndpointPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._write_paused = False
        self.reading_paused = False
        self.counted = True  # counted in ``pool.active`` until discarded
        self._drain_waiter: asyncio.Future[None] | None = None
        self._response: Response | None = None

    # -- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        response = self._response
        if response is None:
            # Bytes on an idle connection: the peer is not speaking HTTP as we expect.
            self.abort()
            return
        response.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            response.fail(ProtocolError("upstream switched protocols unexpectedly", sent=True))
            self.abort()
        except httptools.HttpParserError as exc:
            response.fail(ProtocolError(f"malformed response from upstream: {exc}", sent=True))
            self.abort()
        else:
            if response.no_body and response.complete:
                # llhttp cannot be told that a HEAD response has no body: start afresh.
                self.parser = httptools.HttpResponseParser(self)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self._response
        if response is not None and not response.complete:
            if response.status and response.close_delimited and exc is None:
                response.keep_alive = False
                response.finish()  # a body without length or chunking ends at close
            else:
                reason = f": {exc}" if exc else ""
                response.fail(ConnectionReset(f"upstream closed the connection{reason}", sent=True))
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionReset("upstream closed while sending", sent=True))
        self.pool.discard(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- httptools callbacks ------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._response.headers.append((name.lower(), value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        response = self._response
        assert response is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            response.headers = []  # interim response (103 Early Hints): wait for the final one
            return
        response.status = status
        response.keep_alive = self.parser.should_keep_alive()
        if response.head_only or status in (204, 304):
            response.no_body = True
            response.finish()
        else:
            response.close_delimited = not any(
                name == b"content-length" or name == b"transfer-encoding"
                for name, _ in response.headers
            )
        response.head_ready()

    def on_body(self, body: bytes) -> None:
        self._response.feed(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        response = self._response
        if response is not None and response.status and not response.complete:
            response.finish()

    # -- exchange -----------------------------------------------------------------------
    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drain_waiter = self.loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionReset("upstream connection closed while sending", sent=True)
        self.transport.write(data)

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def finished(self, response: Response) -> None:
        """The exchange is over: back to the pool if reusable, else closed."""
        self._response = None
        if response.complete and response.keep_alive and not response.error and not self.closed:
            self.pool.release(self)
        else:
            self.abort()
            self.pool.discard(self)


class Response:
    """An upstream response: the head at once, the body streamed with :meth:`read`."""

    __slots__ = (
        "_chunks", "_conn", "_head_waiter", "_idle_timeout", "_released", "_waiter",
        "buffered", "close_delimited", "complete", "error", "head_only", "headers", "keep_alive", "no_body",
        "received_any", "status",
    )  # fmt: skip

    def __init__(self, conn: Connection, head_only: bool, idle_timeout: float) -> None:
        self._conn = conn
        self._chunks: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._head_waiter: asyncio.Future[None] = conn.loop.create_future()
        self._idle_timeout = idle_timeout
        self._released = False
        self.head_only = head_only
        self.status = 0
        self.headers: Headers = []
        self.keep_alive = False
        self.no_body = False
        self.close_delimited = False
        self.complete = False
        self.received_any = False
        self.error: UpstreamError | None = None
        self.buffered = 0

    # Parser side
    def head_ready(self) -> None:
        if not self._head_waiter.done():
            self._head_waiter.set_result(None)

    def feed(self, body: bytes) -> None:
        self._chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER:
            self._conn.pause_reading()
        self._wake()

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        if not self._head_waiter.done():
            self._head_waiter.set_exception(error)
            self._head_waiter.exception()  # mark retrieved; the caller re-raises it
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # Caller side
    @property
    def at_eof(self) -> bool:
        """True once the whole body has been handed out by :meth:`read`."""
        return self.complete and not self._chunks

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def read(self) -> bytes:
        """The next body chunk; ``b""`` at the end. Raises :class:`UpstreamError`."""
        while True:
            chunks = self._chunks
            if chunks:
                chunk = chunks.popleft()
                if chunks and len(chunk) < 65536:
                    # Coalesce small queued chunks into one write to the client.
                    parts = [chunk]
                    size = len(chunk)
                    while chunks and size < 65536:
                        part = chunks.popleft()
                        size += len(part)
                        parts.append(part)
                    chunk = b"".join(parts)
                self.buffered -= len(chunk)
                # Only now, with everything taken out counted: resuming before coalescing
                # could leave the queue empty and the transport paused (a stall).
                if self.buffered < LOW_WATER:
                    self._conn.resume_reading()
                if self.at_eof:
                    self.release()
                return chunk
            if self.complete:
                self.release()
                return b""
            if self.error is not None:
                self.release()
                raise self.error
            await self._wait_for_data()

    async def read_all(self, limit: int | None = None) -> bytes:
        """The whole remaining body (raises ``OverflowError`` past ``limit`` bytes)."""
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = await self.read()
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if limit is not None and size > limit:
                self.close()
                raise OverflowError(size)
            parts.append(chunk)

    async def _wait_for_data(self) -> None:
        conn = self._conn
        self._waiter = waiter = conn.loop.create_future()
        timer = conn.pool.timers.call_later(self._idle_timeout, expire, waiter)
        try:
            await waiter
        except TimeoutError:
            self.error = UpstreamTimeout("upstream body stalled past the idle timeout", sent=True)
            self.close()
            raise self.error from None
        finally:
            timer.cancel()
            self._waiter = None

    def release(self) -> None:
        """Give the connection back (reusable only when the body was read to the end)."""
        if not self._released:
            self._released = True
            self._conn.finished(self)

    def close(self) -> None:
        """Abandon the response: the connection is closed, never reused."""
        if not self._released:
            self._released = True
            self._conn.abort()
            self._conn.finished(self)


class EndpointPool:
    """Idle keep-alive connections to one ``host:port``, most recently used first."""

    def __init__(self, host: str, port: int, *, max_idle: int, idle_timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.timers = wheel_for(self.loop)
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle: collections.deque[Connection] = collections.deque()
        self.active = 0  # connections open (idle or busy), for introspection and tests
        self.closed = False

    async def connect(self, timeout: float) -> Connection:
        """A fresh connection, or :class:`ConnectFailure`."""
        loop = self.loop
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: Connection(self), self.host, self.port
                )
        except TimeoutError:
            raise ConnectFailure(
                f"connect to {self.host}:{self.port} timed out after {timeout:g}s"
            ) from None
        except OSError as exc:
            raise ConnectFailure(
                f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        self.active += 1
        return conn

    def take_idle(self) -> Connection | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                continue
            if now - conn.idle_since > self.idle_timeout:
                conn.abort()
                continue
            conn.reused = True
            return conn
        return None

    def release(self, conn: Connection) -> None:
        if self.closed or len(self.idle) >= self.max_idle:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def discard(self, conn: Connection) -> None:
        if conn.counted:
            conn.counted = False
            self.active -= 1

    def sweep(self) -> None:
        """Close connections idle past ``idle_timeout``."""
        now = time.monotonic()
        keep = collections.deque(
            c for c in self.idle if not c.closed and now - c.idle_since <= self.idle_timeout
        )
        for conn in self.idle:
            if conn not in keep:
                conn.abort()
        self.idle = keep

    def close(self) -> None:
        self.closed = True
        while self.idle:
            self.idle.pop().abort()


def encode_head(method: str, target: str, headers: Headers) -> bytearray:
    """Serialise a request line and headers (names and values already validated)."""
    head = bytearray(f"{method} {target} HTTP/1.1\r\n".encode("latin-1"))
    for name, value in headers:
        head += name
        head += b": "
        head += value
        head += b"\r\n"
    head += b"\r\n"
    return head


async def send_request(
    pool: EndpointPool,
    method: str,
    target: str,
    headers: Headers,
    body: RequestBody,
    *,
    chunked: bool,
    connect_timeout: float,
    response_timeout: float,
    idle_timeout: float,
) -> Response:
    """Send one request on a pooled connection and return once the response head arrived.

    ``headers`` must already carry ``Host`` and the framing header (``Content-Length`` or
    ``Transfer-Encoding: chunked`` when ``chunked``).
    """
    head = encode_head(method, target, headers)
    replayable = not isinstance(body, AsyncIterator) and method in IDEMPOTENT_METHODS
    conn = pool.take_idle()
    if conn is not None:
        try:
            return await _exchange(
                conn, method, head, body, chunked, response_timeout, idle_timeout
            )
        except ConnectionReset as exc:
            # A stale keep-alive connection: retry once on a new one, when that is safe.
            if not (replayable and exc.nothing_received):  # type: ignore[attr-defined]
                raise
    conn = await pool.connect(connect_timeout)
    return await _exchange(conn, method, head, body, chunked, response_timeout, idle_timeout)


async def _exchange(
    conn: Connection,
    method: str,
    head: bytearray,
    body: RequestBody,
    chunked: bool,
    response_timeout: float,
    idle_timeout: float,
) -> Response:
    response = Response(conn, method == "HEAD", idle_timeout)
    conn._response = response
    if conn.closed or conn.transport is None or conn.transport.is_closing():
        conn.finished(response)
        error = ConnectionReset("pooled upstream connection was closed", sent=False)
        error.nothing_received = True  # type: ignore[attr-defined]
        raise error
    try:
        if body is None or isinstance(body, bytes):
            if body:
                head += body
            conn.write(bytes(head))
        else:
            conn.write(bytes(head))
            await _stream_body(conn, response, body, chunked)
    except UpstreamError as exc:
        # The upstream may have answered early (say 413) and closed: prefer its answer.
        if response.status and not response.error:
            return response
        _mark_nothing_received(exc, response)
        conn.finished(response)
        raise
    except BaseException:
        conn.abort()
        conn.finished(response)
        raise
    # Like Envoy's route timeout, the clock starts once the request has been sent.
    timer = conn.pool.timers.call_later(response_timeout, _head_timeout, response, response_timeout)
    try:
        await response._head_waiter
    except UpstreamError as exc:
        _mark_nothing_received(exc, response)
        conn.finished(response)
        raise
    except BaseException:  # cancelled (client gone, overall deadline): never reuse
        conn.abort()
        conn.finished(response)
        raise
    finally:
        timer.cancel()
    return response


def _mark_nothing_received(exc: UpstreamError, response: Response) -> None:
    exc.nothing_received = not response.received_any  # type: ignore[attr-defined]


def _head_timeout(response: Response, timeout: float) -> None:
    if not response.status and response.error is None:
        response.fail(UpstreamTimeout(f"no response from upstream within {timeout:g}s", sent=True))
        response._conn.abort()


async def _stream_body(
    conn: Connection, response: Response, body: AsyncIterator[bytes], chunked: bool
) -> None:
    async for chunk in body:
        if response.error is not None:
            raise response.error
        if response.status:
            # Early final response: stop sending; the connection cannot be reused.
            response.keep_alive = False
            return
        if chunk:
            conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            await conn.drain()
    if chunked:
        conn.write(b"0\r\n\r\n")


def parse_endpoint(url: str) -> tuple[str, int]:
    """``http://host:port`` → ``(host, port)``."""
    rest = url.split("://", 1)[1].rstrip("/")
    host, _, port = rest.rpartition(":")
    if not host:
        return rest, 80
    return host.strip("[]"), int(port)


def connection_stats(pool: EndpointPool) -> dict[str, Any]:
    return {"open": pool.active, "idle": len(pool.idle)}
