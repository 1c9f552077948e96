"""Create the restaurants, menu_items and orders tables."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Column,
    Connection,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
)

meta = {
    "version": "0001",
    "description": "create restaurants, menu_items and orders",
    "author": "upstream-app team",
    # down() drops every table, and every restaurant and order with it.
    "rollbackSafe": False,
}

# Frozen copy of the schema as of this migration (never import the app's tables here).
schema = MetaData()

Table(
    "restaurants",
    schema,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("city", String(100), nullable=False),
    Column("cuisine", String(100), nullable=False),
    Index("ix_restaurants_city", "city"),
)

Table(
    "menu_items",
    schema,
    Column("id", Integer, primary_key=True),
    Column(
        "restaurant_id",
        Integer,
        ForeignKey("restaurants.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("name", String(200), nullable=False),
    Column("description", String(500), nullable=False, server_default=""),
    Column("price_cents", Integer, nullable=False),
    Index("ix_menu_items_restaurant_id", "restaurant_id"),
)

Table(
    "orders",
    schema,
    Column("id", Integer, primary_key=True),
    Column("restaurant_id", Integer, ForeignKey("restaurants.id"), nullable=False),
    Column("items", JSON, nullable=False),
    Column("amount_cents", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_orders_restaurant_id", "restaurant_id"),
)


def up(conn: Connection) -> None:
    """Create the three tables with their indexes."""
    schema.create_all(conn, checkfirst=False)


def down(conn: Connection) -> None:
    """Drop the three tables (dependants first)."""
    schema.drop_all(conn, checkfirst=False)
