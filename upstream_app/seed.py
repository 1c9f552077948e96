"""Seed runner: files in ``upstream_app/seeds/`` (or env ``RESTAURANT_SEEDS_DIR``).

A seed file is ``<number>_<name>.py`` exposing::

    meta = {"description": "...", "safe": True}
    def run(conn: sqlalchemy.Connection) -> None: ...

``safe: True`` promises the seed is idempotent (it upserts by a natural key), so it
runs on every ``seed``.  An unsafe seed runs once: later runs skip it, and naming it
explicitly without ``force`` is an error.  Runs are recorded in ``schema_seeds``.
All selected seeds run in one transaction under the migration lock, and only on a
fully migrated schema.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Connection, Engine, select

from upstream_app.migrate import (
    MigrationError,
    load_migrations,
    load_module,
    locked_transaction,
    numbered_files,
    pending_migrations,
    schema_seeds,
)

SEEDS_DIR_ENV = "RESTAURANT_SEEDS_DIR"
PACKAGE_SEEDS_DIR = Path(__file__).parent / "seeds"


class SeedError(MigrationError):
    """A seed could not be loaded or was refused."""


@dataclass(frozen=True)
class Seed:
    """One seed file, loaded and validated."""

    name: str
    description: str
    safe: bool
    path: Path
    run: Callable[[Connection], None]


@dataclass
class SeedReport:
    """Names of the seeds that ran and of those skipped (with the reason)."""

    ran: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def seeds_dir(directory: Path | str | None = None) -> Path:
    """The seeds directory: argument, then env var, then the packaged one."""
    if directory is not None:
        return Path(directory)
    env = os.environ.get(SEEDS_DIR_ENV)
    return Path(env) if env else PACKAGE_SEEDS_DIR


def load_seeds(directory: Path | str | None = None) -> list[Seed]:
    """Load and validate every seed file, in file-number order."""
    seeds = []
    for _number, path in numbered_files(seeds_dir(directory)):
        try:
            module = load_module(path, "upstream_app_seeds")
        except Exception as exc:
            raise SeedError(f"{path.name}: failed to import: {exc}") from exc
        meta = getattr(module, "meta", None)
        if not isinstance(meta, dict) or not isinstance(meta.get("safe"), bool):
            raise SeedError(f"{path.name}: `meta` must be a dict with a boolean 'safe'")
        run = getattr(module, "run", None)
        if not callable(run):
            raise SeedError(f"{path.name}: must define run(conn)")
        seeds.append(
            Seed(
                name=path.stem,
                description=str(meta.get("description", "")),
                safe=meta["safe"],
                path=path,
                run=run,
            )
        )
    return seeds


def run_seeds(
    engine: Engine,
    directory: Path | str | None = None,
    *,
    names: Sequence[str] = (),
    force: bool = False,
    migrations_directory: Path | str | None = None,
) -> SeedReport:
    """Run all seeds (or only ``names``) in one locked transaction."""
    seeds = load_seeds(directory)
    selected = _select(seeds, names)
    migrations = load_migrations(migrations_directory)
    report = SeedReport()
    with locked_transaction(engine) as conn:
        pending = pending_migrations(conn, migrations)
        if pending:
            versions = ", ".join(migration.version for migration in pending)
            raise SeedError(
                f"{len(pending)} pending migration(s) ({versions}); run `migrate` first"
            )
        previous = {row.name: row.run_count for row in conn.execute(select(schema_seeds)).all()}
        for seed in selected:
            if not seed.safe and previous.get(seed.name) and not force:
                if names:
                    raise SeedError(
                        f"seed {seed.name} is not safe to run twice and has already run;"
                        " use --force to run it again"
                    )
                report.skipped.append((seed.name, "unsafe and already run (use --force)"))
                continue
            try:
                seed.run(conn)
            except Exception as exc:
                raise SeedError(
                    f"seed {seed.name} failed: {type(exc).__name__}: {exc}."
                    " No seed of this run was applied."
                ) from exc
            _record(conn, seed, previous.get(seed.name))
            report.ran.append(seed.name)
    return report


def _select(seeds: list[Seed], names: Sequence[str]) -> list[Seed]:
    if not names:
        return seeds
    by_name = {seed.name: seed for seed in seeds}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise SeedError(f"unknown seed(s): {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [seed for seed in seeds if seed.name in set(names)]


def _record(conn: Connection, seed: Seed, previous_count: int | None) -> None:
    now = datetime.now(UTC)
    if previous_count is None:
        conn.execute(
            schema_seeds.insert().values(
                name=seed.name,
                description=seed.description,
                safe=seed.safe,
                run_count=1,
                last_run_at=now,
            )
        )
    else:
        conn.execute(
            schema_seeds.update()
            .where(schema_seeds.c.name == seed.name)
            .values(
                description=seed.description,
                safe=seed.safe,
                run_count=previous_count + 1,
                last_run_at=now,
            )
        )
