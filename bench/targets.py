"""What the benchmark measures: the upstream itself, nginx in front of it, and sidecars.

:class:`Fleet` starts each process once on free ports, pinned per
:class:`~bench.processes.Pinning` (proxies on one CPU, the upstream and redis-server on
the other), and hands out :class:`Target` s: a base URL plus the process whose CPU and
memory are accounted (none for direct). The sidecar runs as ``python -m proxy run`` with a
config from ``bench/configs/``, its ports and upstream given through ``${VAR}`` expansion.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bench.processes import Launcher, Process, free_port

CONFIGS = Path(__file__).resolve().parent / "configs"

Kind = Literal["direct", "nginx", "sidecar"]


@dataclass
class Target:
    """One thing to drive with wrk."""

    key: str  # "direct", "nginx", "pass-through", ...
    label: str  # row label in the tables
    kind: Kind
    base_url: str
    process: Process | None = None  # accounted for CPU and RSS
    before_run: Callable[[], None] | None = field(default=None, repr=False)
    admin_url: str | None = None  # sidecars only
    config: str | None = None  # sidecars: the config file, relative to the repository

    def describe(self) -> dict[str, str | None]:
        return {"label": self.label, "kind": self.kind, "config": self.config}

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


@dataclass(frozen=True)
class SidecarSpec:
    """A sidecar variant: its config file and extra environment."""

    label: str
    config: str  # file name in bench/configs/
    env: tuple[tuple[str, str], ...] = ()
    redis: bool = False  # needs the private redis-server


SIDECARS: dict[str, SidecarSpec] = {
    "pass-through": SidecarSpec("sidecar pass-through", "pass-through.yaml"),
    "all-features": SidecarSpec("sidecar all features", "all-features.yaml"),
    "keyed-redis": SidecarSpec("sidecar keyed, redis store", "keyed-redis.yaml", redis=True),
    "all-features-redis": SidecarSpec(
        "sidecar all features, redis store",
        "all-features.yaml",
        env=(("BENCH_STORE", "redis"),),
        redis=True,
    ),
}


class Unavailable(RuntimeError):
    """A target that cannot run here (a binary is missing); the message says why."""


def nginx_version() -> str:
    if shutil.which("nginx") is None:
        return "not installed"
    done = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
    return (done.stderr or done.stdout).strip().removeprefix("nginx version: ")


def redis_command(port: int, *args: str) -> bytes:
    """Send one command to redis-server (RESP) and return the first reply line."""
    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        payload += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        return sock.makefile("rb").readline().strip()


NGINX_CONF = """\
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream app {{
        server {upstream};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


class Fleet:
    """Starts the processes a scenario needs, each at most once; :meth:`close` stops them."""

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher
        self.pinning = launcher.pinning
        self._upstream: tuple[Process, str] | None = None
        self._redis: tuple[Process, int] | None = None
        self._targets: dict[str, Target] = {}
        self._started: list[Process] = []

    def _start(self, name: str, args: list[str], cpu: int | None, **env: str) -> Process:
        process = self.launcher.start(name, args, cpu, env)
        self._started.append(process)
        return process

    def upstream_url(self) -> str:
        if self._upstream is None:
            port = free_port()
            process = self._start(
                "upstream",
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "bench.upstream:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--loop",
                    "uvloop",
                    "--http",
                    "httptools",
                    "--no-access-log",
                    "--log-level",
                    "warning",
                    "--backlog",
                    "4096",
                ],
                self.pinning.load_cpu,
            )
            self.launcher.wait_port(process, port)
            self._upstream = (process, f"127.0.0.1:{port}")
        return f"http://{self._upstream[1]}"

    def redis_port(self) -> int:
        if self._redis is None:
            binary = shutil.which("redis-server")
            if binary is None:
                raise Unavailable("redis-server is not installed (apt-get install redis-server)")
            port = free_port()
            process = self._start(
                "redis",
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "no",
                ],
                self.pinning.load_cpu,
            )
            self.launcher.wait_port(process, port)
            self._redis = (process, port)
        return self._redis[1]

    def target(self, key: str) -> Target:
        """The target named ``key`` (``direct``, ``nginx`` or a key of :data:`SIDECARS`)."""
        if key not in self._targets:
            if key == "direct":
                url = self.upstream_url()
                self._targets[key] = Target(key, "direct to upstream", "direct", url)
            elif key == "nginx":
                self._targets[key] = self._nginx()
            else:
                self._targets[key] = self._sidecar(key, SIDECARS[key])
        return self._targets[key]

    def _nginx(self) -> Target:
        if shutil.which("nginx") is None:
            raise Unavailable("nginx is not installed (apt-get install nginx): no reference row")
        upstream = self.upstream_url().removeprefix("http://")
        tmp = self.launcher.workdir / f"nginx-{uuid.uuid4().hex[:6]}"
        tmp.mkdir()
        tmp.chmod(0o755)  # workers run as an unprivileged user when started as root
        self.launcher.workdir.chmod(0o755)
        port = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, upstream=upstream, port=port))
        args = ["nginx", "-c", str(conf), "-p", str(tmp), "-e", str(tmp / "error.log")]
        process = self._start("nginx", [*args, "-g", "daemon off;"], self.pinning.proxy_cpu)
        self.launcher.wait_port(process, port)
        return Target("nginx", "nginx (reference)", "nginx", f"http://127.0.0.1:{port}", process)

    def _sidecar(self, key: str, spec: SidecarSpec) -> Target:
        env = {
            "BENCH_UPSTREAM_URL": self.upstream_url(),
            "BENCH_PORT": str(free_port()),
            "BENCH_ADMIN_PORT": str(free_port()),
            **dict(spec.env),
        }
        before_run = None
        if spec.redis:
            redis_port = self.redis_port()
            env["BENCH_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"

            def before_run() -> None:  # every key is fresh anyway; keep redis small
                redis_command(redis_port, "FLUSHALL")

        config = CONFIGS / spec.config
        process = self._start(
            key,
            [sys.executable, "-m", "proxy", "run", "--config", str(config)],
            self.pinning.proxy_cpu,
            **env,
        )
        self.launcher.wait_port(process, int(env["BENCH_PORT"]))
        ready = f"http://127.0.0.1:{env['BENCH_ADMIN_PORT']}/api/ready"
        self.launcher.wait_http(process, ready)
        url = f"http://127.0.0.1:{env['BENCH_PORT']}"
        admin = f"http://127.0.0.1:{env['BENCH_ADMIN_PORT']}"
        extra = "".join(f" with {name}={value}" for name, value in spec.env)
        config_name = f"bench/configs/{spec.config}{extra}"
        return Target(key, spec.label, "sidecar", url, process, before_run, admin, config_name)

    def close(self) -> None:
        """Stop what this fleet started (newest first)."""
        while self._started:
            self.launcher.stop(self._started.pop())
        self._targets.clear()
        self._upstream = None
        self._redis = None


def idempotency_outcomes(target: Target) -> dict[str, float]:
    """The sidecar's ``sidecar_idempotency_requests_total`` by outcome (empty if absent)."""
    if target.admin_url is None:
        return {}
    try:
        with urllib.request.urlopen(target.admin_url + "/api/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    outcomes: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("sidecar_idempotency_requests_total{"):
            labels, _, value = line.rpartition(" ")
            outcome = labels.split('outcome="', 1)[-1].split('"', 1)[0]
            outcomes[outcome] = outcomes.get(outcome, 0.0) + float(value)
    return outcomes


def probe(target: Target, method: str, path: str) -> tuple[int, dict[str, str]]:
    """One request as the benchmark will send it: (status, lower-cased headers)."""
    data = None
    headers = {}
    if method == "POST":
        data = b'{"restaurant_id":1,"items":[{"id":7,"qty":2}],"amount":1250}'
        headers = {"Content-Type": "application/json", "Idempotency-Key": uuid.uuid4().hex}
    request = urllib.request.Request(
        target.base_url + path, data=data, headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}
