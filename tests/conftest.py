"""Shared fixtures: real upstream, sidecar and redis-server processes on free ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.processes import RedisServer, Sidecar, Upstream


@pytest.fixture(scope="session")
def echo_upstream() -> Iterator[Upstream]:
    """The controllable echo/fault upstream, shared by the session."""
    upstream = Upstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture
def start_sidecar(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Sidecar]]:
    """Start sidecars from config dicts; all are stopped (and their logs shown on failure)."""
    started: list[Sidecar] = []

    def start(
        config: dict, *, wait_ready: bool = False, env: dict[str, str] | None = None
    ) -> Sidecar:
        sidecar = Sidecar(config, tmp_path, env=env).start(wait_ready=wait_ready)
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        sidecar.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for sidecar in started:
            print(f"--- sidecar log ({sidecar.config_path}) ---\n{sidecar.output()}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for the session; tests that stop it must restart it."""
    server = RedisServer().start()
    yield server
    server.kill()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, free to kill and restart."""
    server = RedisServer().start()
    yield server
    server.kill()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def basic_config(upstream_url: str | list[str], **overrides: object) -> dict:
    """A minimal sidecar config pointing `app` at ``upstream_url`` (or several URLs)."""
    endpoints = {"urls": upstream_url} if isinstance(upstream_url, list) else {"url": upstream_url}
    config: dict = {
        "upstreams": {
            "app": {
                **endpoints,
                "timeouts": {"connect": "1s", "request": "5s"},
                "health_check": {"path": "/healthz", "interval": "200ms", "timeout": "500ms"},
            }
        },
        "shutdown": {"drain_delay": "0s", "drain_timeout": "5s"},
        "reload": {"watch": False},
    }
    config.update(overrides)
    return config
