"""Process and system readings prometheus-client's default collectors leave out.

The default registry already has ``process_*`` (RSS, virtual memory, CPU seconds, open and
max fds, start time), ``python_gc_*`` and ``python_info``. This collector adds, read at
scrape time from ``proxy/system.py`` (so a request pays nothing):

- ``sidecar_process_cpu_seconds_total{mode="user"|"system"}``
- ``sidecar_process_threads``
- ``sidecar_system_load_average{period="1m"|"5m"|"15m"}``
- ``sidecar_container_memory_limit_bytes`` and ``sidecar_process_memory_limit_ratio``
  (RSS / limit), only when cgroups reveal a limit
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from proxy import system


class SystemCollector(Collector):
    """Reads CPU split, threads, load and the container memory limit on each scrape."""

    def collect(self) -> Iterable[Metric]:
        user, sys_ = system.cpu_times()
        cpu = CounterMetricFamily(
            "sidecar_process_cpu_seconds",
            "CPU time used by the sidecar process, by mode.",
            labels=["mode"],
            unit="seconds",
        )
        cpu.add_metric(["user"], user)
        cpu.add_metric(["system"], sys_)
        yield cpu
        yield GaugeMetricFamily(
            "sidecar_process_threads", "OS threads of the sidecar process.", system.threads()
        )
        load = GaugeMetricFamily(
            "sidecar_system_load_average",
            "System load average (runnable tasks) over 1, 5 and 15 minutes.",
            labels=["period"],
        )
        for period, value in zip(("1m", "5m", "15m"), system.load_average(), strict=True):
            load.add_metric([period], value)
        yield load
        limit = system.memory_limit_bytes()
        if limit is not None:
            yield GaugeMetricFamily(
                "sidecar_container_memory_limit_bytes",
                "The container's memory limit from cgroups.",
                limit,
                unit="bytes",
            )
            yield GaugeMetricFamily(
                "sidecar_process_memory_limit_ratio",
                "Resident memory as a share of the container's memory limit.",
                system.rss_bytes() / limit,
                unit="ratio",
            )


_registered: set[int] = set()


def register_system_collector(registry: CollectorRegistry = REGISTRY) -> None:
    """Add :class:`SystemCollector` to ``registry`` once (safe to call repeatedly)."""
    if id(registry) not in _registered:
        registry.register(SystemCollector())
        _registered.add(id(registry))
