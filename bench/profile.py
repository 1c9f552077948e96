"""``python -m bench.profile``: where the all-features sidecar spends its CPU under load.

Starts the upstream and the all-features sidecar (pinned like the benchmark), attaches
``py-spy record`` to the sidecar while wrk drives it, and writes a flamegraph SVG and/or
a speedscope JSON (open it at speedscope.app or with ``speedscope FILE``) under
``bench/results/``. py-spy samples from outside the process (ptrace), so the profiled
code runs unmodified; it needs root or ``CAP_SYS_PTRACE``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

from bench import wrk
from bench.processes import ROOT, Launcher, Pinning, StartupError, interrupt_on_signals
from bench.report import RESULTS
from bench.scenarios import log
from bench.targets import SIDECARS, Fleet

FORMATS = {"flamegraph": "svg", "speedscope": "speedscope.json", "raw": "collapsed.txt"}
FUNCTION = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def summarise(collapsed: Path, top: int = 25) -> str:
    """Self and inclusive share of samples per function, from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [_function(frame) for frame in stack.split(";")]
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    if not total:
        return "no samples"
    lines = [f"{total} samples"]
    for title, counter in (("self", own), ("inclusive", inclusive)):
        lines.append(f"-- top {top} by {title} time")
        for name, samples in counter.most_common(top):
            lines.append(f"{100 * samples / total:6.1f}%  {name}")
    return "\n".join(lines)


def _function(frame: str) -> str:
    """``name (path/to/file.py:12)`` → ``name (file.py)``: lines of one function merge."""
    match = FUNCTION.match(frame.strip())
    if not match:
        return frame.strip()
    return f"{match['name']} ({Path(match['file']).name})"


def py_spy() -> str | None:
    """The py-spy next to this interpreter (the venv's), else on PATH."""
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per recording")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--method", choices=["GET", "POST"], default="GET")
    parser.add_argument(
        "--target", choices=sorted(SIDECARS), default="all-features"
    )
    parser.add_argument(
        "--format",
        choices=[*FORMATS, "both"],
        default="both",
        help="both: flamegraph and speedscope; raw: collapsed stacks and a top-functions table",
    )
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="include C frames (py-spy --native)")
    parser.add_argument("--no-pin", action="store_true")
    return parser.parse_args(argv)


def record(
    spy: str,
    pid: int,
    output: Path,
    fmt: str,
    args: argparse.Namespace,
    load: list[str],
    launcher: Launcher,
) -> None:
    """One py-spy recording of ``pid`` while ``load`` (a wrk command) runs."""
    command = [spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--format", fmt]
    command += ["--duration", str(round(args.duration)), "--output", str(output), "--nonblocking"]
    if args.native:
        command.append("--native")
    spy_process = subprocess.Popen(
        launcher.command(command, launcher.pinning.load_cpu),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        time.sleep(0.5)  # let py-spy attach before the load starts
        done = subprocess.run(
            launcher.command(load, launcher.pinning.load_cpu),
            capture_output=True,
            text=True,
            check=False,
        )
        result = wrk.parse(done.stdout)
        log(f"  load: {result.rps:,.0f} req/s (slower than unprofiled: py-spy samples it)")
        spy_output, _ = spy_process.communicate(timeout=args.duration + 30)
    finally:
        if spy_process.poll() is None:
            spy_process.kill()
            spy_process.wait()
    if spy_process.returncode != 0 or not output.exists():
        raise RuntimeError(f"py-spy failed ({spy_process.returncode}):\n{spy_output[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spy = py_spy()
    if spy is None:
        print("error: py-spy is not installed: .venv/bin/pip install -e '.[dev]'", file=sys.stderr)
        return 2
    if not wrk.installed():
        print("error: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    interrupt_on_signals()
    launcher = Launcher(Pinning.choose(not args.no_pin))
    fleet = Fleet(launcher)
    formats = ["flamegraph", "speedscope"] if args.format == "both" else [args.format]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = "/api/orders" if args.method == "POST" else "/api/items/42"
    try:
        target = fleet.target(args.target)
        assert target.pid is not None
        script = wrk.write_script(launcher.workdir, args.method)
        threads = 1 if launcher.pinning.enabled else 2
        # the load runs a little longer than the recording, so every sample is under load
        load = wrk.command(
            target.base_url + path,
            args.connections,
            threads,
            args.duration + 2,
            script,
            timeout=10,
        )
        warmup = wrk.command(target.base_url + path, 32, threads, 2, script, timeout=10)
        subprocess.run(
            launcher.command(warmup, launcher.pinning.load_cpu), capture_output=True, check=False
        )
        RESULTS.mkdir(parents=True, exist_ok=True)
        for fmt in formats:
            output = RESULTS / f"profile-{args.target}-{args.method.lower()}-{stamp}.{FORMATS[fmt]}"
            log(f"recording {args.target} ({args.method}, {args.connections} conns) as {fmt}")
            record(spy, target.pid, output, fmt, args, load, launcher)
            print(f"wrote {output.relative_to(ROOT)}")
            if fmt == "raw":
                print(summarise(output))
    except (StartupError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        fleet.close()
        launcher.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
