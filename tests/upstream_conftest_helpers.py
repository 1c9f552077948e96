"""Shared helpers for the ``tests/test_upstream_*.py`` files (the restaurant API).

Real processes and real databases: the CLI runs as ``python -m upstream_app`` in a
subprocess, SQLite lives in a temporary directory, and PostgreSQL tests get a
uniquely named database (created here, dropped afterwards) on the server named by
``UPSTREAM_TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, make_url, text

POSTGRES_SERVER_URL = os.environ.get(
    "UPSTREAM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
CLI_TIMEOUT_S = 60


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(
    *args: str, env: dict[str, str], cwd: Path, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m upstream_app ARGS`` and return the finished process."""
    result = subprocess.run(
        [sys.executable, "-m", "upstream_app", *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"`{' '.join(args)}` exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def start_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    """Start ``python -m upstream_app ARGS`` without waiting for it."""
    return subprocess.Popen(
        [sys.executable, "-m", "upstream_app", *args],
        env={**os.environ, **env},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def sqlalchemy_url(url: str) -> str:
    """The test URL with the psycopg 3 driver spelled out for direct engine use."""
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def schema_snapshot(url: str) -> dict[str, Any]:
    """Tables, columns, keys and indexes as comparable plain data."""
    engine = create_engine(sqlalchemy_url(url))
    try:
        with engine.connect() as conn:
            inspector = inspect(conn)
            snapshot: dict[str, Any] = {}
            for table in sorted(inspector.get_table_names()):
                snapshot[table] = {
                    "columns": [
                        (col["name"], str(col["type"]), col["nullable"], str(col.get("default")))
                        for col in inspector.get_columns(table)
                    ],
                    "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
                    "foreign_keys": sorted(
                        (
                            tuple(fk["constrained_columns"]),
                            fk["referred_table"],
                            tuple(fk["referred_columns"]),
                            str(fk.get("options", {}).get("ondelete")),
                        )
                        for fk in inspector.get_foreign_keys(table)
                    ),
                    "indexes": sorted(
                        (ix["name"], tuple(ix["column_names"]), bool(ix["unique"]))
                        for ix in inspector.get_indexes(table)
                    ),
                }
            return snapshot
    finally:
        engine.dispose()


def query_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    """All rows of ``sql`` as plain tuples."""
    engine = create_engine(sqlalchemy_url(url))
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql))]
    finally:
        engine.dispose()


def _server_connection(url: str) -> Any:
    import psycopg

    return psycopg.connect(url, autocommit=True, connect_timeout=3)


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh, uniquely named PostgreSQL database (dropped afterwards); skip if no server."""
    try:
        admin = _server_connection(POSTGRES_SERVER_URL)
    except Exception as exc:
        pytest.skip(f"PostgreSQL server not reachable at {POSTGRES_SERVER_URL}: {exc}")
    name = f"upstream_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield (
                make_url(POSTGRES_SERVER_URL)
                .set(database=name)
                .render_as_string(hide_password=False)
            )
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def reset_postgres(url: str) -> None:
    """Drop everything in the database's public schema."""
    with _server_connection(url) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


def database_url_for(backend: str, request: pytest.FixtureRequest, directory: Path) -> str:
    """An empty database of ``backend``: a SQLite file in ``directory`` or a clean PG one."""
    if backend == "sqlite":
        return f"sqlite:///{directory / 'restaurant.db'}"
    url: str = request.getfixturevalue("postgres_database")
    reset_postgres(url)
    return url
