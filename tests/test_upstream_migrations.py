"""Migrations and seeds of the restaurant API, through the real CLI, on SQLite and PostgreSQL."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

try:
    import upstream_conftest_helpers as helpers
except ImportError:  # tests/ is a package
    from tests import upstream_conftest_helpers as helpers

from upstream_app.migrate import PACKAGE_MIGRATIONS_DIR

BOOKKEEPING = {"schema_migrations", "schema_seeds"}
APP_TABLES = {"restaurants", "menu_items", "orders"}

postgres_database = helpers.postgres_database  # fixture: one PostgreSQL database per module
run_cli, start_cli = helpers.run_cli, helpers.start_cli
query_rows, schema_snapshot = helpers.query_rows, helpers.schema_snapshot

FAILING_MIGRATION = """
from sqlalchemy import Connection

meta = {"version": "0003", "description": "breaks halfway", "author": "tests",
        "rollbackSafe": True}


def up(conn: Connection) -> None:
    conn.exec_driver_sql("CREATE TABLE half_done (id INTEGER PRIMARY KEY)")
    conn.exec_driver_sql("INSERT INTO no_such_table VALUES (1)")


def down(conn: Connection) -> None:
    conn.exec_driver_sql("DROP TABLE half_done")
"""

COUNTING_MIGRATION = """
import time

from sqlalchemy import Connection

meta = {{"version": "{version}", "description": "count runs {version}", "author": "tests",
        "rollbackSafe": True}}


def up(conn: Connection) -> None:
    {create}
    conn.exec_driver_sql("INSERT INTO migration_runs (version) VALUES ('{version}')")
    time.sleep({sleep})


def down(conn: Connection) -> None:
    conn.exec_driver_sql("DELETE FROM migration_runs WHERE version = '{version}'")
"""

UNSAFE_SEED = """
from sqlalchemy import Connection

meta = {"description": "appends a restaurant every run", "safe": False}


def run(conn: Connection) -> None:
    conn.exec_driver_sql(
        "INSERT INTO restaurants (name, city, cuisine, is_featured)"
        " VALUES ('Once Only', 'Testville', 'test', false)"
    )
"""


@pytest.fixture(params=helpers.BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each backend."""
    return helpers.database_url_for(request.param, request, tmp_path)


@pytest.fixture
def cli_env(db_url: str) -> dict[str, str]:
    """Environment pointing the CLI at the test database and the packaged files."""
    return {"DATABASE_URL": db_url}


def copy_migrations(target: Path, *versions: str) -> Path:
    """Copy the packaged migrations with the given versions into ``target``."""
    target.mkdir(exist_ok=True)
    for version in versions:
        (source,) = PACKAGE_MIGRATIONS_DIR.glob(f"{version}_*.py")
        shutil.copy(source, target / source.name)
    return target


def tables(url: str) -> set[str]:
    return set(schema_snapshot(url))


def status_rows(stdout: str) -> dict[str, list[str]]:
    """``migrate status`` table rows by version: [version, state, batch, ...]."""
    rows = [line.split() for line in stdout.splitlines()]
    states = {"applied", "pending", "missing-file"}
    return {row[0]: row for row in rows if len(row) > 2 and row[1] in states}


def test_migrate_applies_pending_migrations_in_one_batch_and_status_reports_them(
    db_url: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    before = run_cli("migrate", "status", env=cli_env, cwd=tmp_path).stdout
    assert "0 applied, 2 pending" in before

    applied = run_cli("migrate", env=cli_env, cwd=tmp_path).stdout
    assert "Applied batch 1: 0001" in applied
    assert "Applied batch 1: 0002" in applied
    assert APP_TABLES | BOOKKEEPING <= tables(db_url)

    status = run_cli("migrate", "status", env=cli_env, cwd=tmp_path).stdout
    rows = status_rows(status)
    assert rows["0001"][1:3] == ["applied", "1"]
    assert rows["0002"][1:3] == ["applied", "1"]
    assert "2 applied, 0 pending" in status
    rows = query_rows(db_url, "SELECT version, batch, applied_at FROM schema_migrations")
    assert sorted(row[:2] for row in rows) == [("0001", 1), ("0002", 1)]
    assert all(row[2] is not None for row in rows)

    again = run_cli("migrate", env=cli_env, cwd=tmp_path).stdout
    assert "Nothing to migrate" in again


def test_migrate_status_rollback_migrate_round_trip_restores_the_same_schema(
    db_url: str, tmp_path: Path
) -> None:
    migrations = copy_migrations(tmp_path / "migrations", "0001")
    env = {"DATABASE_URL": db_url, "RESTAURANT_MIGRATIONS_DIR": str(migrations)}
    run_cli("migrate", env=env, cwd=tmp_path)
    after_first_batch = schema_snapshot(db_url)

    copy_migrations(migrations, "0002")
    assert "Applied batch 2: 0002" in run_cli("migrate", env=env, cwd=tmp_path).stdout
    migrated = schema_snapshot(db_url)
    status = run_cli("migrate", "status", env=env, cwd=tmp_path).stdout
    assert [row[:3] for row in status_rows(status).values()] == [
        ["0001", "applied", "1"],
        ["0002", "applied", "2"],
    ]

    # The last batch holds only the (safe) 0002: no --force needed.
    rolled = run_cli("migrate", "rollback", env=env, cwd=tmp_path).stdout
    assert "Rolled back batch 2: 0002" in rolled
    assert "0001" not in rolled
    assert schema_snapshot(db_url) == after_first_batch
    assert "is_featured" not in str(after_first_batch["restaurants"])

    run_cli("migrate", env=env, cwd=tmp_path)
    assert schema_snapshot(db_url) == migrated
    assert "is_featured" in str(migrated["restaurants"])


def test_forced_rollback_of_everything_then_migrate_restores_the_same_schema(
    db_url: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    run_cli("migrate", env=cli_env, cwd=tmp_path)
    migrated = schema_snapshot(db_url)

    output = run_cli("migrate", "rollback", "--force", env=cli_env, cwd=tmp_path).stdout
    assert output.index("0002") < output.index("0001"), "rolled back in reverse order"
    assert tables(db_url) == BOOKKEEPING
    assert query_rows(db_url, "SELECT version FROM schema_migrations") == []

    run_cli("migrate", env=cli_env, cwd=tmp_path)
    assert schema_snapshot(db_url) == migrated


def test_rollback_of_a_batch_with_an_unsafe_migration_is_refused_without_force(
    db_url: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    run_cli("migrate", env=cli_env, cwd=tmp_path)
    migrated = schema_snapshot(db_url)

    refused = run_cli("migrate", "rollback", env=cli_env, cwd=tmp_path, check=False)
    assert refused.returncode == 1
    assert "rollbackSafe: false" in refused.stderr
    assert "--force" in refused.stderr
    assert "0001" in refused.stderr
    assert schema_snapshot(db_url) == migrated
    assert len(query_rows(db_url, "SELECT version FROM schema_migrations")) == 2

    run_cli("migrate", "rollback", "--force", env=cli_env, cwd=tmp_path)
    assert tables(db_url) == BOOKKEEPING


def test_failing_migration_leaves_schema_and_bookkeeping_as_before_the_batch(
    db_url: str, tmp_path: Path
) -> None:
    migrations = copy_migrations(tmp_path / "migrations", "0001")
    env = {"DATABASE_URL": db_url, "RESTAURANT_MIGRATIONS_DIR": str(migrations)}
    run_cli("migrate", env=env, cwd=tmp_path)
    before = schema_snapshot(db_url)
    bookkeeping_before = query_rows(db_url, "SELECT * FROM schema_migrations")

    copy_migrations(migrations, "0002")
    (migrations / "0003_breaks_halfway.py").write_text(FAILING_MIGRATION)
    failed = run_cli("migrate", env=env, cwd=tmp_path, check=False)

    assert failed.returncode == 1
    assert "migration 0003 (breaks halfway) failed" in failed.stderr
    assert "rolled back" in failed.stderr
    assert schema_snapshot(db_url) == before  # no is_featured, no half_done
    assert query_rows(db_url, "SELECT * FROM schema_migrations") == bookkeeping_before
    status = run_cli("migrate", "status", env=env, cwd=tmp_path).stdout
    assert "1 applied, 2 pending" in status


def test_seeding_twice_leaves_the_same_rows(
    db_url: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    run_cli("migrate", env=cli_env, cwd=tmp_path)
    run_cli("seed", env=cli_env, cwd=tmp_path)
    restaurants_sql = "SELECT * FROM restaurants ORDER BY id"
    menu_sql = "SELECT * FROM menu_items ORDER BY id"
    first = (query_rows(db_url, restaurants_sql), query_rows(db_url, menu_sql))
    assert len(first[0]) == 8
    assert len({row[2] for row in first[0]}) >= 3, "several cities"
    assert len(first[1]) >= 16

    output = run_cli("seed", env=cli_env, cwd=tmp_path).stdout
    assert "Seeded: 0001_sample_restaurants" in output
    assert (query_rows(db_url, restaurants_sql), query_rows(db_url, menu_sql)) == first
    assert query_rows(db_url, "SELECT name, run_count FROM schema_seeds") == [
        ("0001_sample_restaurants", 2)
    ]


def test_unsafe_seed_runs_once_unless_forced(db_url: str, tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "0001_once_only.py").write_text(UNSAFE_SEED)
    env = {"DATABASE_URL": db_url, "RESTAURANT_SEEDS_DIR": str(seeds)}
    count_sql = "SELECT count(*) FROM restaurants WHERE name = 'Once Only'"
    run_cli("migrate", env=env, cwd=tmp_path)

    assert "Seeded: 0001_once_only" in run_cli("seed", env=env, cwd=tmp_path).stdout
    skipped = run_cli("seed", env=env, cwd=tmp_path).stdout
    assert "Skipped: 0001_once_only" in skipped
    refused = run_cli("seed", "0001_once_only", env=env, cwd=tmp_path, check=False)
    assert refused.returncode == 1
    assert "not safe to run twice" in refused.stderr
    assert query_rows(db_url, count_sql) == [(1,)]

    run_cli("seed", "--force", "0001_once_only", env=env, cwd=tmp_path)
    assert query_rows(db_url, count_sql) == [(2,)]


def test_seed_refuses_to_run_before_migrations(
    db_url: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    refused = run_cli("seed", env=cli_env, cwd=tmp_path, check=False)
    assert refused.returncode == 1
    assert "pending migration" in refused.stderr
    assert "run `migrate` first" in refused.stderr
    assert not tables(db_url) & APP_TABLES


def test_concurrent_migrate_processes_apply_each_migration_exactly_once(
    db_url: str, tmp_path: Path
) -> None:
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    create = 'conn.exec_driver_sql("CREATE TABLE migration_runs (version VARCHAR(10) NOT NULL)")'
    for version, create_stmt, sleep in (("0001", create, 0), ("0002", "pass", 1.0)):
        source = COUNTING_MIGRATION.format(version=version, create=create_stmt, sleep=sleep)
        (migrations / f"{version}_count_runs.py").write_text(source)
    env = {"DATABASE_URL": db_url, "RESTAURANT_MIGRATIONS_DIR": str(migrations)}

    started = time.monotonic()
    processes = [start_cli("migrate", env=env, cwd=tmp_path) for _ in range(3)]
    outputs = [process.communicate(timeout=60) for process in processes]
    elapsed = time.monotonic() - started

    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    appliers = [stdout for stdout, _ in outputs if "Applied batch 1" in stdout]
    waiters = [stdout for stdout, _ in outputs if "Nothing to migrate" in stdout]
    assert len(appliers) == 1
    assert len(waiters) == 2
    assert sorted(query_rows(db_url, "SELECT version FROM migration_runs")) == [
        ("0001",),
        ("0002",),
    ]
    assert sorted(query_rows(db_url, "SELECT version, batch FROM schema_migrations")) == [
        ("0001", 1),
        ("0002", 1),
    ]
    assert elapsed < 30


def test_concurrent_migrate_of_the_packaged_migrations_all_succeed(
    db_url: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    processes = [start_cli("migrate", env=cli_env, cwd=tmp_path) for _ in range(4)]
    outputs = [process.communicate(timeout=60) for process in processes]
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert sum("Applied batch 1: 0001" in stdout for stdout, _ in outputs) == 1
    assert sorted(query_rows(db_url, "SELECT version, batch FROM schema_migrations")) == [
        ("0001", 1),
        ("0002", 1),
    ]


def test_default_database_is_a_sqlite_file_under_var_in_the_working_directory(
    tmp_path: Path,
) -> None:
    env = {"DATABASE_URL": ""}
    run_cli("migrate", env=env, cwd=tmp_path)
    database = tmp_path / "var" / "restaurant.db"
    assert database.is_file()
    assert APP_TABLES <= tables(f"sqlite:///{database}")
