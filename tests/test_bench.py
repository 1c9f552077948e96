"""The benchmark harness's own pieces: its configs are valid, wrk's result line parses."""

from __future__ import annotations

import pytest

from bench.wrk import WrkError, parse
from proxy.config import load_config

BENCH_ENV = {
    "BENCH_PORT": "18080",
    "BENCH_ADMIN_PORT": "19901",
    "BENCH_UPSTREAM_URL": "http://127.0.0.1:13000",
    "BENCH_REDIS_URL": "redis://127.0.0.1:16379/0",
    "BENCH_STORE": "memory",
}


@pytest.mark.parametrize("name", ["pass-through", "all-features", "keyed-redis"])
def test_bench_configs_are_valid_sidecar_configs(name: str) -> None:
    config = load_config(f"bench/configs/{name}.yaml", env=BENCH_ENV)
    assert config.listen.port == 18080
    assert config.upstreams  # every config proxies to the bench upstream


def test_all_features_config_turns_every_feature_on() -> None:
    config = load_config("bench/configs/all-features.yaml", env=BENCH_ENV)
    assert config.metrics.enabled
    assert any(r.rate_limit for r in config.routes)
    assert any(r.idempotency and r.idempotency.enabled for r in config.routes)
    assert any(r.retry for r in config.routes) or config.upstreams["app"].retry.max_attempts > 1
    assert config.upstreams["app"].circuit_breaker.enabled


def test_wrk_result_line_is_parsed_exactly() -> None:
    output = (
        "Running 5s test @ http://127.0.0.1:1/\n"
        'BENCH_JSON {"requests":1000,"duration_us":2000000,"bytes":5,"connect_errors":1,'
        '"read_errors":2,"write_errors":0,"timeouts":3,"status_errors":4,"p50_us":51,'
        '"p90_us":90,"p99_us":109,"max_us":400,"mean_us":55.5}\n'
    )
    result = parse(output)
    assert result.rps == 500.0
    assert (result.p50_us, result.p99_us) == (51, 109)
    assert result.socket_errors == 6 and result.errors == 10


def test_wrk_output_without_a_result_line_is_an_error() -> None:
    with pytest.raises(WrkError):
        parse("wrk: connection refused\n")
