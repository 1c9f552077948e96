"""Network faults between the sidecar and its upstream, injected by a TCP fault proxy.

For each fault: the documented status, no 500s, and no leaked connections, file
descriptors or tasks once the fault is gone.
"""

from __future__ import annotations

import time

import httpx
import psutil
import pytest

from tests.conftest import basic_config
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import Sidecar, Upstream


@pytest.fixture
def faulty(echo_upstream: Upstream, start_sidecar):
    proxy = FaultProxy(echo_upstream.port).start()
    config = basic_config(f"http://127.0.0.1:{proxy.port}")
    config["upstreams"]["app"]["timeouts"] = {"connect": "500ms", "request": "1s", "idle": "1s"}
    config["upstreams"]["app"]["retry"] = {"max_attempts": 1}
    config["upstreams"]["app"]["health_check"] = {"enabled": False}
    config["upstreams"]["app"]["circuit_breaker"] = {"enabled": False}
    sidecar = start_sidecar(config)
    yield proxy, sidecar
    proxy.stop()


def fds(sidecar: Sidecar) -> int:
    return psutil.Process(sidecar.pid).num_fds()


def settle(sidecar: Sidecar, proxy: FaultProxy, baseline: int) -> int:
    """fd count once the fault is cleared and a few clean requests went through."""
    proxy.set("none")
    for _ in range(3):
        assert httpx.get(sidecar.url + "/echo", timeout=5).status_code == 200
    deadline = time.monotonic() + 5
    while fds(sidecar) > baseline + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    return fds(sidecar)


def get(sidecar: Sidecar, path: str) -> httpx.Response | None:
    try:
        return httpx.get(sidecar.url + path, timeout=5)
    except httpx.HTTPError:
        return None  # the client saw the connection cut (a truncated response)


FAULTS = [
    # (fault, options, path, statuses the client may see; None = connection cut mid-body)
    ("refuse", {}, "/echo", {502}),
    ("blackhole", {}, "/echo", {504}),
    ("latency", {"latency": 0.05}, "/echo", {200}),
    ("latency", {"latency": 1.5}, "/echo", {504}),
    ("reset", {"after_bytes": 0}, "/echo", {502}),
    ("reset", {"after_bytes": 30}, "/echo", {502}),
    ("reset", {"after_bytes": 70000}, "/download?size=1000000", {None}),
    ("close_after", {"after_bytes": 20}, "/echo", {502}),
    ("close_after", {"after_bytes": 70000}, "/download?size=1000000", {None}),
    ("slow", {"slow_chunk": 50, "slow_delay": 0.01}, "/echo", {200}),
]


@pytest.mark.parametrize(
    ("kind", "options", "path", "expected"),
    FAULTS,
    ids=[f"{f[0]}-{i}" for i, f in enumerate(FAULTS)],
)
def test_upstream_fault_gives_the_documented_answer_and_leaks_nothing(
    faulty, kind: str, options: dict, path: str, expected: set
) -> None:
    proxy, sidecar = faulty
    assert httpx.get(sidecar.url + "/echo").status_code == 200
    baseline = fds(sidecar)
    proxy.set(kind, **options)
    seen = set()
    for _ in range(5):
        response = get(sidecar, path)
        if response is None:
            seen.add(None)
            continue
        if response.status_code != 200:
            assert response.headers["content-type"] == "application/problem+json"
        seen.add(response.status_code)
    assert seen <= expected, f"{kind}: saw {seen}"
    assert 500 not in seen
    after = settle(sidecar, proxy, baseline)
    assert after <= baseline + 2, f"fds {baseline} → {after}"
    assert psutil.Process(sidecar.pid).is_running()


def test_sidecar_answers_normally_after_a_storm_of_mixed_faults(faulty) -> None:
    proxy, sidecar = faulty
    baseline = fds(sidecar)
    for kind, options, path, _ in FAULTS * 2:
        proxy.set(kind, **options)
        get(sidecar, path)
    after = settle(sidecar, proxy, baseline)
    assert after <= baseline + 2
    assert proxy.open <= 2  # the sidecar keeps at most its pooled connections open
