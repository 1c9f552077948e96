"""Process and machine readings shared by metrics and health: memory against the
container's limit, CPU, load, and event-loop lag (measured by a background sampler)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import psutil

from proxy.metrics import LOOP_LAG

_PROCESS = psutil.Process()
_CGROUP_LIMIT_FILES = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)


def rss_bytes() -> int:
    return int(_PROCESS.memory_info().rss)


def memory_limit_bytes() -> int | None:
    """The container's memory limit from cgroups, or ``None`` when unlimited or unknown."""
    for path in _CGROUP_LIMIT_FILES:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        # cgroup v1 reports "unlimited" as a huge page-aligned number.
        if value >= psutil.virtual_memory().total or value > 1 << 60:
            return None
        return value
    return None


def cpu_times() -> tuple[float, float]:
    """(user, system) CPU seconds used by this process."""
    times = _PROCESS.cpu_times()
    return float(times.user), float(times.system)


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def threads() -> int:
    return _PROCESS.num_threads()


def open_fds() -> int:
    try:
        return _PROCESS.num_fds()
    except (AttributeError, psutil.Error):  # pragma: no cover - non-Linux
        return -1


class LoopLagMonitor:
    """Samples how late the event loop runs a timer; ``lag`` is the latest delay (seconds)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.lag = 0.0
        self.last_sample = time.time()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.lag = max(0.0, loop.time() - expected)
            self.last_sample = time.time()
            LOOP_LAG.set(self.lag)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
