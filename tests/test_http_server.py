"""The proxy listener's own HTTP/1.1 server protocol (``proxy/http_protocol.py``).

Most of its behaviour is proven through the sidecar (``test_proxy_*``, ``test_hardening_*``);
these tests pin down the ASGI server contract itself with small apps served by the protocol
on a real socket (an event loop in a thread), and the absence of per-request reference
cycles on a running sidecar.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn
import uvloop
from uvicorn.server import ServerState

from proxy.config.schema import Limits
from proxy.http_protocol import protocol_for
from tests.conftest import basic_config
from tests.support.processes import Sidecar, Upstream, sidecar_metric
from tests.support.raw import exchange

App = Callable[..., Any]


@contextmanager
def serving(app: App, *, draining: bool = False) -> Iterator[int]:
    """Serve ``app`` with the proxy listener's protocol on a free port; yields the port."""
    loop = uvloop.new_event_loop()
    config = uvicorn.Config(app, http="httptools", lifespan="off", log_config=None)
    config.load()
    protocol_class = protocol_for(Limits())
    protocol_class.draining = draining
    state = ServerState()
    started = threading.Event()
    port: list[int] = []
    stop = asyncio.Event()

    async def main() -> None:
        server = await loop.create_server(
            lambda: protocol_class(config=config, server_state=state, app_state={}, _loop=loop),
            "127.0.0.1",
            0,
        )
        port.append(server.sockets[0].getsockname()[1])
        started.set()
        await stop.wait()
        server.close()

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    assert started.wait(5)
    try:
        yield port[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)
        loop.close()


def _read_responses(sock: socket.socket, count: int, timeout: float = 5.0) -> bytes:
    """Bytes from ``sock`` until ``count`` complete Content-Length responses arrived."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while data.count(b"HTTP/1.1 ") < count or not data.endswith(b"}"):
        if time.monotonic() > deadline:
            break
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


async def send_json(send: Any, body: bytes) -> None:
    """A complete 200 answer with a Content-Length."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def path_echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers ``{"path": ...}``; the first path waits a little, so later ones queue up."""
    if scope["path"] == "/slow":
        await asyncio.sleep(0.2)
    body = b'{"path": "%s"}' % scope["path"].encode()
    await send_json(send, body)


def test_pipelined_requests_are_answered_in_order() -> None:
    with serving(path_echo) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /third HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        data = _read_responses(sock, 3)
    assert data.count(b"HTTP/1.1 200 OK") == 3
    assert data.index(b"/slow") < data.index(b"/second") < data.index(b"/third")


def test_keep_alive_connection_serves_sequential_requests() -> None:
    with serving(path_echo) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        for n in range(50):
            sock.sendall(b"GET /r%d HTTP/1.1\r\nHost: a\r\n\r\n" % n)
            assert b'{"path": "/r%d"}' % n in _read_responses(sock, 1)


async def body_reader(scope: dict[str, Any], receive: Any, send: Any) -> None:
    size = 0
    if scope["path"] == "/read":
        more = True
        while more:
            message = await receive()
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
    body = b'{"size": %d}' % size
    await send_json(send, body)


def test_expect_100_continue_is_answered_when_the_app_reads_the_body() -> None:
    with serving(body_reader) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        sock.sendall(
            b"POST /read HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        assert sock.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        assert b'{"size": 5}' in _read_responses(sock, 1)


def test_unread_body_after_expect_100_continue_closes_the_connection() -> None:
    with serving(body_reader) as port:
        response, closed = exchange(
            port,
            b"POST /ignore HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        )
    assert b"100 Continue" not in response
    assert response.startswith(b"HTTP/1.1 200 OK")
    assert closed  # the client may or may not send the body: the next bytes can't be framed


async def no_length(scope: dict[str, Any], receive: Any, send: Any) -> None:
    status = int(scope["path"].strip("/") or 200)
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"part one, ", "more_body": True})
    await send({"type": "http.response.body", "body": b"part two"})


def test_response_without_content_length_is_chunked() -> None:
    with serving(no_length) as port:
        response = httpx.get(f"http://127.0.0.1:{port}/200")
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.text == "part one, part two"


@pytest.mark.parametrize("request_line", [b"HEAD /200", b"GET /204", b"GET /304"])
def test_head_and_bodyless_statuses_send_no_body(request_line: bytes) -> None:
    with serving(no_length) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(1)
        sock.sendall(request_line + b" HTTP/1.1\r\nHost: a\r\n\r\n")
        time.sleep(0.2)
        data = sock.recv(65536)
        # the connection stays usable: nothing but the head was written
        sock.sendall(b"GET /200 HTTP/1.1\r\nHost: a\r\n\r\n")
        time.sleep(0.2)
        after = sock.recv(65536)
    assert data.endswith(b"\r\n\r\n") and b"part" not in data
    assert b"transfer-encoding" not in data
    assert after.startswith(b"HTTP/1.1 200 OK")


async def failing(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["path"] == "/after-start":
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]}
        )
        await send({"type": "http.response.body", "body": b"12345", "more_body": True})
    elif scope["path"] == "/split":
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"x", b"a\r\nset: evil")]}
        )
    raise RuntimeError("boom")


def test_app_failing_before_its_response_gets_a_500_and_close() -> None:
    with serving(failing) as port:
        response, closed = exchange(port, b"GET /before HTTP/1.1\r\nHost: a\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 500 Internal Server Error")
    assert closed


def test_app_failing_mid_body_closes_the_connection_with_a_truncated_response() -> None:
    with serving(failing) as port:
        response, closed = exchange(port, b"GET /after-start HTTP/1.1\r\nHost: a\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 200 OK")
    assert response.endswith(b"\r\n\r\n12345")  # 5 of the 10 bytes announced
    assert closed


def test_header_value_with_crlf_is_refused_not_split() -> None:
    with serving(failing) as port:
        response, _ = exchange(port, b"GET /split HTTP/1.1\r\nHost: a\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 500")
    assert b"set: evil" not in response


async def slow_first_chunk(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await asyncio.sleep(1.0)
    await send({"type": "http.response.body", "body": b"late"})


def test_streaming_response_head_is_not_held_for_a_slow_first_chunk() -> None:
    with serving(slow_first_chunk) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        started = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        head = sock.recv(65536)
        waited = time.monotonic() - started
    assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
    assert waited < 0.9  # the body comes after 1 s; the head did not wait for it


def test_receive_reports_the_client_disconnect_while_the_app_waits() -> None:
    seen: list[str] = []
    done = threading.Event()

    async def watcher(scope: dict[str, Any], receive: Any, send: Any) -> None:
        first = await receive()  # the (empty) body
        seen.append(first["type"])
        second = await receive()  # blocks until the client goes away
        seen.append(second["type"])
        done.set()

    with serving(watcher) as port:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            time.sleep(0.2)
            assert not done.is_set()
        assert done.wait(5)
    assert seen == ["http.request", "http.disconnect"]


def test_proxied_requests_leave_no_reference_cycles_for_the_collector(
    echo_upstream: Upstream, tmp_path: Any
) -> None:
    """Per-request garbage cycles made the collector run every ~75 requests (about 7 % of
    the CPU); requests, and closed connections, must be freed by reference counting alone."""
    sidecar = Sidecar(basic_config(echo_upstream.url), tmp_path).start(wait_ready=True)
    try:
        port = int(sidecar.url.rsplit(":", 1)[1])
        before = sidecar_metric(sidecar, "python_gc_objects_collected_total")
        with socket.create_connection(("127.0.0.1", port)) as sock:
            for _ in range(3000):
                sock.sendall(b"GET /echo/x HTTP/1.1\r\nHost: a\r\n\r\n")
                assert b"HTTP/1.1 200" in _read_responses(sock, 1)
        after = sidecar_metric(sidecar, "python_gc_objects_collected_total")
        for _ in range(500):  # and a connection per request: closed ones are freed too
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"GET /echo/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                while sock.recv(65536):
                    pass
        closed = sidecar_metric(sidecar, "python_gc_objects_collected_total")
    finally:
        sidecar.stop()
    assert after - before < 1000, f"{after - before:.0f} objects collected for 3000 requests"
    assert closed - after < 1000, f"{closed - after:.0f} objects collected for 500 connections"


@pytest.mark.parametrize("app_headers", [[(b"x", b"1")], [(b"connection", b"close")]])
def test_answers_while_draining_carry_exactly_one_connection_close(app_headers: list) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = [*app_headers, (b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    with serving(app, draining=True) as port:
        response, closed = exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert response.lower().count(b"connection: close") == 1
    assert closed
