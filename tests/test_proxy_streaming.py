"""Bodies stream through the sidecar in both directions without being held in memory."""

from __future__ import annotations

import hashlib
import socket
import threading
import time

import httpx
import psutil
import pytest

from tests.conftest import basic_config
from tests.support.processes import Sidecar, Upstream

SIZE = 200 * 1024 * 1024
RSS_LIMIT = 150 * 1024 * 1024


class PeakRss:
    """Samples a process's RSS in a thread; ``peak`` is the highest value seen."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def sidecar(echo_upstream: Upstream, start_sidecar) -> Sidecar:
    return start_sidecar(basic_config(echo_upstream.url))


def test_200mb_upload_streams_through_with_bounded_memory(sidecar: Sidecar) -> None:
    block = b"u" * (1024 * 1024)
    expected = hashlib.sha256()
    for _ in range(SIZE // len(block)):
        expected.update(block)

    def body():
        for _ in range(SIZE // len(block)):
            yield block

    with PeakRss(sidecar.pid) as rss:
        response = httpx.post(
            sidecar.url + "/upload",
            content=body(),
            headers={"Content-Length": str(SIZE)},
            timeout=120,
        )
    assert response.status_code == 200
    assert response.json() == {"size": SIZE, "sha256": expected.hexdigest()}
    assert rss.peak < RSS_LIMIT, f"sidecar RSS peaked at {rss.peak / 2**20:.0f} MiB"


def test_200mb_chunked_upload_streams_through_with_bounded_memory(sidecar: Sidecar) -> None:
    block = b"c" * (256 * 1024)

    def body():
        for _ in range(SIZE // len(block)):
            yield block

    with PeakRss(sidecar.pid) as rss:
        response = httpx.post(sidecar.url + "/upload", content=body(), timeout=120)
    assert response.json()["size"] == SIZE
    assert rss.peak < RSS_LIMIT, f"sidecar RSS peaked at {rss.peak / 2**20:.0f} MiB"


def test_200mb_download_streams_through_with_bounded_memory(sidecar: Sidecar) -> None:
    received = 0
    with PeakRss(sidecar.pid) as rss:
        with httpx.stream("GET", sidecar.url + f"/download?size={SIZE}", timeout=120) as response:
            assert response.headers["content-length"] == str(SIZE)
            for chunk in response.iter_raw(1024 * 1024):
                received += len(chunk)
    assert received == SIZE
    assert rss.peak < RSS_LIMIT, f"sidecar RSS peaked at {rss.peak / 2**20:.0f} MiB"


def _connections_to(pid: int, port: int) -> int:
    return sum(
        1
        for conn in psutil.Process(pid).net_connections(kind="tcp")
        if conn.raddr and conn.raddr.port == port and conn.status == psutil.CONN_ESTABLISHED
    )


def test_client_disconnect_mid_download_frees_the_upstream_connection(
    echo_upstream: Upstream, start_sidecar
) -> None:
    config = basic_config(echo_upstream.url)
    config["upstreams"]["app"]["health_check"] = {"enabled": False}  # only proxied connections
    sidecar = start_sidecar(config)
    baseline = _connections_to(sidecar.pid, echo_upstream.port)
    assert baseline == 0
    sock = socket.create_connection(("127.0.0.1", sidecar.port))
    sock.sendall(b"GET /download?size=1073741824&pace=0.01 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    # The download is in progress on one upstream connection.
    deadline = time.monotonic() + 5
    while (
        _connections_to(sidecar.pid, echo_upstream.port) <= baseline and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert _connections_to(sidecar.pid, echo_upstream.port) == baseline + 1
    sock.close()
    deadline = time.monotonic() + 5
    while (
        _connections_to(sidecar.pid, echo_upstream.port) > baseline and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert _connections_to(sidecar.pid, echo_upstream.port) <= baseline
    # And the sidecar still serves through its pool.
    assert httpx.get(sidecar.url + "/echo").status_code == 200


def test_client_disconnect_mid_upload_aborts_the_upstream_request(
    sidecar: Sidecar, echo_upstream: Upstream
) -> None:
    before = httpx.get(echo_upstream.url + "/stats").json()["disconnects"]
    sock = socket.create_connection(("127.0.0.1", sidecar.port))
    sock.sendall(
        b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 500000
    )
    time.sleep(0.3)
    sock.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if httpx.get(echo_upstream.url + "/stats").json()["disconnects"] > before:
            break
        time.sleep(0.05)
    assert httpx.get(echo_upstream.url + "/stats").json()["disconnects"] == before + 1


def test_slow_reader_download_never_stalls_on_back_pressure(sidecar: Sidecar) -> None:
    # A client reading slowly makes the sidecar pause reading from the upstream and resume
    # as its queue drains; a lost resume would stall the stream until the idle timeout.
    size = 32 * 1024 * 1024
    received = 0
    with httpx.stream("GET", sidecar.url + f"/download?size={size}", timeout=30) as response:
        for i, chunk in enumerate(response.iter_raw(7 * 1024)):
            received += len(chunk)
            if i % 200 == 0:
                time.sleep(0.01)
    assert received == size
