"""Endpoint choice across an upstream's URLs: round robin, skipping endpoints that fail
their active health check unless none passes (panic mode)."""

from __future__ import annotations

import httpx

from tests.conftest import basic_config
from tests.support.processes import Upstream, poll, upstream_calls


def test_endpoint_failing_its_health_check_gets_no_traffic_until_it_recovers(start_sidecar) -> None:
    good, sick = Upstream().start(), Upstream().start()
    try:
        httpx.post(sick.url + "/admin/health?status=503")
        config = basic_config([good.url, sick.url])
        app = config["upstreams"]["app"]
        app["circuit_breaker"] = {"enabled": False}
        sidecar = start_sidecar(config, wait_ready=True)
        for _ in range(10):
            assert httpx.get(sidecar.url + "/echo", headers={"X-Test-Key": "lb"}).status_code == 200
        assert upstream_calls(good, "GET", "/echo", "lb") == 10
        assert upstream_calls(sick, "GET", "/echo", "lb") == 0
        # Healthy again: round robin includes it once a probe passes.
        httpx.post(sick.url + "/admin/health?status=200")

        def sick_gets_traffic() -> bool:
            httpx.get(sidecar.url + "/echo", headers={"X-Test-Key": "lb2"})
            return upstream_calls(sick, "GET", "/echo", "lb2") > 0

        poll(sick_gets_traffic, 5, "the recovered endpoint back in rotation")
    finally:
        good.stop()
        sick.stop()


def test_when_every_endpoint_fails_its_health_check_traffic_still_flows(start_sidecar) -> None:
    first, second = Upstream().start(), Upstream().start()
    try:
        for upstream in (first, second):
            httpx.post(upstream.url + "/admin/health?status=503")
        config = basic_config([first.url, second.url])
        app = config["upstreams"]["app"]
        app["circuit_breaker"] = {"enabled": False}
        sidecar = start_sidecar(config)
        poll(
            lambda: httpx.get(sidecar.admin_url + "/api/ready").status_code == 503,
            5,
            "readiness failing",
        )
        statuses = {httpx.get(sidecar.url + "/echo").status_code for _ in range(6)}
        assert statuses == {200}  # panic mode: the probe's verdict does not black-hole traffic
    finally:
        first.stop()
        second.stop()
