"""Route matching: first match wins; templates and prefixes; bounded endpoint labels."""

from __future__ import annotations

from proxy.config import parse_config
from proxy.config.schema import Route
from proxy.routing import UNMATCHED, CompiledRoute, Router, compile_route


def router_for(yaml_routes: str) -> Router:
    config = parse_config(yaml_routes, "f.yaml", {})
    routes = [compile_route(i, r) for i, r in enumerate(config.routes)]
    return Router(routes, CompiledRoute(-1, Route(), UNMATCHED, None))


ROUTES = """
routes:
  - match: {path_prefix: /api/orders, methods: [POST]}
  - match: {path: "/api/orders/{id}", methods: [GET]}
  - match: {path: "/api/restaurants/{id}/menu"}
  - match: {path: /api/restaurants}
  - match: {path_prefix: /api/}
"""


def test_first_matching_route_wins_and_labels_are_templates() -> None:
    router = router_for(ROUTES)
    assert router.match("POST", "/api/orders").endpoint == "/api/orders/*"
    assert router.match("GET", "/api/orders/42").endpoint == "/api/orders/{id}"
    assert router.match("GET", "/api/restaurants/7/menu").endpoint == "/api/restaurants/{id}/menu"
    assert router.match("GET", "/api/restaurants").endpoint == "/api/restaurants"
    assert router.match("GET", "/api/restaurants/").endpoint == "/api/restaurants"
    assert router.match("DELETE", "/api/orders/42").endpoint == "/api/*"


def test_templates_match_exactly_one_segment() -> None:
    router = router_for(ROUTES)
    assert router.match("GET", "/api/orders/1/2").endpoint == "/api/*"


def test_unmatched_requests_share_one_label() -> None:
    router = router_for(ROUTES)
    assert router.match("GET", "/random/abc").endpoint == UNMATCHED
    assert router.match("GET", "/other").endpoint == UNMATCHED
