"""Database URL resolution, engine creation and the query-side table definitions.

SQLite is the default (``var/restaurant.db`` relative to the working directory);
``DATABASE_URL`` selects another SQLite file (``sqlite:///path``) or PostgreSQL
(``postgresql://...``, driven by psycopg 3).

The schema itself is owned by the migrations in ``upstream_app/migrations``; the
tables below only describe the *current* shape so the app can build queries.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
)
from sqlalchemy.engine import URL, make_url

DEFAULT_SQLITE_PATH = Path("var") / "restaurant.db"
SQLITE_BUSY_TIMEOUT_S = 30.0

# Execution option naming the BEGIN flavour used on SQLite ("IMMEDIATE" takes the
# database write lock up front, so a writer never fails to upgrade a read lock).
SQLITE_BEGIN_OPTION = "sqlite_begin"

metadata = MetaData()

restaurants = Table(
    "restaurants",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("city", String(100), nullable=False),
    Column("cuisine", String(100), nullable=False),
    Column("is_featured", Boolean, nullable=False),
)

menu_items = Table(
    "menu_items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("restaurant_id", Integer, ForeignKey("restaurants.id"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("description", String(500), nullable=False),
    Column("price_cents", Integer, nullable=False),
)

orders = Table(
    "orders",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("restaurant_id", Integer, ForeignKey("restaurants.id"), nullable=False),
    Column("items", JSON, nullable=False),
    Column("amount_cents", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


def resolve_database_url(raw: str | None = None) -> URL:
    """Return the SQLAlchemy URL for ``raw`` (default: env ``DATABASE_URL`` or SQLite)."""
    if raw is None:
        raw = os.environ.get("DATABASE_URL", "").strip()
    if not raw:
        return URL.create("sqlite+pysqlite", database=str(DEFAULT_SQLITE_PATH))
    url = make_url(raw)
    backend, _, driver = url.drivername.partition("+")
    if backend in ("postgres", "postgresql"):
        if driver not in ("", "psycopg"):
            raise ValueError(f"unsupported PostgreSQL driver {driver!r}; use postgresql://")
        return url.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        return url.set(drivername="sqlite+pysqlite")
    raise ValueError(f"unsupported DATABASE_URL scheme {url.drivername!r}")


def create_db_engine(url: URL | str | None = None, **kwargs: Any) -> Engine:
    """Create an engine for ``url``; SQLite gets WAL, a busy timeout and explicit BEGINs."""
    resolved = resolve_database_url(url) if not isinstance(url, URL) else url
    if resolved.get_backend_name() == "sqlite":
        return _create_sqlite_engine(resolved, **kwargs)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 30)
    return create_engine(resolved, **kwargs)


def _create_sqlite_engine(url: URL, **kwargs: Any) -> Engine:
    database = url.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
    kwargs.setdefault("pool_size", 20)
    kwargs.setdefault("max_overflow", 20)
    engine = create_engine(url, connect_args=connect_args, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
        # Let SQLAlchemy (not the sqlite3 module) decide where transactions start,
        # so DDL is transactional too (pysqlite otherwise autocommits it).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        _switch_to_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(SQLITE_BEGIN_OPTION, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _switch_to_wal(cursor: sqlite3.Cursor) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another process holds the database.

    Changing the journal mode needs an exclusive lock and SQLite answers "database is
    locked" at once (without the busy handler) when another connection is mid-write, as when
    two processes migrate a fresh database together; so wait here, up to the busy timeout.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    delay = 0.01
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction meant to write: on SQLite it takes the write lock at BEGIN."""
    with engine.connect() as conn:
        conn.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"})
        with conn.begin():
            yield conn
