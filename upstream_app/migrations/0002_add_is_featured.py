"""Add ``restaurants.is_featured`` (the seed guide's example migration)."""

from __future__ import annotations

from sqlalchemy import Connection

meta = {
    "version": "0002",
    "description": "add is_featured to restaurants",
    "author": "upstream-app team",
    # Dropping the column only forgets which restaurants were featured.
    "rollbackSafe": True,
}


def up(conn: Connection) -> None:
    """Add the column; existing rows become not featured."""
    default = "0" if conn.dialect.name == "sqlite" else "false"
    conn.exec_driver_sql(
        f"ALTER TABLE restaurants ADD COLUMN is_featured BOOLEAN NOT NULL DEFAULT {default}"
    )


def down(conn: Connection) -> None:
    """Drop the column again."""
    conn.exec_driver_sql("ALTER TABLE restaurants DROP COLUMN is_featured")
