"""Command line: ``restaurant-api serve | migrate [rollback [--force] | status] | seed``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from upstream_app import migrate as migrations
from upstream_app.db import create_db_engine, resolve_database_url
from upstream_app.seed import run_seeds


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``restaurant-api``."""
    parser = argparse.ArgumentParser(
        prog="restaurant-api",
        description="Plain restaurant JSON API. Database: env DATABASE_URL "
        "(postgresql://... or sqlite:///path), default SQLite at var/restaurant.db.",
    )
    parser.add_argument("--database-url", help="overrides env DATABASE_URL")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP API under uvicorn")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=3000)
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument("--log-level", default="info")

    migrate = commands.add_parser(
        "migrate", help="apply pending migrations as one batch (see subcommands)"
    )
    steps = migrate.add_subparsers(dest="migrate_command", metavar="SUBCOMMAND")
    rollback = steps.add_parser("rollback", help="undo the last batch")
    rollback.add_argument(
        "--force", action="store_true", help="also roll back rollbackSafe: false migrations"
    )
    steps.add_parser("status", help="list applied and pending migrations")

    seed = commands.add_parser("seed", help="run the seeds (safe ones every time)")
    seed.add_argument("names", nargs="*", metavar="NAME", help="only these seeds")
    seed.add_argument("--force", action="store_true", help="re-run unsafe seeds that already ran")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        url = resolve_database_url(args.database_url)
        if args.command == "serve":
            return _serve(args, url.render_as_string(hide_password=False))
        engine = create_db_engine(url)
        try:
            if args.command == "migrate":
                return _migrate(engine, args.migrate_command, force=getattr(args, "force", False))
            return _seed(engine, args.names, force=args.force)
        finally:
            engine.dispose()
    except (migrations.MigrationError, SQLAlchemyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _serve(args: argparse.Namespace, url: str) -> int:
    import uvicorn

    from upstream_app.app import create_app

    uvicorn.run(
        create_app(url),
        host=args.host,
        port=args.port,
        loop="uvloop" if sys.platform != "win32" else "auto",
        http="httptools",
        access_log=args.access_log,
        log_level=args.log_level,
    )
    return 0


def _migrate(engine: Engine, command: str | None, *, force: bool) -> int:
    where = engine.url.render_as_string(hide_password=True)
    if command == "status":
        print(f"Database: {where}")
        print(migrations.format_status(migrations.status(engine)))
        return 0
    if command == "rollback":
        result = migrations.rollback(engine, force=force)
        if result.batch is None:
            print("Nothing to roll back: no migration is applied.")
        for migration in result.migrations:
            print(f"Rolled back batch {result.batch}: {migration.version} {migration.description}")
        return 0
    result = migrations.migrate(engine)
    if result.batch is None:
        print(f"Nothing to migrate: {where} is up to date.")
    for migration in result.migrations:
        print(f"Applied batch {result.batch}: {migration.version} {migration.description}")
    return 0


def _seed(engine: Engine, names: Sequence[str], *, force: bool) -> int:
    report = run_seeds(engine, names=names, force=force)
    for name in report.ran:
        print(f"Seeded: {name}")
    for name, reason in report.skipped:
        print(f"Skipped: {name} ({reason})")
    return 0
