"""In-process checks of the restaurant API's request validation and database URL handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from upstream_app.db import resolve_database_url
from upstream_app.migrate import load_migrations
from upstream_app.seed import load_seeds
from upstream_app.validation import (
    MAX_AMOUNT_CENTS,
    ApiError,
    parse_json_object,
    parse_order,
    parse_page,
    parse_restaurant,
)


@given(st.integers(min_value=0, max_value=MAX_AMOUNT_CENTS))
def test_amount_with_two_decimals_round_trips_through_json_as_exact_cents(cents: int) -> None:
    amount = json.loads(json.dumps(cents / 100))
    order = parse_order({"restaurant_id": 1, "items": [{}], "amount": amount})
    assert order["amount_cents"] == cents


@given(st.dictionaries(st.text(max_size=8), st.none() | st.integers() | st.text(max_size=5)))
def test_any_json_object_either_parses_as_restaurant_or_raises_422(data: dict[str, object]) -> None:
    try:
        values = parse_restaurant(data, partial=True)
    except ApiError as exc:
        assert exc.status == 422
        assert exc.field is not None
    else:
        assert set(values) <= {"name", "city", "cuisine", "is_featured"}


def test_non_object_json_is_422_and_non_json_is_400() -> None:
    with pytest.raises(ApiError) as not_object:
        parse_json_object(b"[1, 2]")
    assert not_object.value.status == 422
    with pytest.raises(ApiError) as not_json:
        parse_json_object(b"{'single': 'quotes'}")
    assert not_json.value.status == 400


def test_page_defaults_and_bounds() -> None:
    assert parse_page({}) == (50, 0)
    assert parse_page({"limit": "500", "offset": "7"}) == (500, 7)
    with pytest.raises(ApiError):
        parse_page({"limit": "501"})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("postgresql://u:p@db:5432/app", "postgresql+psycopg://u:p@db:5432/app"),
        ("postgres://u@db/app", "postgresql+psycopg://u@db/app"),
        ("postgresql+psycopg://u@db/app", "postgresql+psycopg://u@db/app"),
        ("sqlite:///data/x.db", "sqlite+pysqlite:///data/x.db"),
        ("", f"sqlite+pysqlite:///{Path('var') / 'restaurant.db'}"),
    ],
)
def test_database_url_selects_psycopg3_for_postgres_and_sqlite_by_default(
    raw: str, expected: str
) -> None:
    assert resolve_database_url(raw).render_as_string(hide_password=False) == expected


def test_unsupported_database_url_is_rejected() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        resolve_database_url("mysql://u@db/app")


def test_packaged_migrations_and_seeds_are_discoverable_with_their_meta() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == ["0001", "0002"]
    assert [m.rollback_safe for m in migrations] == [False, True]
    assert all(m.author and m.description for m in migrations)
    seeds = load_seeds()
    assert [(s.name, s.safe) for s in seeds] == [("0001_sample_restaurants", True)]
