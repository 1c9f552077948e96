"""The three scenarios and the loop that runs them: interleaved targets, repeated rounds.

Within a round every target is driven at one connection count before the next count, so
targets measured side by side share the machine's state of the moment; the order of the
targets rotates from round to round so that none is always first (or always right after
the most expensive one). Every run records wrk's figures plus the proxy's CPU time
(``/proc/PID/stat`` before and after) and its peak RSS (sampled during the run).
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import procstat, wrk
from bench.processes import Launcher
from bench.targets import Fleet, Target, Unavailable, idempotency_outcomes, probe
from bench.wrk import Method, WrkResult


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    method: Method
    path: str
    targets: tuple[str, ...]
    # response header each sidecar target must send, proving its features are active
    markers: tuple[tuple[str, str], ...] = ()


def scenarios(cpu_us: int) -> dict[str, Scenario]:
    return {
        "main": Scenario(
            "main",
            "GET, trivial upstream (~50 B JSON)",
            "GET",
            "/api/items/42",
            ("direct", "nginx", "pass-through", "all-features"),
            (("all-features", "ratelimit"),),
        ),
        "redis": Scenario(
            "redis",
            "keyed POSTs (unique Idempotency-Key per request)",
            "POST",
            "/api/orders",
            (
                "direct",
                "nginx",
                "pass-through",
                "all-features",
                "keyed-redis",
                "all-features-redis",
            ),
            (
                ("all-features", "x-idempotency-key"),
                ("keyed-redis", "x-idempotency-key"),
                ("all-features-redis", "x-idempotency-key"),
            ),
        ),
        "cpu": Scenario(
            "cpu",
            f"GET, upstream spending {cpu_us} µs of CPU per request",
            "GET",
            f"/api/items/42?cpu_us={cpu_us}",
            ("direct", "nginx", "pass-through", "all-features"),
        ),
    }


@dataclass(frozen=True)
class Settings:
    duration: float
    rounds: int
    connections: tuple[int, ...]
    warmup: float


@dataclass
class Run:
    """One wrk run against one target."""

    target: str
    connections: int
    round: int
    result: WrkResult
    cpu_us_per_request: float | None
    rss_peak_bytes: int | None

    def as_dict(self) -> dict[str, object]:
        return {
            "target": self.target,
            "connections": self.connections,
            "round": self.round,
            **self.result.as_dict(),
            "cpu_us_per_request": _round(self.cpu_us_per_request),
            "rss_peak_bytes": self.rss_peak_bytes,
        }


@dataclass
class Outcome:
    """Everything one scenario produced."""

    scenario: Scenario
    targets: dict[str, Target] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_scenario(scenario: Scenario, settings: Settings, launcher: Launcher) -> Outcome:
    """Start the scenario's targets, check them, warm them up, and measure them."""
    outcome = Outcome(scenario)
    fleet = Fleet(launcher)
    try:
        for key in scenario.targets:
            try:
                outcome.targets[key] = fleet.target(key)
            except Unavailable as exc:
                outcome.notes.append(f"{key} skipped: {exc}")
                log(f"  note: {key} skipped: {exc}")
        _check(scenario, outcome)
        script = wrk.write_script(launcher.workdir, scenario.method)
        if settings.warmup > 0:
            for target in outcome.targets.values():
                _measure(target, scenario.path, 32, settings.warmup, script, launcher)
        for round_ in range(settings.rounds):
            for connections in settings.connections:
                keys = list(outcome.targets)
                shift = round_ % len(keys)
                for key in keys[shift:] + keys[:shift]:
                    target = outcome.targets[key]
                    run = _measure(
                        target, scenario.path, connections, settings.duration, script, launcher
                    )
                    run.round = round_ + 1
                    outcome.runs.append(run)
                    log(
                        f"  [{scenario.name} round {round_ + 1}/{settings.rounds}, "
                        f"{connections:>2} conn] {key:<20} {run.result.rps:>9.0f} req/s  "
                        f"p50 {run.result.p50_us:>6} µs  p99 {run.result.p99_us:>6} µs"
                        + (f"  errors {run.result.errors}" if run.result.errors else "")
                    )
        _check_keys(scenario, outcome)
        return outcome
    finally:
        fleet.close()


def _check(scenario: Scenario, outcome: Outcome) -> None:
    """One request per target: a non-2xx answer stops the scenario; a missing feature
    marker (e.g. no ``RateLimit`` header from the all-features sidecar) is noted."""
    markers = dict(scenario.markers)
    for key, target in outcome.targets.items():
        status, headers = probe(target, scenario.method, scenario.path)
        if not 200 <= status < 300:
            raise RuntimeError(
                f"{key} answered {status} to {scenario.method} {scenario.path}; "
                f"log:\n{target.process.log_tail() if target.process else ''}"
            )
        marker = markers.get(key)
        if marker and marker not in headers:
            note = (
                f"{key}: no '{marker}' header in its answer: that feature looks inactive, "
                "so this row does not measure it"
            )
            outcome.notes.append(note)
            log(f"  note: {note}")


def _check_keys(scenario: Scenario, outcome: Outcome) -> None:
    """Keyed targets must have stored every request and replayed none (keys are unique)."""
    for key, marker in scenario.markers:
        target = outcome.targets.get(key)
        if marker != "x-idempotency-key" or target is None:
            continue
        outcomes = idempotency_outcomes(target)
        if not outcomes:
            continue
        stored, replayed = int(outcomes.get("stored", 0)), int(outcomes.get("replayed", 0))
        others = {k: int(v) for k, v in outcomes.items() if v and k not in ("stored", "replayed")}
        note = (
            f"{key}: idempotency outcomes over the scenario: {stored} stored, {replayed} replayed"
        )
        if others:
            note += f", other: {others}"
        outcome.notes.append(note)


def _measure(
    target: Target, path: str, connections: int, duration: float, script: Path, launcher: Launcher
) -> Run:
    """One wrk run against ``target``, with the target's CPU time and peak RSS around it."""
    pinning = launcher.pinning
    threads = 1 if pinning.enabled else min(connections, 2)  # one pinned core: one thread
    args = wrk.command(
        target.base_url + path, connections, threads, duration, script, max(10.0, duration)
    )
    if target.before_run is not None:
        target.before_run()
    pid = target.pid if procstat.available() else None
    cpu_before = procstat.tree_cpu_seconds(pid) if pid else 0.0
    rss_peak = 0
    process = subprocess.Popen(
        launcher.command(args, pinning.load_cpu),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        while process.poll() is None:
            if pid:
                rss_peak = max(rss_peak, procstat.tree_rss_bytes(pid))
            time.sleep(0.2)
        output = process.stdout.read() if process.stdout else ""
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    cpu_used = procstat.tree_cpu_seconds(pid) - cpu_before if pid else 0.0
    if target.process is not None and not target.process.alive():
        raise RuntimeError(f"{target.key} died during the run:\n{target.process.log_tail()}")
    result = wrk.parse(output)
    cpu_per_request = cpu_used / result.requests * 1_000_000 if pid and result.requests else None
    return Run(target.key, connections, 0, result, cpu_per_request, rss_peak if pid else None)


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)
