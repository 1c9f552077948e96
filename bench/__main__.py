"""``python -m bench`` (``make bench``): measure the sidecar against direct and nginx.

Starts a trivial upstream, nginx and the sidecar variants on free ports, drives each with
wrk at 1 and 32 connections, interleaved and repeated, prints one table per scenario and
the goals of issue 11 with PASS/FAIL, and writes ``bench/results/latest.json``. Every
process is stopped and every temporary file removed on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from bench import report, wrk
from bench.processes import ROOT, Launcher, Pinning, StartupError, interrupt_on_signals
from bench.scenarios import Outcome, Settings, log, run_scenario, scenarios
from bench.summary import Row, goals, summarize
from bench.targets import nginx_version
from bench.wrk import WrkError

SCENARIOS = ("main", "redis", "cpu")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run (5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument(
        "--scenario", choices=[*SCENARIOS, "all"], default="all", help="what to run (all)"
    )
    parser.add_argument(
        "--connections",
        default="1,32",
        help="comma-separated wrk connection counts (1,32); goals use 1 and 32",
    )
    parser.add_argument(
        "--cpu-us", type=int, default=1000, help="upstream CPU per request in the cpu scenario"
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per target")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round of 2 s")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead: profile the all-features sidecar with py-spy (see bench/profile.py)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 2.0, 1
    if args.duration < 1 or args.rounds < 1:
        parser.error("--duration must be >= 1 and --rounds >= 1")
    try:
        args.connections = tuple(int(c) for c in args.connections.split(","))
    except ValueError:
        parser.error("--connections: comma-separated integers, e.g. 1,32")
    return args


def _git_revision() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    revision = git("rev-parse", "--short", "HEAD") or "unknown"
    return revision + (" + uncommitted changes" if git("status", "--porcelain") else "")


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def metadata(args: argparse.Namespace, pinning: Pinning) -> dict[str, object]:
    """How this run was made, for the header and the JSON document."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    threads = 1 if pinning.enabled else 2
    example = wrk.command(
        "http://127.0.0.1:PORT/api/items/42", 32, threads, args.duration, Path("SCRIPT.lua"), 10
    )
    return {
        "started": datetime.now().isoformat(timespec="seconds"),
        "git": _git_revision(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "load_average_at_start": " ".join(f"{x:.2f}" for x in load),
        "pinning": pinning.describe(),
        "python": platform.python_version(),
        "wrk": wrk.version(),
        "wrk_command": " ".join(Launcher.command(example, pinning.load_cpu)),
        "nginx": nginx_version(),
        "duration_s": args.duration,
        "rounds": args.rounds,
        "connections": list(args.connections),
        "warmup_s": args.warmup,
        "cpu_us": args.cpu_us,
    }


def header(meta: dict[str, object], args: argparse.Namespace) -> str:
    conns = ",".join(str(c) for c in args.connections)
    return "\n".join(
        [
            f"sidecar benchmark, {meta['started']} (git {meta['git']})",
            f"machine: {meta['cpus']} CPUs ({meta['cpu_model']}), load average at start "
            f"{meta['load_average_at_start']}: other processes share these CPUs, so "
            "throughput and latency are noisy (CPU µs/request much less so)",
            f"pinning: {meta['pinning']}",
            f"load: {meta['wrk']}, connections {{{conns}}}, {args.duration:g} s per run, "
            f"{args.rounds} round(s), targets interleaved (order rotates per round), "
            f"{args.warmup:g} s warm-up per target; e.g. {meta['wrk_command']}",
            "upstream: bench/upstream.py under uvicorn (uvloop, httptools), one process; "
            f"nginx {meta['nginx']} (1 worker, keepalive 64); sidecar: python "
            f"{meta['python']}, configs in bench/configs/",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile:
        from bench import profile

        return profile.main(["--duration", str(max(args.duration, 10.0))])
    if not wrk.installed():
        message = "error: wrk is not installed: `make bench` installs it, or apt-get install wrk"
        print(message, file=sys.stderr)
        return 2
    interrupt_on_signals()

    pinning = Pinning.choose(not args.no_pin)
    meta = metadata(args, pinning)
    print(header(meta, args), flush=True)
    settings = Settings(args.duration, args.rounds, args.connections, args.warmup)
    chosen = SCENARIOS if args.scenario == "all" else (args.scenario,)
    defined = scenarios(args.cpu_us)
    results: dict[str, tuple[Outcome, list[Row]]] = {}
    failures: dict[str, str] = {}
    launcher = Launcher(pinning)
    try:
        for name in chosen:
            log(f"scenario {name}: {defined[name].title}")
            try:
                outcome = run_scenario(defined[name], settings, launcher)
            except (StartupError, WrkError, RuntimeError, OSError) as exc:
                failures[name] = str(exc)
                log(f"scenario {name} failed: {exc}")
                continue
            results[name] = (outcome, summarize(outcome))
    except KeyboardInterrupt:
        log("interrupted: stopping every process and removing temporary files")
        return 130
    finally:
        launcher.close()

    high, low = max(args.connections), min(args.connections)
    judged = goals(results, high, low, args.cpu_us)
    print()
    for outcome, rows in results.values():
        print(report.table(outcome, rows), end="\n\n")
    for name, problem in failures.items():
        print(f"== {name}: FAILED TO RUN\n  {problem}\n")
    print(report.LEGEND, end="\n\n")
    print(report.goals_table(judged))
    document = report.document(meta, results, failures, judged)
    latest, dated = report.write(document)
    print(f"\nwrote {latest.relative_to(ROOT)} and {dated.relative_to(ROOT)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
