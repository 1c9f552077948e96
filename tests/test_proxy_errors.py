"""Upstream failures become problem documents; bad configs are refused with their field."""

from __future__ import annotations

import subprocess
import sys

import httpx

from tests.conftest import basic_config
from tests.support.processes import ROOT, Upstream, free_port


def test_unreachable_upstream_answers_502_problem(start_sidecar) -> None:
    config = basic_config(f"http://127.0.0.1:{free_port()}")
    config["upstreams"]["app"]["retry"] = {"max_attempts": 1}
    sidecar = start_sidecar(config)
    response = httpx.get(sidecar.url + "/anything")
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 502
    assert problem["type"].endswith("upstream-unreachable")
    assert "cannot connect" in problem["detail"]
    assert problem["title"] == "Bad Gateway"


def test_slow_upstream_answers_504_problem(echo_upstream: Upstream, start_sidecar) -> None:
    config = basic_config(echo_upstream.url)
    config["upstreams"]["app"]["timeouts"] = {"connect": "1s", "request": "300ms"}
    config["upstreams"]["app"]["retry"] = {"max_attempts": 1}
    sidecar = start_sidecar(config)
    response = httpx.get(sidecar.url + "/slow?delay=3")
    assert response.status_code == 504
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("upstream-timeout")
    # The sidecar keeps serving afterwards.
    assert httpx.get(sidecar.url + "/echo").status_code == 200


def _sidecar_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
    )


def test_invalid_config_names_the_file_and_field_and_exits_1(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "upstreams:\n  app: {url: 'http://127.0.0.1:3000', retry: {max_attempts: 0}}\n"
        "routes:\n  - match: {path: /x}\n    upstrem: app\n"
    )
    for args in (("check-config", str(path)), ("run", "--config", str(path))):
        result = _sidecar_cli(*args)
        assert result.returncode == 1
        assert f"{path}: upstreams.app.retry.max_attempts: must be >= 1" in result.stderr
        assert f"{path}: routes[0].upstrem: unknown key" in result.stderr


def test_check_config_accepts_the_shipped_config() -> None:
    result = _sidecar_cli("check-config", "config/sidecar.yaml")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "route(s)" in result.stdout
