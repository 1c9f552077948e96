"""The RFC 9111 rules of the response cache, as a shared (proxy) cache applies them.

:func:`storage_plan` decides once, when a response arrives, whether it may be stored and
for how long it is fresh and may be served stale; a lookup then only compares two
timestamps. Rules (the "basics" of RFC 9111, plus RFC 5861 ``stale-if-error``):

- only final answers with a status in :data:`CACHEABLE_STATUSES`; never ``206``;
- never with ``no-store``, ``private``, ``no-cache`` (the sidecar does not revalidate),
  ``Vary: *`` or ``Set-Cookie`` (a cookie is somebody's session);
- a response to a request with ``Authorization`` only when it says ``public``,
  ``s-maxage`` or ``must-revalidate`` (RFC 9111 §3.5), and only such entries answer
  requests that carry ``Authorization``;
- freshness: ``s-maxage``, else ``max-age``, else ``Expires`` - ``Date``, else the route's
  ``ttl`` (a configured heuristic, for :data:`DEFAULT_TTL_STATUSES` only), minus ``Age``;
- stale window: ``stale-if-error=N`` from the response, else the route's
  ``stale_if_error``; none with ``must-revalidate``, ``proxy-revalidate`` or ``s-maxage``
  (RFC 9111 §4.2.4 forbids serving those stale).

Hand-written rather than with ``hishel``: hishel 2 is a client-side state machine over its
own string-header models that re-parses headers on every lookup and has no route default
TTL, Set-Cookie refusal or operator stale window; the rules above fit in this module and
cost nothing on a hit.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from proxy.types import Headers

# Statuses a shared cache may store (RFC 9110 §15.1 heuristically cacheable ones).
CACHEABLE_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
# Statuses the route's `ttl` applies to when the upstream gives no freshness: not 404 and
# friends, so a resource created later is not hidden behind a cached "not found".
DEFAULT_TTL_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 410})
# Upstream answers (and the sidecar's own 502/503/504) that make a stale copy worth serving.
ERROR_STATUSES = frozenset({500, 502, 503, 504})

_NO_STALE = ("must-revalidate", "proxy-revalidate", "s-maxage", "no-cache")


@dataclass(slots=True)
class StoragePlan:
    """How a storable response is kept: seconds fresh and stale from now, and more."""

    fresh_for: float
    stale_for: float
    initial_age: int
    vary: tuple[bytes, ...]  # lower-case request header names the response varies on
    shared_auth: bool  # may answer requests that carry Authorization


def parse_cache_control(value: bytes) -> dict[str, str | None]:
    """``max-age=60, no-cache="set-cookie", public`` → ``{name: argument or None}``."""
    directives: dict[str, str | None] = {}
    for part in value.decode("latin-1").split(","):
        name, sep, argument = part.strip().partition("=")
        name = name.strip().lower()
        if name:
            directives[name] = argument.strip().strip('"') if sep else None
    return directives


def _seconds(value: str | None) -> int | None:
    if value is None or not value.isdigit():
        return None
    return int(value)


def _http_date(value: bytes | None) -> float | None:
    if value is None:
        return None
    try:
        return parsedate_to_datetime(value.decode("latin-1")).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def storage_plan(
    status: int,
    headers: Headers,
    *,
    now: float,
    request_has_auth: bool,
    ttl: float,
    stale_if_error: float,
) -> StoragePlan | None:
    """The plan for storing this response, or ``None`` when it must not be stored."""
    if status not in CACHEABLE_STATUSES:
        return None
    cache_control: list[bytes] = []
    expires = date = age = None
    vary: list[bytes] = []
    for name, value in headers:
        if name == b"cache-control":
            cache_control.append(value)
        elif name == b"set-cookie" or name == b"content-range":
            return None
        elif name == b"vary":
            vary.extend(v.strip().lower() for v in value.split(b",") if v.strip())
        elif name == b"expires":
            expires = value
        elif name == b"date":
            date = value
        elif name == b"age":
            age = value
    if b"*" in vary:
        return None
    cc = parse_cache_control(b",".join(cache_control)) if cache_control else {}
    if "no-store" in cc or "private" in cc or "no-cache" in cc:
        return None
    shared_auth = "public" in cc or "s-maxage" in cc or "must-revalidate" in cc
    if request_has_auth and not shared_auth:
        return None

    lifetime: float | None = _seconds(cc.get("s-maxage"))
    if lifetime is None:
        lifetime = _seconds(cc.get("max-age"))
    if lifetime is None and expires is not None:
        expires_at = _http_date(expires)
        origin_now = _http_date(date) or now
        lifetime = 0.0 if expires_at is None else max(0.0, expires_at - origin_now)
    if lifetime is None:
        if status not in DEFAULT_TTL_STATUSES:
            return None
        lifetime = ttl
    initial_age = _seconds(age.decode("latin-1").strip() if age else None) or 0

    if any(directive in cc for directive in _NO_STALE):
        stale_for = 0.0
    else:
        stale_directive = _seconds(cc.get("stale-if-error"))
        stale_for = float(stale_directive) if stale_directive is not None else stale_if_error
    fresh_for = max(0.0, lifetime - initial_age)
    if fresh_for <= 0 and stale_for <= 0:
        return None
    return StoragePlan(fresh_for, stale_for, initial_age, tuple(sorted(set(vary))), shared_auth)
