"""Unit tests of the pooled HTTP/1.1 client's response buffering (no sockets)."""

from __future__ import annotations

import asyncio

from proxy.upstream.http11 import HIGH_WATER, Response


class FakeConnection:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.paused = False
        self.finished_with: Response | None = None

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def abort(self) -> None:
        pass

    def finished(self, response: Response) -> None:
        self.finished_with = response


async def test_reading_resumes_once_the_queue_drains_even_when_chunks_are_coalesced() -> None:
    conn = FakeConnection()
    response = Response(conn, head_only=False, idle_timeout=1.0)  # type: ignore[arg-type]
    response.feed(b"a" * 1024)
    response.feed(b"b" * HIGH_WATER)  # over the high-water mark: the upstream is paused
    assert conn.paused
    chunk = await response.read()  # takes the small chunk and coalesces the big one
    assert len(chunk) == 1024 + HIGH_WATER
    assert not conn.paused, "queue empty but upstream still paused: the stream would stall"


async def test_body_chunks_come_out_in_order_and_the_end_releases_the_connection() -> None:
    conn = FakeConnection()
    response = Response(conn, head_only=False, idle_timeout=1.0)  # type: ignore[arg-type]
    for part in (b"one", b"two", b"three"):
        response.feed(part)
    response.finish()
    assert await response.read() == b"onetwothree"
    assert response.at_eof and conn.finished_with is response
    assert await response.read() == b""
