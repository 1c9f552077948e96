"""A small TCP fault proxy for tests: sits between the sidecar and an upstream (or Redis)
and injects one fault at a time, switchable at run time from the test.

Faults: ``none``, ``latency`` (delay each chunk), ``reset`` (RST after N response bytes),
``blackhole`` (accept, read, never answer), ``slow`` (dribble the response a few bytes at a
time), ``close_after`` (FIN after N response bytes), ``refuse`` (close at once).
Runs its own event loop in a thread so synchronous tests can drive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from dataclasses import dataclass


@dataclass
class Fault:
    kind: str = "none"
    latency: float = 0.0
    after_bytes: int = 0
    slow_chunk: int = 4
    slow_delay: float = 0.05


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.fault = Fault()
        self.connections = 0  # accepted so far
        self.open = 0  # currently open client-side connections
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    def start(self) -> FaultProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = future.result(5)
        return self

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def set(self, kind: str = "none", **options: float) -> None:
        self.fault = Fault(kind, **options)  # type: ignore[arg-type]

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        try:
            if self.fault.kind == "refuse":
                _reset(writer)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                _reset(writer)
                return
            requests = asyncio.ensure_future(self._forward_requests(reader, up_writer, writer))
            try:
                await self._forward_responses(up_reader, writer)
            finally:
                requests.cancel()
                up_writer.close()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1
            with contextlib.suppress(Exception):
                writer.close()

    async def _forward_requests(
        self,
        reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Client → target; the fault in force when each chunk arrives applies to it."""
        while data := await reader.read(65536):
            kind = self.fault.kind
            if kind == "refuse":
                _reset(writer)
                return
            if kind == "blackhole":
                continue  # swallowed: the target never hears of it
            up_writer.write(data)
            await up_writer.drain()
        with contextlib.suppress(Exception):
            up_writer.write_eof()

    async def _forward_responses(
        self, up_reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Target → client, through the fault in force (counted per connection)."""
        sent = 0
        while True:
            data = await up_reader.read(65536)
            if not data:
                with contextlib.suppress(Exception):
                    writer.write_eof()
                return
            fault = self.fault
            if fault.kind == "latency":
                await asyncio.sleep(fault.latency)
            elif fault.kind in ("reset", "close_after"):
                room = fault.after_bytes - sent
                if len(data) >= room:
                    writer.write(data[: max(room, 0)])
                    await writer.drain()
                    if fault.kind == "reset":
                        _reset(writer)
                    else:
                        writer.close()
                    return
            elif fault.kind == "slow":
                step = int(fault.slow_chunk)
                for i in range(0, len(data), step):
                    writer.write(data[i : i + step])
                    await writer.drain()
                    await asyncio.sleep(fault.slow_delay)
                sent += len(data)
                continue
            writer.write(data)
            sent += len(data)
            await writer.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
