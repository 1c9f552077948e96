"""The effective config with secrets replaced, for ``/api/config`` and logs."""

from __future__ import annotations

import re
from typing import Any

from proxy.config.schema import Config

_URL_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")
_SECRET_KEYS = re.compile(r"pass(word)?|secret|token|api[_-]?key", re.IGNORECASE)
REDACTED = "***"


def redacted_config(config: Config) -> dict[str, Any]:
    return _redact(config.model_dump(mode="json"))


def _redact(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, key) for v in value]
    if isinstance(value, str):
        if _SECRET_KEYS.search(key):
            return REDACTED
        return _URL_PASSWORD.sub(rf"\1{REDACTED}@", value)
    return value
