"""Reading a config file: YAML parsing, ``${VAR}`` expansion, validation, readable errors.

Every problem is reported as ``FILE: path.to.field: problem`` (``routes[1].retry.max_attempts``),
all of them at once, so that one run of ``sidecar check-config`` shows everything to fix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from proxy.config.schema import Config

_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """A config file that cannot be used; ``errors`` holds one line per problem."""

    def __init__(self, path: str, errors: list[str]) -> None:
        self.path = path
        self.errors = errors
        super().__init__("\n".join(f"{path}: {error}" for error in errors))


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate ``path``; raise :class:`ConfigError` listing every problem."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(name, [f"cannot read file: {exc.strerror or exc}"]) from None
    return parse_config(text, name, os.environ if env is None else env)


def parse_config(text: str, name: str = "<config>", env: Mapping[str, str] | None = None) -> Config:
    """Validate YAML ``text`` (reported as file ``name``)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(name, [f"{where}invalid YAML: {problem}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            name, ["the top level must be a mapping of sections (listen, routes, ...)"]
        )
    errors: list[str] = []
    expanded = _expand(raw, os.environ if env is None else env, "", errors)
    if errors:
        raise ConfigError(name, errors)
    try:
        return Config.model_validate(expanded)
    except ValidationError as exc:
        raise ConfigError(name, [_format_error(e) for e in exc.errors()]) from None


def _expand(value: Any, env: Mapping[str, str], where: str, errors: list[str]) -> Any:
    """Expand ``${VAR}`` / ``${VAR:-default}`` in every string; unset without default is an error."""
    if isinstance(value, dict):
        return {k: _expand(v, env, _join(where, str(k)), errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env, f"{where}[{i}]", errors) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:

        def substitute(match: re.Match[str]) -> str:
            var, default = match.group(1), match.group(2)
            if var in env:
                return env[var]
            if default is not None:
                return default
            errors.append(
                f"{where or '<root>'}: environment variable {var} is not set (use ${{{var}:-default}})"
            )
            return ""

        expanded = _VAR_RE.sub(substitute, value)
        # A value that is exactly one ${VAR} becomes YAML-typed, so `port: ${PORT}` is an int.
        if _VAR_RE.fullmatch(value.strip()):
            try:
                return yaml.safe_load(expanded) if expanded else expanded
            except yaml.YAMLError:
                return expanded
        return expanded
    return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


_MESSAGES = [
    (re.compile(r"^Input should be greater than or equal to (.+)$"), r"must be >= \1"),
    (re.compile(r"^Input should be greater than (.+)$"), r"must be > \1"),
    (re.compile(r"^Input should be less than or equal to (.+)$"), r"must be <= \1"),
    (re.compile(r"^Input should be less than (.+)$"), r"must be < \1"),
    (re.compile(r"^Extra inputs are not permitted$"), "unknown key"),
    (re.compile(r"^Field required$"), "required"),
    (re.compile(r"^Input should be a valid integer.*$"), "must be an integer"),
    (re.compile(r"^Input should be a valid number.*$"), "must be a number"),
    (re.compile(r"^Input should be a valid boolean.*$"), "must be true or false"),
    (re.compile(r"^Input should be a valid list.*$"), "must be a list"),
    (re.compile(r"^Input should be a valid dictionary.*$"), "must be a mapping"),
    (re.compile(r"^Input should be a valid string.*$"), "must be a string"),
    (re.compile(r"^Input should be (.+)$"), r"must be \1"),
    (re.compile(r"^Value error, (.+)$", re.S), r"\1"),
]


def _format_error(error: Mapping[str, Any]) -> str:
    path = ""
    for part in error["loc"]:
        path = f"{path}[{part}]" if isinstance(part, int) else _join(path, str(part))
    message = str(error["msg"])
    for pattern, replacement in _MESSAGES:
        if pattern.match(message):
            message = pattern.sub(replacement, message)
            break
    # Model-level validators phrase their message as "field: problem" relative to the model.
    if ": " in message and re.match(r"^[\w\[\].]+: ", message) and not message.startswith("'"):
        field, _, rest = message.partition(": ")
        if field.startswith("routes[") or field in ("upstreams", "default_upstream"):
            return f"{field}: {rest}"
        path = f"{path}{field}" if field.startswith("[") else _join(path, field)
        message = rest
    return f"{path or '<root>'}: {message}"
