"""Parsing of human-friendly durations (``250ms``, ``5s``, ``24h``) and sizes (``64KiB``)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB|K|M|G)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
}


def parse_duration(value: Any) -> float:
    """Seconds from ``"250ms"``, ``"5s"``, ``"1.5m"``, ``"24h"`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 250ms, 5s or 24h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a duration (use e.g. 250ms, 5s, 1m, 24h)")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    else:
        raise ValueError("must be a duration such as 250ms, 5s or 24h")
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from ``"64KiB"``, ``"1MiB"``, ``"10MB"`` or a plain integer."""
    if isinstance(value, bool):
        raise ValueError("must be a size such as 64KiB or 1MiB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float) and value.is_integer():
        size = int(value)
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a size (use e.g. 512, 64KiB, 1MiB, 10MB)")
        size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])
    else:
        raise ValueError("must be a size such as 64KiB or 1MiB")
    if size < 0:
        raise ValueError("must not be negative")
    return size


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of a duration, for the ``/api/config`` view."""
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= factor and (seconds / factor).is_integer():
            return f"{int(seconds // factor)}{unit}"
    millis = round(seconds * 1000, 3)
    if millis.is_integer():
        return f"{int(millis)}ms"
    return f"{millis}ms"


Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration)]
"""A duration in seconds, written as ``250ms``/``5s``/``24h`` in YAML."""

Size = Annotated[int, BeforeValidator(parse_size)]
"""A size in bytes, written as ``64KiB``/``1MiB`` in YAML."""
