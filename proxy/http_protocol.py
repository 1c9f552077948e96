"""The proxy listener's HTTP/1.1 server protocol: uvicorn's httptools protocol, hardened.

uvicorn leaves several protections to the application: it has no limit on header size or
count (httptools' is not tunable), no deadline for a request head, no idle timeout for a
request body, and it accepts requests without ``Host``. A proxy is the first thing every
request touches, so this subclass enforces them at the codec, like Envoy's and nginx's:

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
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from proxy.config.schema import Limits
from proxy.problem import problem_body

logger = logging.getLogger("sidecar.http")


class RequestRejected(Exception):
    """Raised from a parser callback to stop parsing and answer ``status``."""

    def __init__(self, status: int, slug: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail


class HardenedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with request limits and deadlines."""

    limits: Limits = Limits()
    sweeper: DeadlineSweeper | None = None  # one per protocol class (listener) and loop

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._header_count = 0
        self._header_bytes = 0
        self._host_count = 0
        self._transfer_encoding: bytes | None = None
        self._in_head = False
        self._deadline_at = 0.0  # loop time at which _on_deadline runs; 0: none
        self._on_deadline: Any = None
        self._rejected = False

    # -- connection ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sweeper = type(self).sweeper
        if sweeper is None or sweeper.loop is not self.loop:
            sweeper = type(self).sweeper = DeadlineSweeper(self.loop, self.limits)
        sweeper.connections.add(self)
        # A connection that never sends a complete head is closed like a slow one.
        self._arm(self.limits.request_headers_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if type(self).sweeper is not None:
            type(self).sweeper.connections.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        if self._in_head or self.cycle is None or self.cycle.response_complete:
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except RequestRejected as exc:
            self.reject(exc.status, exc.slug, exc.detail)
        except httptools.HttpParserUpgrade:
            # Upgrade requests are answered by the app (WebSocket is refused there);
            # any bytes after the head are not HTTP/1.1 and are not read.
            pass
        except httptools.HttpParserError as exc:
            cause = exc.__context__ or exc.__cause__
            if isinstance(cause, RequestRejected):
                self.reject(cause.status, cause.slug, cause.detail)
            else:
                self.reject(400, "malformed-request", f"malformed HTTP request: {exc}")
        else:
            # Bytes of a head still arriving: bound them even before a header completes.
            if (
                self._in_head
                and self._head_bytes
                > self.limits.max_header_bytes + self.limits.max_url_bytes + 4096
            ):
                self.reject(431, "headers-too-large", "request head exceeds the size limit")

    # -- parser callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._header_count = 0
        self._header_bytes = 0
        self._host_count = 0
        self._transfer_encoding: bytes | None = None
        self._arm(self.limits.request_headers_timeout, self._head_timed_out)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_url_bytes:
            raise RequestRejected(
                414, "uri-too-long", f"request target exceeds {self.limits.max_url_bytes} bytes"
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            raise RequestRejected(
                431, "too-many-headers", f"more than {self.limits.max_headers} request headers"
            )
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.limits.max_header_bytes:
            raise RequestRejected(
                431,
                "headers-too-large",
                f"request headers exceed {self.limits.max_header_bytes} bytes",
            )
        lower = name.lower()
        if lower == b"host":
            self._host_count += 1
        elif lower == b"transfer-encoding":
            self._transfer_encoding = value
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        if self.parser.get_http_version() == "1.1" and self._host_count != 1:
            problem = "missing" if self._host_count == 0 else "duplicate"
            raise RequestRejected(400, "bad-host", f"HTTP/1.1 request with {problem} Host header")
        coding = self._transfer_encoding
        if coding is not None and coding.rsplit(b",", 1)[-1].strip().lower() != b"chunked":
            # llhttp refuses this too, but only after the app has been started.
            raise RequestRejected(
                400, "bad-transfer-encoding", "Transfer-Encoding must end with chunked"
            )
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.transport is self.transport:
            cycle.transport = HeadCoalescingTransport(self.transport, self.loop)  # type: ignore[assignment]
        if self._expects_body():
            self._arm(self.limits.body_idle_timeout, self._body_timed_out)
        else:
            self._disarm()

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._arm(self.limits.body_idle_timeout, self._body_timed_out)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    # -- refusals -----------------------------------------------------------------------
    def _expects_body(self) -> bool:
        for name, value in self.headers:
            if name == b"content-length":
                return value.strip() != b"0"
            if name == b"transfer-encoding":
                return True
        return False

    def _head_timed_out(self) -> None:
        if self.cycle is not None and not self.cycle.response_complete and not self._in_head:
            return  # a request is being served; its body has its own timer
        if self._head_bytes == 0 and not self._in_head:
            # Nothing sent at all: just close, as for an idle keep-alive connection.
            self.transport.close()
            return
        self.reject(408, "request-timeout", "request headers not received in time")

    def _body_timed_out(self) -> None:
        self.reject(408, "request-timeout", "request body stalled past the idle timeout")

    def reject(self, status: int, slug: str, detail: str) -> None:
        """Answer ``status`` (unless a response already started) and close the connection."""
        self._rejected = True
        self._disarm()
        cycle = self.cycle
        started = cycle is not None and cycle.response_started and not cycle.response_complete
        if cycle is not None and not cycle.response_complete:
            # The app (if running) sees a disconnect; its later sends are dropped.
            cycle.disconnected = True
            cycle.message_event.set()
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

    def send_400_response(self, msg: str) -> None:
        self.reject(400, "malformed-request", msg)

    # -- deadlines ----------------------------------------------------------------------
    # Arming is two attribute stores, not a timer: re-armed on every body chunk and twice
    # per request, per-request TimerHandles were measurable; a sweeper fires them instead.
    def _arm(self, delay: float, callback: Any) -> None:
        self._deadline_at = self.loop.time() + delay
        self._on_deadline = callback

    def _disarm(self) -> None:
        self._deadline_at = 0.0

    def check_deadline(self, now: float) -> None:
        if self._deadline_at and now >= self._deadline_at:
            self._deadline_at = 0.0
            self._on_deadline()


class DeadlineSweeper:
    """Fires the request deadlines of every connection of one listener, ``interval`` apart
    (so a deadline fires up to ``interval`` late: a quarter of the shortest timeout)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits) -> None:
        self.loop = loop
        self.connections: set[HardenedHttpProtocol] = set()
        shortest = min(limits.request_headers_timeout, limits.body_idle_timeout)
        self.interval = min(1.0, max(0.05, shortest / 4))
        self._handle = loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        now = self.loop.time()
        for protocol in list(self.connections):
            protocol.check_deadline(now)
        self._handle = self.loop.call_later(self.interval, self._tick)


class HeadCoalescingTransport:
    """The response's view of the client transport: the head is held back until the first
    body chunk (or the end of the current loop iteration) and both go out in one write.

    uvicorn writes the status line and headers on ``http.response.start`` and each body
    chunk on its own; for a typical small proxied response that is two syscalls and two
    TCP segments where one does. The profile of the pass-through path showed those writes
    as the largest single cost, so the head waits for its body, but never past the current
    loop iteration: a streaming response whose first chunk is not ready yet still gets its
    head at once.
    """

    __slots__ = ("_flush_handle", "_pending", "loop", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self._pending: bytes | None = None
        self._flush_handle: asyncio.Handle | None = None

    def write(self, data: bytes) -> None:
        if self._pending is None and self._flush_handle is None:
            self._pending = data  # the head: hold it for the body
            self._flush_handle = self.loop.call_soon(self.flush)
            return
        pending = self._pending
        if pending is not None:
            self._pending = None
            data = pending + data
        self.transport.write(data)

    def flush(self) -> None:
        pending = self._pending
        if pending is not None:
            self._pending = None
            if not self.transport.is_closing():
                self.transport.write(pending)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)


def protocol_for(limits: Limits) -> type[HardenedHttpProtocol]:
    """A protocol class bound to ``limits`` (uvicorn instantiates the class it is given)."""
    return type("SidecarHttpProtocol", (HardenedHttpProtocol,), {"limits": limits})
