"""The proxy listener's HTTP/1.1 server: an asyncio protocol on httptools, hardened.

uvicorn still owns the listener (sockets, startup, shutdown), but the proxy listener's
protocol is this module's, not uvicorn's ``HttpToolsProtocol``. Why written by hand: the
sidecar sits on every request, and profiling the pass-through path put uvicorn's
per-request machinery on top (a ``RequestResponseCycle`` with an ``asyncio.Event``, a task
done-callback, a keep-alive ``TimerHandle`` armed and cancelled per request, two regular
expressions per response header, a write for the head and another for the body). The
same ASGI contract costs far less when the exchange is one slotted object, the head goes
out with the first body chunk, and every deadline is a slot a periodic sweep checks.

A proxy is also the first thing every request touches, so the codec enforces what uvicorn
leaves to the application, like Envoy's and nginx's:

* request head bytes (``max_header_bytes``) and header count (``max_headers``) → 431;
  request target length (``max_url_bytes``) → 414;
* a head not complete within ``request_headers_timeout`` of its first byte (or of the
  connection opening) → 408 and close: slowloris connections are shed;
* no body progress for ``body_idle_timeout`` → 408 and close;
* HTTP/1.1 without exactly one ``Host`` → 400;
* everything llhttp refuses (``Content-Length`` with ``Transfer-Encoding``, differing
  duplicate ``Content-Length``, a ``Transfer-Encoding`` other than chunked, bad chunk
  framing, obs-fold, whitespace before a colon...) → 400.

Every refusal is an ``application/problem+json`` answer followed by closing the connection,
so nothing after a malformed request on the same connection (a smuggled request) is read.

ASGI semantics follow uvicorn's: ``receive`` returns ``http.disconnect`` once the client is
gone or the response is complete (so a disconnect watcher can wait on it), sends after a
disconnect are dropped, a response without ``Content-Length`` is chunked, HEAD and
204/304 answers carry no body, ``Expect: 100-continue`` is answered on the first
``receive``, pipelined requests are answered in order, and an app that fails before its
response starts gets a 500 (after it started: the connection is closed).
"""

from __future__ import annotations

import asyncio
import http
import logging
import urllib.parse
from collections import deque
from typing import Any

import httptools

from proxy.config.schema import Limits
from proxy.problem import problem_body
from proxy.types import Message

logger = logging.getLogger("sidecar.http")
access_logger = logging.getLogger("sidecar.access")


def _status_line(code: int) -> bytes:
    try:
        phrase = http.HTTPStatus(code).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %b\r\n" % (code, phrase)


STATUS_LINE = {code: _status_line(code) for code in range(100, 600)}
_ASGI = {"version": "3.0", "spec_version": "2.4"}
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}
# Request bodies buffered for the app beyond this pause reading from the client.
HIGH_WATER = 65536
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_INTERNAL_ERROR = (
    b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 21\r\nconnection: close\r\n\r\nInternal Server Error"
)


class RequestRejected(Exception):
    """Raised from a parser callback to stop parsing and answer ``status``."""

    def __init__(self, status: int, slug: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail


class HttpProtocol(asyncio.Protocol):
    """One client connection of the proxy listener.

    Built by uvicorn's ``Server`` (``config``, ``server_state``, ``app_state``) and honours
    its contract: it registers itself in ``server_state.connections`` (``shutdown()`` closes
    it once idle) and the task of every request being answered in ``server_state.tasks``.
    """

    limits: Limits = Limits()
    chores: ListenerChores | None = None  # one per protocol class (listener) and loop
    # Set when the process drains: every answer from then on says `Connection: close`,
    # including those of requests that arrived before the signal.
    draining = False

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: Any = None,
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.server_state = server_state
        self.keep_alive_timeout = float(config.timeout_keep_alive)
        self.access_log = bool(config.access_log)
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None
        self.scheme = "http"
        # Exchanges: the one being answered, the one whose request is being parsed (they
        # differ when requests are pipelined), and those waiting for their turn.
        self.current: Exchange | None = None
        self.parsing: Exchange | None = None
        self.pipeline: deque[Exchange] = deque()
        # The connection's task between requests, waiting for the next exchange.
        self.idle_task: asyncio.Future[Exchange | None] | None = None
        self.reading_paused = False
        self.write_paused = False
        self.drain_waiters: list[asyncio.Future[None]] = []
        # The request head being parsed.
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.in_head = False
        self.head_bytes = 0
        self.header_count = 0
        self.header_bytes = 0
        self.host_count = 0
        self.expect_continue = False
        self.transfer_encoding: bytes | None = None
        self.declared_length = False  # a Content-Length other than 0
        self.rejected = False
        # One deadline per connection (head, body or keep-alive), fired by the chores.
        self.deadline_at = 0.0
        self.on_deadline: Any = None

    # -- connection ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.client = _address(transport.get_extra_info("peername"))
        self.server = _address(transport.get_extra_info("sockname"))
        if transport.get_extra_info("sslcontext"):
            self.scheme = "https"
        self.server_state.connections.add(self)
        chores = type(self).chores
        if chores is None or chores.loop is not self.loop:
            chores = type(self).chores = ListenerChores(self.loop, self.limits)
        self.chores = chores
        chores.connections.add(self)
        # A connection that never sends a complete head is closed like a slow one.
        self.arm(self.limits.request_headers_timeout, self.head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadline_at = 0.0
        self.on_deadline = None
        self.server_state.connections.discard(self)
        self.chores.connections.discard(self)
        for exchange in (self.current, self.parsing, *self.pipeline):
            if exchange is not None and not exchange.complete:
                exchange.disconnected = True
                exchange.wake()
        self.pipeline.clear()
        # Drop what points back at this protocol, so a closed connection is freed by
        # reference counting rather than left to the cycle collector.
        self.current = self.parsing = None
        self.parser = None  # type: ignore[assignment]
        idle = self.idle_task
        if idle is not None:
            self.idle_task = None
            if not idle.done():
                idle.set_result(None)
        self.write_paused = False
        self._release_drain_waiters()
        if exc is None:
            self.transport.close()

    def eof_received(self) -> None:
        """The client half-closed: the transport closes (as uvicorn's does)."""

    def data_received(self, data: bytes) -> None:
        if self.rejected:
            return
        if self.in_head or self.parsing is None or not self.parsing.more_body:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except RequestRejected as exc:
            self.reject(exc.status, exc.slug, exc.detail)
        except httptools.HttpParserUpgrade:
            # Upgrades are answered by the app (WebSocket is refused there, h2c ignored);
            # the bytes after the head are not HTTP/1.1, so the connection closes after.
            if self.parsing is not None:
                self.parsing.keep_alive = False
        except httptools.HttpParserError as exc:
            cause = exc.__context__ or exc.__cause__
            if isinstance(cause, RequestRejected):
                self.reject(cause.status, cause.slug, cause.detail)
            else:
                self.reject(400, "malformed-request", f"malformed HTTP request: {exc}")
        else:
            # Bytes of a head still arriving: bound them even before a header completes.
            limits = self.limits
            if (
                self.in_head
                and self.head_bytes > limits.max_header_bytes + limits.max_url_bytes + 4096
            ):
                self.reject(431, "headers-too-large", "request head exceeds the size limit")

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._release_drain_waiters()

    def _release_drain_waiters(self) -> None:
        waiters, self.drain_waiters = self.drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def drain(self) -> None:
        waiter = self.loop.create_future()
        self.drain_waiters.append(waiter)
        await waiter

    def pause_reading(self) -> None:
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def shutdown(self) -> None:
        """Graceful shutdown (uvicorn's contract): close now if idle, else after the answer."""
        current = self.current
        if current is None or current.complete:
            self.transport.close()
        else:
            current.keep_alive = False
            for waiting in self.pipeline:
                waiting.keep_alive = False

    # -- parser callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.in_head = True
        self.url = b""
        self.headers = []
        self.header_count = 0
        self.header_bytes = 0
        self.host_count = 0
        self.expect_continue = False
        self.transfer_encoding = None
        self.declared_length = False
        self.arm(self.limits.request_headers_timeout, self.head_timed_out)

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.max_url_bytes:
            raise RequestRejected(
                414, "uri-too-long", f"request target exceeds {self.limits.max_url_bytes} bytes"
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self.limits
        self.header_count += 1
        if self.header_count > limits.max_headers:
            raise RequestRejected(
                431, "too-many-headers", f"more than {limits.max_headers} request headers"
            )
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > limits.max_header_bytes:
            raise RequestRejected(
                431, "headers-too-large", f"request headers exceed {limits.max_header_bytes} bytes"
            )
        name = name.lower()
        if name == b"host":
            self.host_count += 1
        elif name == b"transfer-encoding":
            self.transfer_encoding = value
        elif name == b"content-length":
            self.declared_length = value.strip() != b"0"
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_bytes = 0
        parser = self.parser
        version = parser.get_http_version()
        if version == "1.1" and self.host_count != 1:
            problem = "missing" if self.host_count == 0 else "duplicate"
            raise RequestRejected(400, "bad-host", f"HTTP/1.1 request with {problem} Host header")
        coding = self.transfer_encoding
        if coding is not None and coding.rsplit(b",", 1)[-1].strip().lower() != b"chunked":
            # llhttp refuses this too, but only after the app has been started.
            raise RequestRejected(
                400, "bad-transfer-encoding", "Transfer-Encoding must end with chunked"
            )
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("ascii")
        url = self.url
        if url[:1] == b"/" and b"#" not in url:
            raw_path, _, query = url.partition(b"?")
        else:  # absolute-form, asterisk-form or a fragment: let httptools split it
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path or b"/", parsed.query or b""
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "root_path": "",
            "method": method,
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": self.headers,
        }
        exchange = Exchange(
            self, scope, version != "1.0" and parser.should_keep_alive(), self.expect_continue
        )
        exchange.is_head = method == "HEAD"
        self.parsing = exchange
        if self.declared_length or coding is not None:  # a body follows
            self.arm(self.limits.body_idle_timeout, self.body_timed_out)
        else:
            self.deadline_at = 0.0
        current = self.current
        if current is None or current.complete:
            self.start(exchange)
        else:  # pipelined: answered after the ones before it
            self.pause_reading()
            self.pipeline.append(exchange)

    def on_body(self, body: bytes) -> None:
        exchange = self.parsing
        if exchange is None or exchange.complete:
            return
        exchange.body.append(body)
        exchange.buffered += len(body)
        if exchange.buffered > HIGH_WATER:
            self.pause_reading()
        exchange.wake()
        self.arm(self.limits.body_idle_timeout, self.body_timed_out)

    def on_message_complete(self) -> None:
        self.deadline_at = 0.0
        exchange = self.parsing
        if exchange is None or exchange.complete:
            return
        exchange.more_body = False
        exchange.wake()

    # -- exchanges ----------------------------------------------------------------------
    def start(self, exchange: Exchange) -> None:
        """Run the app for ``exchange``: on the connection's idle task if it has one (a
        task per request, with asyncio's registration of every task, was measurable)."""
        self.current = exchange
        waiter = self.idle_task
        if waiter is not None and not waiter.done():
            self.idle_task = None
            waiter.set_result(exchange)
        else:  # the first request, or the previous app call has not returned yet
            self.loop.create_task(self.serve(exchange))

    async def serve(self, exchange: Exchange | None) -> None:
        """A connection's task: answer ``exchange``, then wait idle for the next one."""
        tasks = self.server_state.tasks
        task = asyncio.current_task()
        while exchange is not None:
            tasks.add(task)  # the drain cancels these; an idle task is not in flight
            try:
                await self.app(exchange.scope, exchange.receive, exchange.send)
            except asyncio.CancelledError:
                # The drain timeout passed and the server cancelled what was left: answer
                # if we can (a response already streaming is cut short).
                if not exchange.started:
                    self.answer_cancelled(exchange)
                elif not exchange.complete:
                    self.transport.close()
                return
            except BaseException as exc:
                logger.error("exception in the ASGI application", exc_info=exc)
                if not exchange.started:
                    self.answer_internal_error(exchange)
                elif not exchange.complete:
                    self.transport.close()
            else:
                if not exchange.started and not exchange.disconnected:
                    logger.error("ASGI application returned without starting the response")
                    self.answer_internal_error(exchange)
                elif not exchange.complete and not exchange.disconnected:
                    # e.g. the upstream failed mid-body: the client sees a truncated response.
                    exchange.flush_head()
                    self.transport.close()
            finally:
                tasks.discard(task)
            if self.idle_task is not None or self.transport.is_closing():
                return  # another task is already waiting, or the connection is done
            waiter = self.idle_task = self.loop.create_future()
            exchange = await waiter

    def answer_cancelled(self, exchange: Exchange) -> None:
        self.reject(
            503,
            "draining",
            "the sidecar shut down (drain_timeout) before the upstream answered; "
            "the upstream may or may not have processed the request",
        )
        exchange.started = exchange.complete = True

    def answer_internal_error(self, exchange: Exchange) -> None:
        exchange.started = exchange.complete = True
        if not self.transport.is_closing():
            self.transport.write(_INTERNAL_ERROR)
            self.transport.close()

    def response_complete(self, exchange: Exchange) -> None:
        self.server_state.total_requests += 1
        if not exchange.keep_alive or (exchange.expect_continue and exchange.more_body):
            # Not keeping the connection, or a body we never asked for with 100 Continue:
            # the client may or may not send it, so the next bytes cannot be framed.
            self.transport.close()
            return
        if self.transport.is_closing():
            return
        self.resume_reading()
        if self.pipeline:
            self.start(self.pipeline.popleft())
        elif not self.in_head:
            self.arm(self.keep_alive_timeout, self.idle_timed_out)

    # -- refusals -----------------------------------------------------------------------
    def head_timed_out(self) -> None:
        current = self.current
        if current is not None and not current.complete and not self.in_head:
            return  # a request is being served; its body has its own timer
        if self.head_bytes == 0 and not self.in_head:
            # Nothing sent at all: just close, as for an idle keep-alive connection.
            self.transport.close()
            return
        self.reject(408, "request-timeout", "request headers not received in time")

    def body_timed_out(self) -> None:
        self.reject(408, "request-timeout", "request body stalled past the idle timeout")

    def idle_timed_out(self) -> None:
        current = self.current
        if (current is None or current.complete) and not self.in_head:
            self.transport.close()

    def reject(self, status: int, slug: str, detail: str) -> None:
        """Answer ``status`` (unless a response already started) and close the connection."""
        self.rejected = True
        self.deadline_at = 0.0
        started = False
        for exchange in (self.current, self.parsing, *self.pipeline):
            if exchange is not None and not exchange.complete:
                started = started or exchange.started
                # The app (if running) sees a disconnect; its later sends are dropped.
                exchange.disconnected = True
                exchange.wake()
        if self.transport.is_closing():
            return
        if not started:
            body = problem_body(status, slug, detail)
            self.transport.write(
                b"".join(
                    [
                        STATUS_LINE[status],
                        b"content-type: application/problem+json\r\n",
                        b"content-length: %d\r\n" % len(body),
                        b"connection: close\r\n\r\n",
                        body,
                    ]
                )
            )
        logger.info(
            "refused request from %s: %d %s", self.client and self.client[0], status, detail
        )
        self.transport.close()

    # -- deadlines ----------------------------------------------------------------------
    # Arming is two attribute stores, not a timer: re-armed on every body chunk and twice
    # per request, per-request TimerHandles were measurable; the chores sweep them instead.
    def arm(self, delay: float, callback: Any) -> None:
        self.deadline_at = self.loop.time() + delay
        self.on_deadline = callback

    def check_deadline(self, now: float) -> None:
        if self.deadline_at and now >= self.deadline_at:
            self.deadline_at = 0.0
            self.on_deadline()


class Exchange:
    """One request and its response: the ASGI ``receive`` and ``send`` of one request."""

    __slots__ = (
        "body",
        "buffered",
        "chunked",
        "complete",
        "delivered",
        "disconnected",
        "expect_continue",
        "head",
        "is_head",
        "keep_alive",
        "more_body",
        "no_body",
        "protocol",
        "remaining",
        "scope",
        "started",
        "waiter",
    )

    def __init__(
        self, protocol: HttpProtocol, scope: dict[str, Any], keep_alive: bool, expect: bool
    ) -> None:
        self.protocol = protocol
        self.scope = scope
        self.keep_alive = keep_alive
        self.expect_continue = expect
        self.is_head = False
        self.no_body = False  # HEAD, 1xx, 204 and 304 answers: never a body on the wire
        # request side
        self.body: list[bytes] = []
        self.buffered = 0
        self.more_body = True
        self.delivered = False  # the last body message went to the app
        self.disconnected = False
        self.waiter: asyncio.Future[None] | None = None
        # response side
        self.started = False
        self.complete = False
        self.chunked = False
        self.remaining = -1  # Content-Length bytes still to send; -1: not length-framed
        self.head: bytes | None = None  # held back until the first body chunk

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def receive(self) -> Message:
        if self.expect_continue and not self.started:
            # The app wants the body: ask for it (after the response started, it never will).
            self.expect_continue = False
            transport = self.protocol.transport
            if not transport.is_closing():
                transport.write(_CONTINUE)
        while True:
            if self.disconnected or self.complete:
                return {"type": "http.disconnect"}
            if self.body or (not self.more_body and not self.delivered):
                body = self.body
                data = body[0] if len(body) == 1 else b"".join(body)
                self.body = []
                self.buffered = 0
                more = self.more_body
                if not more:
                    self.delivered = True
                self.protocol.resume_reading()
                return {"type": "http.request", "body": data, "more_body": more}
            self.protocol.resume_reading()
            waiter = self.waiter = self.protocol.loop.create_future()
            await waiter

    async def send(self, message: Message) -> None:
        protocol = self.protocol
        if protocol.write_paused and not self.disconnected:
            await protocol.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected 'http.response.start', got {kind!r}")
            self.head = self.encode_head(message["status"], message.get("headers", ()))
            self.started = True
            # Held for the first body chunk, but never past this loop iteration: a
            # streaming response whose first chunk is not ready still gets its head now.
            protocol.chores.hold_head(self)
            return
        if self.complete or kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self.no_body:
            data = b""
        elif self.chunked:
            if body:
                data = b"%x\r\n%b\r\n" % (len(body), body)
                if not more:
                    data += b"0\r\n\r\n"
            else:
                data = b"" if more else b"0\r\n\r\n"
        else:
            data = body
            if self.remaining >= 0:
                self.remaining -= len(body)
                if self.remaining < 0 or (not more and self.remaining):
                    self.keep_alive = False
                    self.flush_head()
                    protocol.transport.close()
                    raise RuntimeError("response body does not match its Content-Length")
        head = self.head
        if head is not None:
            self.head = None
            data = head + data
        if data:
            protocol.transport.write(data)
        if not more:
            self.complete = True
            self.wake()
            protocol.response_complete(self)

    def flush_head(self) -> None:
        head = self.head
        if head is not None:
            self.head = None
            transport = self.protocol.transport
            if not transport.is_closing():
                transport.write(head)

    def encode_head(self, status: int, headers: Any) -> bytes:
        """The status line and header block; decides the framing and keep-alive."""
        lines = [STATUS_LINE[status]]
        close = False
        length = -1
        chunked = False
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                if length < 0 and not chunked:
                    length = int(value)
            elif lower == b"transfer-encoding":
                if value.lower() == b"chunked":
                    chunked = True
                    length = -1
            elif lower == b"connection":
                if b"close" in value.lower():
                    close = True
                    self.keep_alive = False
            lines.append(b"%b: %b\r\n" % (name, value))
        if self.protocol.draining:
            self.keep_alive = False
        if not self.keep_alive and not close:
            lines.append(b"connection: close\r\n")
        no_body = self.is_head or status in (204, 304) or status < 200
        if length < 0 and not chunked and not no_body:
            chunked = True
            lines.append(b"transfer-encoding: chunked\r\n")
        lines.append(b"\r\n")
        head = b"".join(lines)
        # A CR or LF inside a name or value would split the response: refuse it.
        if head.count(b"\n") != len(lines) or head.count(b"\r") != len(lines):
            raise RuntimeError("invalid byte in a response header")
        self.no_body = no_body
        self.chunked = chunked and not no_body
        self.remaining = 0 if no_body else length
        if self.protocol.access_log:
            scope = self.scope
            client = scope["client"]
            access_logger.info(
                '%s - "%s %s HTTP/%s" %d',
                f"{client[0]}:{client[1]}" if client else "-",
                scope["method"],
                scope["raw_path"].decode("latin-1")
                + ("?" + scope["query_string"].decode("latin-1") if scope["query_string"] else ""),
                scope["http_version"],
                status,
            )
        return head


class ListenerChores:
    """Per-loop housekeeping of one listener: request deadlines and held response heads.

    Deadlines of every connection are checked ``interval`` apart (so one fires up to
    ``interval`` late: a quarter of the shortest timeout). Heads waiting for their first
    body chunk are flushed by one callback per loop iteration (a handle per response was
    measurable); the list is emptied then, so it keeps no exchange alive.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits) -> None:
        self.loop = loop
        self.connections: set[HttpProtocol] = set()
        self.held_heads: list[Exchange] = []
        shortest = min(limits.request_headers_timeout, limits.body_idle_timeout)
        self.interval = min(1.0, max(0.05, shortest / 4))
        self._handle = loop.call_later(self.interval, self._tick)

    def hold_head(self, exchange: Exchange) -> None:
        if not self.held_heads:
            self.loop.call_soon(self._flush_heads)
        self.held_heads.append(exchange)

    def _flush_heads(self) -> None:
        held = self.held_heads[:]
        self.held_heads.clear()
        for exchange in held:
            exchange.flush_head()

    def _tick(self) -> None:
        now = self.loop.time()
        for protocol in list(self.connections):
            protocol.check_deadline(now)
        self._handle = self.loop.call_later(self.interval, self._tick)


def _address(info: Any) -> tuple[str, int] | None:
    if isinstance(info, (list, tuple)) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    return None


def protocol_for(limits: Limits) -> type[HttpProtocol]:
    """A protocol class bound to ``limits`` (uvicorn instantiates the class it is given)."""
    return type("SidecarHttpProtocol", (HttpProtocol,), {"limits": limits})
