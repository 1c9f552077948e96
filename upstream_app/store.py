"""Blocking database operations behind the HTTP handlers (run them in a threadpool).

Each function is one transaction and returns JSON-ready data or raises ``ApiError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Engine, RowMapping, Table, exists, func, select
from sqlalchemy.exc import IntegrityError

from upstream_app.db import menu_items, orders, restaurants, write_transaction
from upstream_app.validation import ApiError, invalid, not_found


def restaurant_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """A restaurant row as JSON."""
    return {
        "id": row["id"],
        "name": row["name"],
        "city": row["city"],
        "cuisine": row["cuisine"],
        "is_featured": bool(row["is_featured"]),
    }


def menu_item_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """A menu item row as JSON (price in currency units)."""
    return {
        "id": row["id"],
        "restaurant_id": row["restaurant_id"],
        "name": row["name"],
        "description": row["description"],
        "price": row["price_cents"] / 100,
    }


def order_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """An order row as JSON (amount in currency units, UTC timestamp)."""
    created: datetime = row["created_at"]
    if created.tzinfo is None:  # SQLite stores naive UTC
        created = created.replace(tzinfo=UTC)
    return {
        "id": row["id"],
        "restaurant_id": row["restaurant_id"],
        "items": row["items"],
        "amount": row["amount_cents"] / 100,
        "created_at": created.astimezone(UTC).isoformat(),
    }


def _page(
    engine: Engine,
    table: Table,
    conditions: list[ColumnElement[bool]],
    limit: int,
    offset: int,
) -> tuple[list[RowMapping], int]:
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(table).where(*conditions)).scalar()
        rows = (
            conn.execute(
                select(table).where(*conditions).order_by(table.c.id).limit(limit).offset(offset)
            )
            .mappings()
            .all()
        )
    return list(rows), int(total or 0)


def list_restaurants(
    engine: Engine, *, city: str | None, cuisine: str | None, limit: int, offset: int
) -> dict[str, Any]:
    """A page of restaurants, optionally filtered by city/cuisine (case-insensitive)."""
    conditions = []
    if city is not None:
        conditions.append(func.lower(restaurants.c.city) == city.lower())
    if cuisine is not None:
        conditions.append(func.lower(restaurants.c.cuisine) == cuisine.lower())
    rows, total = _page(engine, restaurants, conditions, limit, offset)
    return {
        "restaurants": [restaurant_json(row) for row in rows],
        "total": total,
        "limit": limit,
        "offset": offset,
    }


def get_restaurant(engine: Engine, restaurant_id: int) -> dict[str, Any]:
    """One restaurant, or 404."""
    with engine.connect() as conn:
        row = (
            conn.execute(select(restaurants).where(restaurants.c.id == restaurant_id))
            .mappings()
            .first()
        )
    if row is None:
        raise not_found("restaurant", restaurant_id)
    return restaurant_json(row)


def create_restaurant(engine: Engine, values: dict[str, Any]) -> dict[str, Any]:
    """Insert a restaurant and return it with its id."""
    with write_transaction(engine) as conn:
        new_id = conn.execute(restaurants.insert().values(values)).inserted_primary_key[0]
    return {"id": new_id, **values}


def update_restaurant(engine: Engine, restaurant_id: int, values: dict[str, Any]) -> dict[str, Any]:
    """Update some or all fields of a restaurant, or 404."""
    with write_transaction(engine) as conn:
        result = conn.execute(
            restaurants.update().where(restaurants.c.id == restaurant_id).values(values)
        )
        if result.rowcount == 0:
            raise not_found("restaurant", restaurant_id)
        row = (
            conn.execute(select(restaurants).where(restaurants.c.id == restaurant_id))
            .mappings()
            .one()
        )
    return restaurant_json(row)


def delete_restaurant(engine: Engine, restaurant_id: int) -> None:
    """Delete a restaurant and its menu; 404 if unknown, 409 if it has orders."""
    conflict = ApiError(
        409, "conflict", f"restaurant {restaurant_id} has orders and cannot be deleted"
    )
    try:
        with write_transaction(engine) as conn:
            if conn.execute(
                select(exists().where(orders.c.restaurant_id == restaurant_id))
            ).scalar():
                raise conflict
            conn.execute(menu_items.delete().where(menu_items.c.restaurant_id == restaurant_id))
            result = conn.execute(restaurants.delete().where(restaurants.c.id == restaurant_id))
            if result.rowcount == 0:
                raise not_found("restaurant", restaurant_id)
    except IntegrityError as exc:  # an order was created concurrently
        raise conflict from exc


def get_menu(engine: Engine, restaurant_id: int) -> dict[str, Any]:
    """The menu items of a restaurant, or 404."""
    with engine.connect() as conn:
        found = conn.execute(
            select(restaurants.c.id).where(restaurants.c.id == restaurant_id)
        ).first()
        if found is None:
            raise not_found("restaurant", restaurant_id)
        rows = (
            conn.execute(
                select(menu_items)
                .where(menu_items.c.restaurant_id == restaurant_id)
                .order_by(menu_items.c.id)
            )
            .mappings()
            .all()
        )
    return {"restaurant_id": restaurant_id, "menu_items": [menu_item_json(row) for row in rows]}


def list_orders(
    engine: Engine, *, restaurant_id: int | None, city: str | None, limit: int, offset: int
) -> dict[str, Any]:
    """A page of orders, optionally for one restaurant or one city."""
    conditions: list[ColumnElement[bool]] = []
    if restaurant_id is not None:
        conditions.append(orders.c.restaurant_id == restaurant_id)
    if city is not None:
        in_city = select(restaurants.c.id).where(func.lower(restaurants.c.city) == city.lower())
        conditions.append(orders.c.restaurant_id.in_(in_city))
    rows, total = _page(engine, orders, conditions, limit, offset)
    return {
        "orders": [order_json(row) for row in rows],
        "total": total,
        "limit": limit,
        "offset": offset,
    }


def create_order(engine: Engine, values: dict[str, Any]) -> dict[str, Any]:
    """Insert an order for an existing restaurant (422 otherwise) and return it."""
    missing = invalid("restaurant_id", f"restaurant {values['restaurant_id']} does not exist")
    row = {**values, "created_at": datetime.now(UTC)}
    try:
        with write_transaction(engine) as conn:
            known = conn.execute(
                select(restaurants.c.id).where(restaurants.c.id == values["restaurant_id"])
            ).first()
            if known is None:
                raise missing
            row["id"] = conn.execute(orders.insert().values(row)).inserted_primary_key[0]
    except IntegrityError as exc:  # the restaurant was deleted concurrently
        raise missing from exc
    return order_json(row)


def get_order(engine: Engine, order_id: int) -> dict[str, Any]:
    """One order, or 404."""
    with engine.connect() as conn:
        row = conn.execute(select(orders).where(orders.c.id == order_id)).mappings().first()
    if row is None:
        raise not_found("order", order_id)
    return order_json(row)
