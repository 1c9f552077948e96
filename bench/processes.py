"""Child processes for the benchmark: started pinned to a CPU, logged, always cleaned up.

A :class:`Launcher` owns a temporary directory (configs, logs) and every process it
started; closing it (also on Ctrl-C or SIGTERM, see ``bench/__main__.py``) stops them all,
SIGTERM first then SIGKILL, and removes the directory. Children run in their own session,
so a Ctrl-C reaches the harness alone and the teardown is orderly. On Linux each child also gets
``PR_SET_PDEATHSIG`` so that it dies with the harness even if the harness is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Pinning:
    """Which CPU each side runs on; ``None`` CPUs mean "not pinned"."""

    proxy_cpu: int | None  # sidecar, nginx
    load_cpu: int | None  # upstream, wrk, redis

    @classmethod
    def choose(cls, enabled: bool) -> Pinning:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if not enabled or len(cpus) < 2 or shutil.which("taskset") is None:
            return cls(None, None)
        return cls(cpus[0], cpus[1])

    @property
    def enabled(self) -> bool:
        return self.proxy_cpu is not None

    def describe(self) -> str:
        if not self.enabled:
            return "not pinned (all processes share every CPU)"
        return (
            f"taskset: sidecar and nginx on CPU {self.proxy_cpu}; "
            f"upstream, wrk and redis-server on CPU {self.load_cpu}"
        )


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def interrupt_on_signals() -> None:
    """Turn SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt, so ``finally`` blocks run
    (SIGINT included: a shell may start a background job with SIGINT ignored)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupt)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Process:
    """One started child: its Popen and its log file."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 3.0) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            self.popen.terminate()
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
            self.popen.wait()


class StartupError(RuntimeError):
    """A child did not come up; the message carries the end of its log."""


class Launcher:
    """Starts children pinned per :class:`Pinning` and stops them all on :meth:`close`."""

    def __init__(self, pinning: Pinning) -> None:
        self.pinning = pinning
        self.workdir = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
        self.processes: list[Process] = []

    @staticmethod
    def command(args: list[str], cpu: int | None) -> list[str]:
        """``args`` prefixed with ``taskset -c CPU`` when pinning is on."""
        return ["taskset", "-c", str(cpu), *args] if cpu is not None else args

    def start(
        self, name: str, args: list[str], cpu: int | None, env: dict[str, str] | None = None
    ) -> Process:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                self.command(args, cpu),
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the harness only; it stops them
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def wait_port(self, process: Process, port: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not process.alive():
                raise StartupError(self._failure(process, "exited before listening"))
            with socket.socket() as sock:
                sock.settimeout(0.2)
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.05)
        raise StartupError(self._failure(process, f"not listening on {port} after {timeout}s"))

    def wait_http(self, process: Process, url: str, timeout: float = 20.0) -> None:
        """Until ``GET url`` answers 200 (e.g. the sidecar's readiness endpoint)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if not process.alive():
                raise StartupError(self._failure(process, "exited before becoming ready"))
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise StartupError(self._failure(process, f"{url} not ready after {timeout}s ({last})"))

    def _failure(self, process: Process, problem: str) -> str:
        return f"{process.name} {problem}; end of its log:\n{process.log_tail()}"

    def stop(self, process: Process) -> None:
        process.stop()
        if process in self.processes:
            self.processes.remove(process)

    def close(self) -> None:
        """Stop every child (newest first) and remove the working directory."""
        while self.processes:
            self.processes.pop().stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
