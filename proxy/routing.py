"""Route matching, compiled once per config: first match wins, else the default route.

Exact paths are a dict lookup; templates (``/api/restaurants/{id}``) and prefixes are
checked in order. Each :class:`CompiledRoute` carries its pre-built pipeline (``app``) and
its metrics label (``endpoint``), the path template, so labels stay bounded whatever paths
clients send.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from proxy.config.schema import Route
from proxy.types import ASGIApp

_PARAM_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
UNMATCHED = "unmatched"


def compile_template(template: str) -> re.Pattern[str]:
    """``/a/{id}/b`` → a regex matching one path segment per parameter."""
    pattern = ""
    position = 0
    for match in _PARAM_RE.finditer(template):
        pattern += re.escape(template[position : match.start()])
        pattern += f"(?P<{match.group(1)}>[^/]+)"
        position = match.end()
    pattern += re.escape(template[position:])
    return re.compile(pattern + r"/?\Z")


@dataclass(eq=False)
class CompiledRoute:
    """A route ready to serve: matcher, label and pipeline."""

    index: int  # position in `routes`, -1 for the default route
    config: Route
    endpoint: str
    methods: frozenset[str] | None
    exact: str | None = None
    prefix: str | None = None
    regex: re.Pattern[str] | None = None
    app: ASGIApp | None = field(default=None, repr=False)

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.exact is not None:
            return path == self.exact or path == self.exact + "/"
        if self.prefix is not None:
            return path.startswith(self.prefix)
        if self.regex is not None:
            return self.regex.match(path) is not None
        return True


def compile_route(index: int, route: Route) -> CompiledRoute:
    match = route.match
    methods = frozenset(match.methods) if match.methods else None
    if match.path is not None:
        endpoint = route.name or match.path
        if _PARAM_RE.search(match.path):
            return CompiledRoute(
                index, route, endpoint, methods, regex=compile_template(match.path)
            )
        return CompiledRoute(index, route, endpoint, methods, exact=match.path)
    if match.path_prefix is not None:
        endpoint = route.name or match.path_prefix.rstrip("/") + "/*"
        return CompiledRoute(index, route, endpoint, methods, prefix=match.path_prefix)
    return CompiledRoute(index, route, route.name or "/*", methods)


class Router:
    """Finds the route for a request; the default route catches the rest."""

    def __init__(self, routes: list[CompiledRoute], default: CompiledRoute) -> None:
        self.routes = routes
        self.default = default

    def match(self, method: str, path: str) -> CompiledRoute:
        for route in self.routes:
            if route.matches(method, path):
                return route
        return self.default
