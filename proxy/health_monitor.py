"""Health aggregation: runs every check in the background and answers liveness,
readiness and health from the latest results, without ever awaiting a dependency.

- health (``application/health+json``, IETF health-check draft shape): every check's
  observations keyed ``check:name``; the worst status wins, but a check outside
  ``health.critical`` can only make the whole ``warn``. 200 for pass/warn, 503 for fail.
- readiness: fails while starting (no upstream has passed a probe yet), while draining,
  and while any critical check fails, naming each reason.
- liveness is answered by the admin app itself: it depends on nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from proxy.app import ProxyState
from proxy.config.schema import HealthSettings
from proxy.health import UpstreamProber
from proxy.health_checks import (
    CHECKS,
    CheckResult,
    Status,
    StoreCheck,
    SystemCheck,
    breaker_results,
    upstream_results,
    worst,
)
from proxy.pipeline import Runtime
from proxy.system import LoopLagMonitor

logger = logging.getLogger("sidecar.health")

try:
    VERSION = version("sidecar")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    VERSION = "0"


class HealthMonitor:
    """Owns the background checks and grades them into health and readiness documents."""

    def __init__(self, state: ProxyState, prober: UpstreamProber, loop_lag: LoopLagMonitor) -> None:
        self.state = state
        self.prober = prober
        self.loop_lag = loop_lag
        shared = state.runtime.shared
        self.store = StoreCheck(shared.store_config, shared.redis)
        self.system = SystemCheck(loop_lag)
        self.started = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def settings(self) -> HealthSettings:
        return self.state.runtime.config.health

    def start(self) -> None:
        """Start probing (call once, inside the event loop)."""
        self.prober.start(self.state.runtime)
        self.loop_lag.start()
        if self.store.redis is not None:
            self._tasks.append(asyncio.create_task(self._every(self._store_once)))
        self._tasks.append(asyncio.create_task(self._every(self._system_once)))

    def reload(self, runtime: Runtime) -> None:
        """Probe the new runtime's endpoints (known endpoints keep their state)."""
        self.prober.start(runtime)

    async def _every(self, measure: Callable[[], Any]) -> None:
        while True:
            try:
                await measure()
            except Exception:  # a broken check must not stop checking
                logger.exception("health check failed unexpectedly")
            await asyncio.sleep(self.settings.interval)

    async def _store_once(self) -> None:
        previous = self.store.latest
        result = await self.store.run_once(self.settings)
        if previous is None or (previous.status == "fail") != (result.status == "fail"):
            log = logger.warning if result.status == "fail" else logger.info
            log("store %s: %s", result.component_id, result.output)

    async def _system_once(self) -> None:
        self.system.sample(self.settings)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        await self.prober.close()

    # -- grading ------------------------------------------------------------------------
    def results(self) -> list[CheckResult]:
        """The latest observation of every check, graded now."""
        runtime = self.state.runtime
        upstream_critical = "upstream" in self.settings.critical
        results: list[CheckResult] = []
        for cluster in runtime.clusters.values():
            results += upstream_results(cluster, self.prober)
        results.append(self.store.result())
        for cluster in runtime.clusters.values():
            results += breaker_results(cluster, upstream_critical)
        results += self.system.results(self.settings)
        return results

    def lifecycle(self) -> str:
        """``starting`` until every probed upstream passed once, ``serving``, ``draining``."""
        if self.state.draining:
            return "draining"
        if not self.started:
            self.started = not self._waiting_for()
            if self.started:
                logger.info("first successful upstream probes: ready to serve")
        return "serving" if self.started else "starting"

    def _waiting_for(self) -> list[str]:
        """Health-checked upstreams that never passed a probe (when upstreams are critical)."""
        if "upstream" not in self.settings.critical:
            return []
        return [
            name
            for name, cluster in self.state.runtime.clusters.items()
            if cluster.config.health_check.enabled and not self.prober.ever_healthy(name)
        ]

    def health(self, include: Collection[str] | None = None) -> tuple[int, dict[str, Any]]:
        """The ``/api/health`` status code and document, narrowed to ``include`` if given."""
        critical = set(self.settings.critical)
        results = [
            r for r in self.results() if include is None or r.check in include or r.key in include
        ]
        status = worst(_weigh(r, critical) for r in results)
        checks: dict[str, list[dict[str, Any]]] = {}
        for r in results:
            checks.setdefault(r.key, []).append(r.document(critical=r.check in critical))
        document: dict[str, Any] = {
            "status": status,
            "version": VERSION,
            "serviceId": "sidecar",
            "description": "sidecar reliability proxy",
            "lifecycle": self.lifecycle(),
        }
        if status != "pass":
            document["output"] = "; ".join(
                f"{r.key} {r.component_id} {r.status}: {r.output}"
                for r in results
                if r.status != "pass"
            )
        document["notes"] = [
            f"critical checks: {', '.join(sorted(critical)) or 'none'}; "
            "the others can only make the status warn"
        ]
        document["checks"] = checks
        return (503 if status == "fail" else 200), document

    def readiness(self) -> tuple[int, dict[str, Any]]:
        """The ``/api/ready`` status code and document naming every reason it fails."""
        reasons: dict[str, list[dict[str, Any]]] = {}
        lifecycle = self.lifecycle()
        if lifecycle == "draining":
            reasons["lifecycle:draining"] = [
                {"status": "fail", "output": "shutting down: finishing in-flight requests"}
            ]
        elif lifecycle == "starting":
            waiting = ", ".join(self._waiting_for())
            reasons["lifecycle:starting"] = [
                {"status": "fail", "output": f"waiting for a first passed probe of {waiting}"}
            ]
        critical = set(self.settings.critical)
        for r in self.results():
            if r.check in critical and r.status == "fail":
                reasons.setdefault(r.key, []).append(r.document(critical=True))
        if not reasons:
            return 200, {"status": "pass", "lifecycle": lifecycle}
        summary = "; ".join(
            f"{key}: {entry['output']}" for key, entries in reasons.items() for entry in entries
        )
        return 503, {
            "status": "fail",
            "lifecycle": lifecycle,
            "output": f"not ready: {summary}",
            "checks": reasons,
        }


def _weigh(result: CheckResult, critical: set[str]) -> Status:
    """A result's weight in the overall status: informational checks warn at most."""
    if result.status == "fail" and result.check not in critical:
        return "warn"
    return result.status


def parse_include(values: list[str]) -> set[str]:
    """``?include=upstream,store`` (repeatable) as a set of check names or ``check:name`` keys."""
    return {part.strip() for value in values for part in value.split(",") if part.strip()}


def unknown_checks(include: Collection[str]) -> list[str]:
    return sorted(name for name in include if name.split(":", 1)[0] not in CHECKS)
