"""The restaurant JSON API: a plain Starlette (pure ASGI) application.

It knows nothing about reliability features: every request it receives is executed.
Blocking database work runs in Starlette's threadpool; ``/healthz`` never touches it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from upstream_app import store
from upstream_app.db import create_db_engine
from upstream_app.migrate import load_migrations, pending_migrations
from upstream_app.validation import (
    ApiError,
    check_id,
    parse_json_object,
    parse_order,
    parse_page,
    parse_restaurant,
    query_id,
    query_text,
)

logger = logging.getLogger("upstream_app")

_HEALTHY = b'{"status":"ok"}'
_HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


async def _db(request: Request, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await run_in_threadpool(func, _engine(request), *args, **kwargs)


def _path_id(request: Request, kind: str) -> int:
    return check_id(request.path_params["id"], kind)


async def _json_body(request: Request) -> dict[str, Any]:
    return parse_json_object(await request.body())


async def healthz(_request: Request) -> Response:
    """Liveness: constant answer, no database access."""
    return Response(_HEALTHY, media_type="application/json")


async def list_restaurants(request: Request) -> Response:
    """``GET /api/restaurants?city=&cuisine=&limit=&offset=``."""
    query = request.query_params
    limit, offset = parse_page(query)
    page = await _db(
        request,
        store.list_restaurants,
        city=query_text(query, "city"),
        cuisine=query_text(query, "cuisine"),
        limit=limit,
        offset=offset,
    )
    return JSONResponse(page)


async def create_restaurant(request: Request) -> Response:
    """``POST /api/restaurants``: 201 with the new restaurant."""
    values = parse_restaurant(await _json_body(request), partial=False)
    return JSONResponse(await _db(request, store.create_restaurant, values), status_code=201)


async def get_restaurant(request: Request) -> Response:
    """``GET /api/restaurants/{id}``."""
    restaurant_id = _path_id(request, "restaurant")
    return JSONResponse(await _db(request, store.get_restaurant, restaurant_id))


async def replace_restaurant(request: Request) -> Response:
    """``PUT /api/restaurants/{id}``: full replacement (is_featured defaults to false)."""
    restaurant_id = _path_id(request, "restaurant")
    body = await _json_body(request)
    values = parse_restaurant(body, partial=False, path_id=restaurant_id)
    return JSONResponse(await _db(request, store.update_restaurant, restaurant_id, values))


async def patch_restaurant(request: Request) -> Response:
    """``PATCH /api/restaurants/{id}``: update the given fields only."""
    restaurant_id = _path_id(request, "restaurant")
    body = await _json_body(request)
    values = parse_restaurant(body, partial=True, path_id=restaurant_id)
    return JSONResponse(await _db(request, store.update_restaurant, restaurant_id, values))


async def delete_restaurant(request: Request) -> Response:
    """``DELETE /api/restaurants/{id}``: 204 (409 while it has orders)."""
    await _db(request, store.delete_restaurant, _path_id(request, "restaurant"))
    return Response(status_code=204)


async def get_menu(request: Request) -> Response:
    """``GET /api/restaurants/{id}/menu``."""
    return JSONResponse(await _db(request, store.get_menu, _path_id(request, "restaurant")))


async def list_orders(request: Request) -> Response:
    """``GET /api/orders?restaurant_id=&city=&limit=&offset=``."""
    query = request.query_params
    limit, offset = parse_page(query)
    page = await _db(
        request,
        store.list_orders,
        restaurant_id=query_id(query, "restaurant_id"),
        city=query_text(query, "city"),
        limit=limit,
        offset=offset,
    )
    return JSONResponse(page)


async def create_order(request: Request) -> Response:
    """``POST /api/orders``: 201 with the new order including its id."""
    values = parse_order(await _json_body(request))
    return JSONResponse(await _db(request, store.create_order, values), status_code=201)


async def get_order(request: Request) -> Response:
    """``GET /api/orders/{id}``."""
    return JSONResponse(await _db(request, store.get_order, _path_id(request, "order")))


async def _api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.to_json(), status_code=exc.status)


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_ERROR_CODES.get(exc.status_code, "http_error")
    return JSONResponse(
        {"error": code, "message": exc.detail}, status_code=exc.status_code, headers=exc.headers
    )


async def _server_error(_request: Request, _exc: Exception) -> Response:
    return JSONResponse({"error": "internal_error", "message": "internal server error"}, 500)


ROUTES = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/api/restaurants", list_restaurants, methods=["GET"]),
    Route("/api/restaurants", create_restaurant, methods=["POST"]),
    Route("/api/restaurants/{id:int}", get_restaurant, methods=["GET"]),
    Route("/api/restaurants/{id:int}", replace_restaurant, methods=["PUT"]),
    Route("/api/restaurants/{id:int}", patch_restaurant, methods=["PATCH"]),
    Route("/api/restaurants/{id:int}", delete_restaurant, methods=["DELETE"]),
    Route("/api/restaurants/{id:int}/menu", get_menu, methods=["GET"]),
    Route("/api/orders", list_orders, methods=["GET"]),
    Route("/api/orders", create_order, methods=["POST"]),
    Route("/api/orders/{id:int}", get_order, methods=["GET"]),
]


def _warn_if_not_migrated(engine: Engine) -> None:
    try:
        with engine.connect() as conn:
            pending = pending_migrations(conn, load_migrations())
    except Exception as exc:  # startup must not depend on it: requests will tell
        logger.warning("could not check migrations: %s", exc)
        return
    if pending:
        logger.warning(
            "%d pending migration(s); run `restaurant-api migrate` (and `seed`) first",
            len(pending),
        )


def create_app(database_url: str | None = None) -> Starlette:
    """Build the app; the engine (``DATABASE_URL`` by default) lives for its lifespan."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = create_db_engine(database_url)
        app.state.engine = engine
        try:
            await run_in_threadpool(_warn_if_not_migrated, engine)
            yield
        finally:
            engine.dispose()

    return Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            Exception: _server_error,
        },
    )
