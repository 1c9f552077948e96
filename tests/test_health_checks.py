"""Unit tests of the health checks' grading and aggregation, with fake endpoints, breakers
and Redis (the end-to-end proofs with real processes are in test_health_endpoints.py)."""

from __future__ import annotations

import asyncio
import enum
import time
from types import SimpleNamespace
from typing import Any

import pytest

from proxy.config import ConfigError
from proxy.config.loader import parse_config
from proxy.config.schema import Config, HealthCheck, HealthSettings, Store, Upstream
from proxy.health import EndpointHealth, ProbeResult, UpstreamProber
from proxy.health_checks import (
    StoreCheck,
    breaker_results,
    breaker_state,
    cpu_result,
    loop_lag_result,
    memory_result,
    upstream_results,
    worst,
)
from proxy.health_monitor import HealthMonitor, parse_include, unknown_checks
from proxy.system import LoopLagMonitor

SETTINGS = HealthSettings()


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


def fake_breaker(state: Any, enabled: bool = True) -> SimpleNamespace:
    return SimpleNamespace(
        state=state, enabled=enabled, snapshot=lambda: {"state": str(state), "failures": 3}
    )


def fake_cluster(
    name: str = "app", urls: tuple[str, ...] = ("http://a:1",), breakers: Any = None, **check: Any
) -> SimpleNamespace:
    config = Upstream(urls=list(urls), health_check=HealthCheck(**check))
    endpoints = []
    for i, url in enumerate(urls):
        endpoint = SimpleNamespace(url=url, healthy=None)
        if breakers is not None and breakers[i] is not None:
            endpoint.breaker = breakers[i]
        endpoints.append(endpoint)
    return SimpleNamespace(name=name, config=config, endpoints=endpoints)


def probe(ok: bool, detail: str = "GET /healthz answered 200") -> ProbeResult:
    return ProbeResult(ok, detail, 0.002, time.time(), 200 if ok else None)


def prober_with(cluster: SimpleNamespace, *oks: bool | None) -> UpstreamProber:
    """A prober whose endpoints had one probe each (None: not probed yet)."""
    prober = UpstreamProber()
    for endpoint, ok in zip(cluster.endpoints, oks, strict=True):
        if ok is not None:
            health = EndpointHealth()
            health.record(
                probe(ok, "GET /healthz could not connect" if not ok else "ok"), HealthCheck()
            )
            prober.health[(cluster.name, endpoint.url)] = health
    return prober


# -- probes and thresholds ----------------------------------------------------------------
def test_first_probe_decides_then_thresholds_need_consecutive_results() -> None:
    check = HealthCheck(healthy_threshold=2, unhealthy_threshold=3)
    health = EndpointHealth()
    assert health.record(probe(True), check) and health.healthy is True
    assert not health.record(probe(False), check) and health.healthy is True
    assert not health.record(probe(False), check) and health.healthy is True
    assert health.record(probe(False), check) and health.healthy is False
    assert not health.record(probe(True), check) and health.healthy is False
    assert health.record(probe(True), check) and health.healthy is True
    assert health.ever_healthy


async def test_probe_of_a_hanging_endpoint_gives_up_after_its_timeout() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    prober = UpstreamProber()
    try:
        start = time.monotonic()
        result = await prober.probe(f"http://127.0.0.1:{port}", HealthCheck(timeout=0.3))
        elapsed = time.monotonic() - start
    finally:
        await prober.close()
        server.close()
    assert not result.ok
    assert "timed out after 300 ms" in result.detail
    assert elapsed < 2.0  # bounded by the timeout, not by the hanging endpoint


# -- upstream ------------------------------------------------------------------------------
def test_upstream_with_its_only_endpoint_failing_fails_with_the_probe_detail() -> None:
    cluster = fake_cluster()
    (result,) = upstream_results(cluster, prober_with(cluster, False))  # type: ignore[arg-type]
    assert result.key == "upstream:app"
    assert result.status == "fail"
    assert "could not connect" in result.output
    assert result.threshold == {"fail": 1000.0}


def test_one_failing_endpoint_of_two_only_warns_because_the_other_serves() -> None:
    cluster = fake_cluster(urls=("http://a:1", "http://b:1"))
    results = upstream_results(cluster, prober_with(cluster, True, False))  # type: ignore[arg-type]
    assert [r.status for r in results] == ["pass", "warn"]
    assert "other endpoints still serve" in results[1].output


def test_endpoint_not_probed_yet_warns() -> None:
    cluster = fake_cluster()
    (result,) = upstream_results(cluster, prober_with(cluster, None))  # type: ignore[arg-type]
    assert result.status == "warn" and result.output == "not probed yet"


def test_open_breaker_warns_while_the_active_probe_passes() -> None:
    cluster = fake_cluster(breakers=[fake_breaker("open")])
    (result,) = upstream_results(cluster, prober_with(cluster, True))  # type: ignore[arg-type]
    assert result.status == "warn"
    assert "circuit open" in result.output
    assert result.details["breakerState"] == "open"


def test_without_active_checks_all_breakers_open_fail_the_upstream() -> None:
    cluster = fake_cluster(
        urls=("http://a:1", "http://b:1"),
        breakers=[fake_breaker(BreakerState.OPEN), fake_breaker(BreakerState.OPEN)],
        enabled=False,
    )
    results = upstream_results(cluster, UpstreamProber())  # type: ignore[arg-type]
    assert [r.status for r in results] == ["fail", "fail"]
    cluster.endpoints[1].breaker = fake_breaker(BreakerState.CLOSED)
    results = upstream_results(cluster, UpstreamProber())  # type: ignore[arg-type]
    assert [r.status for r in results] == ["warn", "pass"]


# -- circuit breakers ----------------------------------------------------------------------
def test_breaker_state_is_read_defensively() -> None:
    assert breaker_state(SimpleNamespace(url="x")) is None  # type: ignore[arg-type]
    assert breaker_state(SimpleNamespace(breaker=fake_breaker("half-open"))) == "half_open"  # type: ignore[arg-type]
    assert breaker_state(SimpleNamespace(breaker=fake_breaker(BreakerState.OPEN))) == "open"  # type: ignore[arg-type]
    disabled = SimpleNamespace(breaker=fake_breaker("closed", enabled=False))
    assert breaker_state(disabled) is None  # type: ignore[arg-type]


def test_open_breaker_warns_and_all_open_fails_only_for_a_critical_upstream() -> None:
    one_open = fake_cluster(
        urls=("http://a:1", "http://b:1"), breakers=[fake_breaker("open"), fake_breaker("closed")]
    )
    assert [r.status for r in breaker_results(one_open, True)] == ["warn", "pass"]  # type: ignore[arg-type]
    all_open = fake_cluster(breakers=[fake_breaker("open")])
    (critical,) = breaker_results(all_open, True)  # type: ignore[arg-type]
    assert critical.status == "fail" and "every endpoint" in critical.output
    assert critical.details["breaker"] == {"state": "open", "failures": 3}
    (informational,) = breaker_results(all_open, False)  # type: ignore[arg-type]
    assert informational.status == "warn"


def test_endpoint_without_breaker_passes() -> None:
    (result,) = breaker_results(fake_cluster(), True)  # type: ignore[arg-type]
    assert result.status == "pass" and result.observed_value == "none"


# -- system --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rss", "status"), [(70, "pass"), (80, "warn"), (94, "warn"), (95, "fail"), (120, "fail")]
)
def test_memory_is_graded_against_the_container_limit(rss: int, status: str) -> None:
    result = memory_result(rss * 1024 * 1024, 100 * 1024 * 1024, SETTINGS)
    assert result.status == status
    assert result.threshold == {"warn": 80 * 1024 * 1024, "fail": 95 * 1024 * 1024}


def test_memory_without_a_limit_passes_and_says_so() -> None:
    result = memory_result(50 * 1024 * 1024, None, SETTINGS)
    assert result.status == "pass" and "no container memory limit" in result.output


@pytest.mark.parametrize(("lag", "status"), [(0.0, "pass"), (0.15, "warn"), (1.5, "fail")])
def test_event_loop_lag_thresholds(lag: float, status: str) -> None:
    assert loop_lag_result(lag, SETTINGS).status == status


def test_cpu_only_warns_and_is_unmeasured_at_first() -> None:
    assert cpu_result(None, (0, 0, 0), SETTINGS).status == "pass"
    assert cpu_result(0.95, (2, 1, 1), SETTINGS).status == "warn"
    assert cpu_result(3.0, (9, 9, 9), SETTINGS).status == "warn"


# -- store ---------------------------------------------------------------------------------
class FakeRedis:
    def __init__(self, delay: float = 0.0, error: Exception | None = None) -> None:
        self.delay, self.error = delay, error

    async def ping(self) -> bool:
        await asyncio.sleep(self.delay)
        if self.error:
            raise self.error
        return True


STORE = Store(backend="redis", url="redis://:s3cret@127.0.0.1:6390/2", timeout=0.2)


@pytest.mark.parametrize(
    ("redis", "status", "output"),
    [
        (FakeRedis(), "pass", "PONG in"),
        (FakeRedis(delay=0.12), "warn", "(slow)"),
        (FakeRedis(delay=5), "fail", "no answer within 200 ms"),
        (FakeRedis(error=ConnectionError("refused")), "fail", "PING failed: ConnectionError"),
    ],
)
async def test_store_ping_is_graded_by_latency_and_bounded_by_the_store_timeout(
    redis: FakeRedis, status: str, output: str
) -> None:
    check = StoreCheck(STORE, redis)  # type: ignore[arg-type]
    assert check.result().status == "warn"  # not checked yet
    start = time.monotonic()
    result = await check.run_once(SETTINGS)
    assert time.monotonic() - start < 2.0
    assert result.status == status and output in result.output
    assert check.result() is result
    assert result.component_id == "redis://127.0.0.1:6390/2"  # no password
    assert "s3cret" not in str(result.document(critical=True))


def test_memory_store_passes_without_a_check() -> None:
    result = StoreCheck(Store(), None).result()
    assert result.key == "store:memory" and result.status == "pass"


# -- aggregation -----------------------------------------------------------------------------
def monitor_for(
    config: Config, cluster: SimpleNamespace, prober: UpstreamProber, draining: bool = False
) -> HealthMonitor:
    shared = SimpleNamespace(store_config=config.store, redis=None)
    runtime = SimpleNamespace(config=config, clusters={cluster.name: cluster}, shared=shared)
    state = SimpleNamespace(runtime=runtime, draining=draining)
    return HealthMonitor(state, prober, LoopLagMonitor())  # type: ignore[arg-type]


def test_critical_failure_fails_health_and_readiness_naming_the_check() -> None:
    cluster = fake_cluster()
    monitor = monitor_for(Config(), cluster, prober_with(cluster, True))
    assert monitor.readiness()[0] == 200
    monitor.prober.health[("app", "http://a:1")].record(probe(False, "refused"), HealthCheck())
    status, document = monitor.health()
    assert status == 503 and document["status"] == "fail"
    assert document["checks"]["upstream:app"][0]["output"].startswith("refused")
    assert set(document["checks"]) >= {
        "upstream:app",
        "store:memory",
        "circuit_breakers:app",
        "system:memory",
        "system:event_loop_lag",
        "system:cpu",
    }
    status, ready = monitor.readiness()
    assert status == 503 and "upstream:app" in ready["checks"]
    assert "upstream:app" in ready["output"]


def test_informational_failure_only_warns() -> None:
    cluster = fake_cluster(breakers=[fake_breaker("open")], enabled=False)
    config = Config(health=HealthSettings(critical=["store"]))
    monitor = monitor_for(config, cluster, UpstreamProber())
    status, document = monitor.health()
    assert document["checks"]["upstream:app"][0]["status"] == "fail"
    assert document["checks"]["upstream:app"][0]["critical"] is False
    assert status == 200 and document["status"] == "warn"
    assert monitor.readiness()[0] == 200


def test_include_narrows_the_document_and_its_status() -> None:
    cluster = fake_cluster()
    monitor = monitor_for(Config(), cluster, prober_with(cluster, False))
    status, document = monitor.health({"store", "system:memory"})
    assert set(document["checks"]) == {"store:memory", "system:memory"}
    assert status == 200
    assert parse_include(["upstream, store", "system"]) == {"upstream", "store", "system"}
    assert unknown_checks({"upstream:app", "bogus", "store"}) == ["bogus"]


def test_readiness_fails_while_starting_and_while_draining() -> None:
    cluster = fake_cluster()
    prober = prober_with(cluster, None)
    monitor = monitor_for(Config(), cluster, prober)
    status, ready = monitor.readiness()
    assert status == 503 and ready["lifecycle"] == "starting"
    assert "lifecycle:starting" in ready["checks"] and "app" in ready["output"]
    health = EndpointHealth()
    health.record(probe(True), HealthCheck())
    prober.health[("app", "http://a:1")] = health
    assert monitor.readiness() == (200, {"status": "pass", "lifecycle": "serving"})
    monitor.state.draining = True
    status, ready = monitor.readiness()
    assert status == 503 and list(ready["checks"]) == ["lifecycle:draining"]


def test_non_critical_upstream_does_not_hold_readiness_at_startup() -> None:
    cluster = fake_cluster()
    config = Config(health=HealthSettings(critical=["store"]))
    monitor = monitor_for(config, cluster, prober_with(cluster, None))
    assert monitor.readiness()[0] == 200


def test_worst_status_wins() -> None:
    assert worst([]) == "pass"
    assert worst(["pass", "warn"]) == "warn"
    assert worst(["warn", "fail", "pass"]) == "fail"


# -- config ----------------------------------------------------------------------------------
def test_drain_delay_longer_than_drain_timeout_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"shutdown\.drain_delay: must be <= drain_timeout"):
        parse_config("shutdown: {drain_delay: 30s, drain_timeout: 10s}", "x.yaml")
    with pytest.raises(ConfigError, match=r"health\.loop_lag_warn: must be <= loop_lag_fail"):
        parse_config("health: {loop_lag_warn: 2s}", "x.yaml")
    config = parse_config("health: {interval: 250ms, critical: [upstream]}", "x.yaml")
    assert config.health.interval == 0.25 and config.health.critical == ["upstream"]
