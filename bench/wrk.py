"""Driving ``wrk``: the command line, the Lua scripts and the result of one run.

wrk (C, epoll, LuaJIT) rather than a Python load generator: a Python client saturates its
own core long before a proxy's. Every run uses a Lua script ending in ``lua/report.lua``,
whose ``done()`` prints one ``BENCH_JSON {...}`` line with exact microsecond percentiles
and every error count; ``--latency`` is still passed so the human-readable distribution is
in the raw output kept in the JSON results.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Method = Literal["GET", "POST"]

_LUA = Path(__file__).resolve().parent / "lua"
_MARKER = "BENCH_JSON "


def installed() -> bool:
    return shutil.which("wrk") is not None


def version() -> str:
    if not installed():
        return "not installed"
    done = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    first = (done.stdout or done.stderr).split("[", 1)[0].split()
    return " ".join(first) if first else "unknown"  # "wrk debian/4.1.0-3+b2"


def write_script(workdir: Path, method: Method) -> Path:
    """The Lua script for ``method`` (POSTs get a fresh nonce, so keys never repeat)."""
    parts = []
    if method == "POST":
        nonce = uuid.uuid4().hex[:12]
        parts.append(f'nonce = "{nonce}"\n' + (_LUA / "post.lua").read_text())
    parts.append((_LUA / "report.lua").read_text())
    path = workdir / f"wrk-{method.lower()}-{uuid.uuid4().hex[:8]}.lua"
    path.write_text("\n".join(parts))
    return path


def command(
    url: str, connections: int, threads: int, duration: float, script: Path, timeout: float
) -> list[str]:
    return [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={max(1, round(timeout))}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]


@dataclass(frozen=True)
class WrkResult:
    """The figures of one wrk run."""

    requests: int
    duration_s: float
    p50_us: int
    p90_us: int
    p99_us: int
    max_us: int
    mean_us: float
    socket_errors: int  # connect + read + write + timeout
    status_errors: int  # answers with status >= 400

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def errors(self) -> int:
        return self.socket_errors + self.status_errors

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "rps": round(self.rps, 1)}


class WrkError(RuntimeError):
    """wrk failed or printed no result line."""


def parse(output: str) -> WrkResult:
    """The result from wrk's output (the ``BENCH_JSON`` line printed by ``report.lua``)."""
    for line in output.splitlines():
        if line.startswith(_MARKER):
            data = json.loads(line[len(_MARKER) :])
            return WrkResult(
                requests=data["requests"],
                duration_s=data["duration_us"] / 1_000_000,
                p50_us=data["p50_us"],
                p90_us=data["p90_us"],
                p99_us=data["p99_us"],
                max_us=data["max_us"],
                mean_us=data["mean_us"],
                socket_errors=data["connect_errors"]
                + data["read_errors"]
                + data["write_errors"]
                + data["timeouts"],
                status_errors=data["status_errors"],
            )
    raise WrkError(f"no result line in wrk output:\n{output[-2000:]}")
