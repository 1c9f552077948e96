"""``make soak``: a bounded soak of the sidecar with every feature on, under mixed traffic
and rotating network faults (upstream and Redis), e.g. ``python -m tests.soak --seconds 120``.

Prints RSS and open fds at the start (after warm-up), after the first full cycle of faults
and at the end, and fails (exit 1) when RSS grew by more than 10 % since that first cycle
(before it, each fault sets the allocator's high-water mark once: about +5 MiB, not a leak:
tracemalloc shows no growth of Python objects), when open fds grew by more than 10 %, when
any request got a 500, or when any idempotency key was executed more than once upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from tests.support.fault_proxy import FaultProxy
from tests.support.processes import RedisServer, Sidecar, Upstream

FAULT_CYCLE = [
    ("none", {}),
    ("latency", {"latency": 0.05}),
    ("reset", {"after_bytes": 40}),
    ("none", {}),
    ("slow", {"slow_chunk": 64, "slow_delay": 0.002}),
    ("close_after", {"after_bytes": 100}),
    ("blackhole", {}),
    ("none", {}),
]


def sidecar_config(upstream_port: int, redis_port: int) -> dict:
    return {
        "store": {
            "backend": "redis",
            "url": f"redis://127.0.0.1:{redis_port}/0",
            "timeout": "200ms",
        },
        "upstreams": {
            "app": {
                "url": f"http://127.0.0.1:{upstream_port}",
                "timeouts": {"connect": "300ms", "request": "1s", "idle": "1s"},
                "health_check": {"path": "/healthz", "interval": "1s", "timeout": "300ms"},
                "circuit_breaker": {"failure_threshold": 20, "open_timeout": "2s"},
                "retry": {
                    "max_attempts": 3,
                    "base_delay": "10ms",
                    "max_delay": "100ms",
                    "timeout": "2s",
                },
            }
        },
        "routes": [
            {
                "match": {"path": "/orders", "methods": ["POST"]},
                "idempotency": {"enabled": True, "ttl": "10m"},
                "rate_limit": {"requests_per_second": 10000, "burst": 10000},
            },
            {"match": {"path_prefix": "/cache/"}, "cache": {"ttl": "1s", "stale_if_error": "1m"}},
        ],
        "shutdown": {"drain_delay": "0s", "drain_timeout": "5s"},
        "reload": {"watch": False},
        "logging": {"level": "warning"},
    }


async def traffic(url: str, deadline: float, statuses: collections.Counter, worker: int) -> None:
    keys = itertools.count()
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        while time.monotonic() < deadline:
            kind = random.random()
            try:
                if kind < 0.4:
                    response = await client.get("/echo", params={"w": worker})
                elif kind < 0.6:
                    response = await client.get(f"/cache/item{random.randint(1, 20)}")
                elif kind < 0.7:
                    response = await client.post(
                        "/upload", content=b"p" * random.randint(0, 200_000)
                    )
                else:
                    key = f"soak-{worker}-{next(keys)}"
                    headers = {"Idempotency-Key": key, "X-Test-Key": key}
                    for _ in range(4):  # a client retrying its keyed POST
                        response = await client.post("/orders", json={"n": 1}, headers=headers)
                        statuses[response.status_code] += 1
                        if response.status_code < 500 and response.status_code != 409:
                            break
                        await asyncio.sleep(0.05)
                    continue
                statuses[response.status_code] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1


def snapshot(pid: int) -> tuple[int, int]:
    process = psutil.Process(pid)
    return process.memory_info().rss, process.num_fds()


async def run(seconds: float, workers: int) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    upstream = Upstream().start()
    redis = RedisServer().start()
    upstream_faults = FaultProxy(upstream.port).start()
    redis_faults = FaultProxy(redis.port).start()
    sidecar = Sidecar(sidecar_config(upstream_faults.port, redis_faults.port), workdir).start(
        wait_ready=True
    )
    statuses: collections.Counter = collections.Counter()
    try:
        warmup = time.monotonic() + min(10.0, seconds / 6)
        await asyncio.gather(*(traffic(sidecar.url, warmup, statuses, w) for w in range(workers)))
        rss0, fds0 = snapshot(sidecar.pid)
        print(f"start: RSS {rss0 / 2**20:.1f} MiB, open fds {fds0}", flush=True)
        deadline = time.monotonic() + seconds
        load = asyncio.gather(
            *(traffic(sidecar.url, deadline, statuses, w) for w in range(workers))
        )
        phase = 0
        mid: tuple[int, int] | None = None
        while time.monotonic() < deadline - 8:
            if phase == len(FAULT_CYCLE):
                # Every fault has run once: allocator high-water marks (uploads buffered for
                # a black-holed upstream, reconnect storms) are set; growth from here is a leak.
                mid = snapshot(sidecar.pid)
                print(f"after one fault cycle: RSS {mid[0] / 2**20:.1f} MiB, open fds {mid[1]}")
            kind, options = FAULT_CYCLE[phase % len(FAULT_CYCLE)]
            upstream_faults.set(kind, **options)
            redis_faults.set(*(("refuse",) if phase % 5 == 4 else ("none",)))
            print(
                f"  t+{seconds - (deadline - time.monotonic()):5.0f}s fault: upstream {kind}, "
                f"redis {redis_faults.fault.kind}",
                flush=True,
            )
            phase += 1
            await asyncio.sleep(min(5.0, max(0.0, deadline - 8 - time.monotonic())))
        upstream_faults.set("none")
        redis_faults.set("none")
        await load
        await asyncio.sleep(2)  # let pooled and aborted connections settle
        rss1, fds1 = snapshot(sidecar.pid)
        print(f"end:   RSS {rss1 / 2**20:.1f} MiB, open fds {fds1}")
        print("statuses:", dict(sorted(statuses.items(), key=str)))
        calls = httpx.get(upstream.url + "/stats").json()["calls"]  # noqa: ASYNC210
        executed_twice = {
            k: n for k, n in calls.items() if k.startswith("POST /orders soak-") and n > 1
        }
        failures = []
        base = mid[0] if mid is not None else rss0
        print(
            f"RSS growth: {100 * (rss1 / rss0 - 1):+.1f} % since warm-up, "
            f"{100 * (rss1 / base - 1):+.1f} % since the first fault cycle"
        )
        if rss1 > base * 1.10:
            failures.append(f"RSS grew {100 * (rss1 / base - 1):.1f} % (> 10 %)")
        if fds1 > fds0 * 1.10 and fds1 - fds0 > 2:
            failures.append(f"open fds grew from {fds0} to {fds1} (> 10 %)")
        if statuses[500]:
            failures.append(f"{statuses[500]} request(s) got a 500")
        if executed_twice:
            failures.append(f"keys executed more than once: {list(executed_twice)[:5]}")
        if failures:
            errors = [line for line in sidecar.output().splitlines() if "ERROR" in line]
            print("sidecar errors (first 10):", *errors[:10], sep="\n  ")
        print("SOAK FAILED: " + "; ".join(failures) if failures else "SOAK PASSED")
        return 1 if failures else 0
    finally:
        sidecar.stop()
        upstream_faults.stop()
        redis_faults.stop()
        redis.kill()
        upstream.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    sys.exit(asyncio.run(run(args.seconds, args.workers)))


if __name__ == "__main__":
    main()
