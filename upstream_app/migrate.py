"""A small batch-oriented migration runner on SQLAlchemy Core.

Migration files live in ``upstream_app/migrations/`` (override with the env var
``RESTAURANT_MIGRATIONS_DIR`` or the ``directory`` argument).  Each file is named
``<version>_<slug>.py`` and is a Python module exposing::

    meta = {"version": "0003", "description": "...", "author": "...", "rollbackSafe": True}
    def up(conn: sqlalchemy.Connection) -> None: ...
    def down(conn: sqlalchemy.Connection) -> None: ...

Semantics (the seed guide's):

* ``migrate`` applies every pending migration, in version order, as one **batch**
  (batch number = last batch + 1), recorded in ``schema_migrations`` (version,
  description, author, batch, applied_at).
* ``rollback`` undoes the last batch in reverse version order.  If any migration
  in it has ``rollbackSafe: False`` the rollback is refused unless forced.
* ``status`` lists applied migrations (with batch and time) and pending ones.
* A batch runs in ONE transaction (DDL is transactional on PostgreSQL and SQLite),
  so when migration N fails the schema and bookkeeping are exactly as they were
  before the batch started.
* Concurrency: the batch transaction first takes a lock - ``pg_advisory_xact_lock``
  on PostgreSQL, ``BEGIN IMMEDIATE`` (the database write lock) on SQLite - and only
  then reads what is applied, so a second process that waited for the lock finds
  nothing pending and applies nothing.

Why not Alembic or yoyo-migrations?  Both were considered; neither expresses the
required semantics, so wrapping them would still need every piece written here:

* Alembic keeps only the current head revision(s) in ``alembic_version``: there is
  no per-migration history, so no applied time and no *batch* to show in ``status``
  or to undo in ``rollback`` (``downgrade`` takes a target revision or ``-N`` steps,
  not "whatever the last ``upgrade`` applied").  Revision metadata is limited to the
  revision id/``down_revision`` graph and a message: there is no place for author or
  ``rollbackSafe`` that ``downgrade`` would honour, and it has no notion of seeds.
* yoyo-migrations records an applied time per migration in ``_yoyo_log`` and has a
  lock table, but it applies and commits each migration in its own transaction, so a
  failure in the 3rd migration of a run leaves the first two applied - the opposite
  of batch atomicity.  It too has no batch number, no ``rollbackSafe``/author meta
  and no seeds, and its steps receive a raw DB-API connection, not SQLAlchemy.

Either way a batch table, batch-aware rollback, meta validation, the safe-seed
tracker and the lock protocol would have to be written on top, and the library
would then only be calling ``up()``; this module is that layer, without the rest.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    func,
    inspect,
    select,
    text,
)

from upstream_app.db import write_transaction

MIGRATIONS_DIR_ENV = "RESTAURANT_MIGRATIONS_DIR"
PACKAGE_MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# Key of the PostgreSQL advisory lock guarding migrations and seeds ("RESTAURA").
ADVISORY_LOCK_KEY = 0x5245535441555241

_FILE_PATTERN = re.compile(r"^(?P<version>\d+)_\w+\.py$")
_REQUIRED_META = {"version": str, "description": str, "author": str, "rollbackSafe": bool}

bookkeeping = MetaData()

schema_migrations = Table(
    "schema_migrations",
    bookkeeping,
    Column("version", String(64), primary_key=True),
    Column("description", String(500), nullable=False),
    Column("author", String(200), nullable=False),
    Column("batch", Integer, nullable=False, index=True),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)

schema_seeds = Table(
    "schema_seeds",
    bookkeeping,
    Column("name", String(200), primary_key=True),
    Column("description", String(500), nullable=False),
    Column("safe", Boolean, nullable=False),
    Column("run_count", Integer, nullable=False),
    Column("last_run_at", DateTime(timezone=True), nullable=False),
)


class MigrationError(RuntimeError):
    """A migration could not be loaded, applied or rolled back."""


@dataclass(frozen=True)
class Migration:
    """One migration file, loaded and validated."""

    version: str
    description: str
    author: str
    rollback_safe: bool
    path: Path
    up: Callable[[Connection], None]
    down: Callable[[Connection], None]


@dataclass(frozen=True)
class AppliedMigration:
    """A row of ``schema_migrations``."""

    version: str
    description: str
    author: str
    batch: int
    applied_at: datetime


@dataclass(frozen=True)
class BatchResult:
    """What ``migrate`` or ``rollback`` did: the batch number and the migrations."""

    batch: int | None
    migrations: list[Migration]


@dataclass(frozen=True)
class StatusRow:
    """One line of ``migrate status``; ``state`` is applied, pending or missing-file."""

    version: str
    description: str
    author: str
    rollback_safe: bool | None
    state: str
    batch: int | None
    applied_at: datetime | None


def version_key(version: str) -> int:
    """Sort key of a version string (versions are decimal numbers)."""
    return int(version)


def migrations_dir(directory: Path | str | None = None) -> Path:
    """The migrations directory: argument, then env var, then the packaged one."""
    if directory is not None:
        return Path(directory)
    env = os.environ.get(MIGRATIONS_DIR_ENV)
    return Path(env) if env else PACKAGE_MIGRATIONS_DIR


def load_module(path: Path, namespace: str) -> ModuleType:
    """Import the Python file at ``path`` as a standalone module."""
    spec = importlib.util.spec_from_file_location(f"{namespace}.{path.stem}", path)
    if spec is None or spec.loader is None:
        raise MigrationError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def numbered_files(directory: Path) -> list[tuple[str, Path]]:
    """``(version, path)`` for every ``<digits>_<name>.py`` in ``directory``, in order."""
    if not directory.is_dir():
        raise MigrationError(f"directory not found: {directory}")
    found = []
    for path in directory.iterdir():
        match = _FILE_PATTERN.match(path.name)
        if match:
            found.append((match["version"], path))
    found.sort(key=lambda item: (version_key(item[0]), item[1].name))
    return found


def load_migrations(directory: Path | str | None = None) -> list[Migration]:
    """Load and validate all migration files, sorted by version."""
    loaded: list[Migration] = []
    seen: dict[str, Path] = {}
    for file_version, path in numbered_files(migrations_dir(directory)):
        migration = _load_migration(path, file_version)
        if migration.version in seen:
            raise MigrationError(
                f"duplicate migration version {migration.version}: {seen[migration.version].name}"
                f" and {path.name}"
            )
        seen[migration.version] = path
        loaded.append(migration)
    return loaded


def _load_migration(path: Path, file_version: str) -> Migration:
    try:
        module = load_module(path, "upstream_app_migrations")
    except MigrationError:
        raise
    except Exception as exc:
        raise MigrationError(f"{path.name}: failed to import: {exc}") from exc
    meta = getattr(module, "meta", None)
    if not isinstance(meta, dict):
        raise MigrationError(f"{path.name}: missing `meta` dict")
    for key, kind in _REQUIRED_META.items():
        if not isinstance(meta.get(key), kind):
            raise MigrationError(f"{path.name}: meta[{key!r}] must be a {kind.__name__}")
    if meta["version"] != file_version:
        raise MigrationError(
            f"{path.name}: meta version {meta['version']!r} does not match the file name"
        )
    up, down = getattr(module, "up", None), getattr(module, "down", None)
    if not callable(up) or not callable(down):
        raise MigrationError(f"{path.name}: must define up(conn) and down(conn)")
    return Migration(
        version=meta["version"],
        description=meta["description"],
        author=meta["author"],
        rollback_safe=meta["rollbackSafe"],
        path=path,
        up=up,
        down=down,
    )


@contextmanager
def locked_transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction holding the migration lock, with bookkeeping tables present.

    PostgreSQL: a transaction-scoped advisory lock.  SQLite: ``BEGIN IMMEDIATE``,
    which holds the database write lock until commit (waiting up to the busy timeout).
    """
    with write_transaction(engine) as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
        bookkeeping.create_all(conn, checkfirst=True)
        yield conn


def applied_migrations(conn: Connection) -> list[AppliedMigration]:
    """Rows of ``schema_migrations`` in version order (empty if the table is absent)."""
    if not inspect(conn).has_table(schema_migrations.name):
        return []
    rows = conn.execute(select(schema_migrations)).mappings().all()
    applied = [AppliedMigration(**row) for row in rows]
    return sorted(applied, key=lambda item: version_key(item.version))


def pending_migrations(conn: Connection, migrations: list[Migration]) -> list[Migration]:
    """The migrations not yet recorded as applied, in version order."""
    applied = {item.version for item in applied_migrations(conn)}
    return [migration for migration in migrations if migration.version not in applied]


def migrate(engine: Engine, directory: Path | str | None = None) -> BatchResult:
    """Apply all pending migrations as one batch in one transaction."""
    migrations = load_migrations(directory)
    with locked_transaction(engine) as conn:
        pending = pending_migrations(conn, migrations)
        if not pending:
            return BatchResult(batch=None, migrations=[])
        last = conn.execute(select(func.max(schema_migrations.c.batch))).scalar_one_or_none()
        batch = (last or 0) + 1
        for migration in pending:
            _run_step(conn, migration, "up")
            conn.execute(
                schema_migrations.insert().values(
                    version=migration.version,
                    description=migration.description,
                    author=migration.author,
                    batch=batch,
                    applied_at=datetime.now(UTC),
                )
            )
    return BatchResult(batch=batch, migrations=pending)


def rollback(
    engine: Engine, directory: Path | str | None = None, *, force: bool = False
) -> BatchResult:
    """Undo the last batch in reverse version order, in one transaction.

    Refuses (``MigrationError``) when the batch holds a ``rollbackSafe: False``
    migration, unless ``force`` is set.
    """
    by_version = {migration.version: migration for migration in load_migrations(directory)}
    with locked_transaction(engine) as conn:
        applied = applied_migrations(conn)
        if not applied:
            return BatchResult(batch=None, migrations=[])
        batch = max(item.batch for item in applied)
        versions = [item.version for item in applied if item.batch == batch]
        missing = [version for version in versions if version not in by_version]
        if missing:
            raise MigrationError(
                f"cannot roll back batch {batch}: no migration file for version(s) "
                + ", ".join(missing)
            )
        to_undo = [by_version[version] for version in reversed(versions)]
        unsafe = [migration for migration in to_undo if not migration.rollback_safe]
        if unsafe and not force:
            names = ", ".join(f"{m.version} ({m.description})" for m in unsafe)
            raise MigrationError(
                f"refusing to roll back batch {batch}: {names} is marked rollbackSafe: false"
                " (its down() loses data); re-run with --force to roll back anyway"
            )
        for migration in to_undo:
            _run_step(conn, migration, "down")
            conn.execute(
                schema_migrations.delete().where(schema_migrations.c.version == migration.version)
            )
    return BatchResult(batch=batch, migrations=to_undo)


def _run_step(conn: Connection, migration: Migration, direction: str) -> None:
    step = migration.up if direction == "up" else migration.down
    try:
        step(conn)
    except Exception as exc:
        raise MigrationError(
            f"migration {migration.version} ({migration.description}) failed in {direction}():"
            f" {type(exc).__name__}: {exc}. The whole batch was rolled back; schema and"
            " schema_migrations are unchanged."
        ) from exc


def status(engine: Engine, directory: Path | str | None = None) -> list[StatusRow]:
    """Applied migrations (with batch and time), missing files, then pending ones."""
    migrations = load_migrations(directory)
    with engine.connect() as conn:
        applied = applied_migrations(conn)
    by_version = {migration.version: migration for migration in migrations}
    rows: list[StatusRow] = []
    for item in applied:
        migration = by_version.get(item.version)
        rows.append(
            StatusRow(
                version=item.version,
                description=item.description,
                author=item.author,
                rollback_safe=migration.rollback_safe if migration else None,
                state="applied" if migration else "missing-file",
                batch=item.batch,
                applied_at=item.applied_at,
            )
        )
    applied_versions = {item.version for item in applied}
    for migration in migrations:
        if migration.version not in applied_versions:
            rows.append(
                StatusRow(
                    version=migration.version,
                    description=migration.description,
                    author=migration.author,
                    rollback_safe=migration.rollback_safe,
                    state="pending",
                    batch=None,
                    applied_at=None,
                )
            )
    return rows


def format_status(rows: list[StatusRow]) -> str:
    """Render status rows as a plain-text table."""
    header = ("VERSION", "STATE", "BATCH", "APPLIED AT (UTC)", "ROLLBACK", "AUTHOR", "DESCRIPTION")
    table = [header]
    for row in rows:
        table.append(
            (
                row.version,
                row.state,
                "-" if row.batch is None else str(row.batch),
                _format_time(row.applied_at),
                {True: "safe", False: "UNSAFE", None: "?"}[row.rollback_safe],
                row.author,
                row.description,
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=True))
        + "  "
        + line[-1]
        for line in table
    ]
    applied = sum(row.state == "applied" for row in rows)
    pending = sum(row.state == "pending" for row in rows)
    lines.append(f"\n{applied} applied, {pending} pending")
    return "\n".join(lines)


def _format_time(value: datetime | None) -> str:
    if value is None:
        return "-"
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S")
