"""Real processes for integration tests: upstreams, sidecars and a private redis-server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]


def upstream_calls(upstream: Upstream, method: str, path: str, key: str) -> int:
    """How often the echo upstream executed ``method path`` for ``X-Test-Key: key``."""
    calls = httpx.get(upstream.url + "/stats", timeout=5).json()["calls"]
    return int(calls.get(f"{method} {path} {key}", 0))


def sidecar_metric(sidecar: Sidecar, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``, from /api/metrics."""
    text = httpx.get(sidecar.admin_url + "/api/metrics", timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def poll(condition: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    """Wait until ``condition()`` is truthy and return its value, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout}s")
        time.sleep(step)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout}s")


class Process:
    """A child process with its output in a log file (shown when a test fails)."""

    def __init__(
        self, args: list[str], *, env: dict[str, str] | None = None, name: str = "proc"
    ) -> None:
        self.args = args
        self.name = name
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        self.proc = subprocess.Popen(
            self.args, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Upstream(Process):
    """An ASGI app under uvicorn (the test echo app by default)."""

    def __init__(self, app: str = "tests.support.echo_app:app", port: int | None = None) -> None:
        self.port = port or free_port()
        super().__init__(
            [
                sys.executable,
                "-m",
                "uvicorn",
                app,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--no-access-log",
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--log-level",
                "warning",
            ],
            name="upstream",
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> Upstream:
        super().start()
        wait_for_port(self.port, self.proc)
        return self


class Sidecar(Process):
    """``python -m proxy run`` with a config written from a dict."""

    def __init__(self, config: dict, workdir: Path, env: dict[str, str] | None = None) -> None:
        config = dict(config)
        self.port = config.setdefault("listen", {}).setdefault("port", free_port())
        config["listen"].setdefault("host", "127.0.0.1")
        self.admin_port = config.setdefault("admin", {}).setdefault("port", free_port())
        config.setdefault("logging", {"level": "info"})
        self.config = config
        self.config_path = workdir / f"sidecar-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        super().__init__(
            [sys.executable, "-m", "proxy", "run", "--config", str(self.config_path)],
            env=env,
            name="sidecar",
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"

    def start(self, wait_ready: bool = False) -> Sidecar:
        for attempt in range(3):
            super().start()
            try:
                wait_for_port(self.port, self.proc)
                wait_for_port(self.admin_port, self.proc)
                break
            except RuntimeError:
                # A free port can be taken by another process between our probe and the
                # bind: choose new ports and try again; any other early exit is an error.
                if "address already in use" not in self.output() or attempt == 2:
                    raise RuntimeError(f"sidecar exited early:\n{self.output()}") from None
                self._choose_new_ports()
        if wait_ready:
            self.wait_ready()
        return self

    def _choose_new_ports(self) -> None:
        self.config["listen"]["port"] = self.port = free_port()
        self.config["admin"]["port"] = self.admin_port = free_port()
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.admin_url + "/api/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"sidecar not ready after {timeout}s:\n{self.output()}")


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError("redis-server is not installed: run `make test` (it installs it)")
    return path


class RedisServer(Process):
    """A private, non-persistent redis-server on a free port that tests may stop and restart."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        super().__init__(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
            name="redis",
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        super().start()
        wait_for_port(self.port, self.proc)
        return self

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()
