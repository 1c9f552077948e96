"""Request parsing and validation; every failure is an ``ApiError`` naming the field."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

MAX_DB_INT = 2**31 - 1  # ids are 32-bit INTEGER columns
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_ORDER_ITEMS = 100
MAX_QUANTITY = 1000
MAX_AMOUNT_CENTS = 100_000_000  # 1,000,000.00

RESTAURANT_FIELDS = {"name": 200, "city": 100, "cuisine": 100}


class ApiError(Exception):
    """An error answered as JSON: ``{"error": code, "message": ..., "field": ...}``."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def to_json(self) -> dict[str, Any]:
        """The response body."""
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


def invalid(field: str, message: str) -> ApiError:
    """A 422 validation error for ``field``."""
    return ApiError(422, "validation_error", f"{field}: {message}", field)


def not_found(kind: str, ident: int) -> ApiError:
    """A 404 for an unknown id."""
    return ApiError(404, "not_found", f"{kind} {ident} not found")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Decode a JSON object body: 400 if it is not JSON, 422 if not an object."""
    try:
        data = json.loads(body)
    except ValueError as exc:  # includes JSONDecodeError and UnicodeDecodeError
        raise ApiError(400, "malformed_json", f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ApiError(422, "validation_error", "request body must be a JSON object", "body")
    return data


def check_id(ident: int, kind: str) -> int:
    """Ids outside the database's integer range cannot exist: 404."""
    if ident > MAX_DB_INT:
        raise not_found(kind, ident)
    return ident


def _reject_unknown(data: Mapping[str, Any], allowed: set[str]) -> None:
    for key in data:
        if key not in allowed:
            raise invalid(key, f"unknown field (allowed: {', '.join(sorted(allowed))})")


def _text(data: Mapping[str, Any], field: str, max_length: int) -> str:
    value = data[field]
    if not isinstance(value, str) or not value.strip():
        raise invalid(field, "must be a non-empty string")
    value = value.strip()
    if len(value) > max_length:
        raise invalid(field, f"must be at most {max_length} characters")
    return value


def parse_restaurant(
    data: Mapping[str, Any], *, partial: bool, path_id: int | None = None
) -> dict[str, Any]:
    """Validate a restaurant body.

    ``partial=False`` (POST, PUT): name, city and cuisine are required and
    ``is_featured`` defaults to false.  ``partial=True`` (PATCH): any non-empty subset.
    """
    _reject_unknown(data, {*RESTAURANT_FIELDS, "is_featured", "id"})
    if "id" in data and (path_id is None or data["id"] != path_id):
        raise invalid("id", "is read-only")
    values: dict[str, Any] = {}
    for field, max_length in RESTAURANT_FIELDS.items():
        if field in data:
            values[field] = _text(data, field, max_length)
        elif not partial:
            raise invalid(field, "is required")
    if "is_featured" in data:
        if not isinstance(data["is_featured"], bool):
            raise invalid("is_featured", "must be true or false")
        values["is_featured"] = data["is_featured"]
    elif not partial:
        values["is_featured"] = False
    if not values:
        raise ApiError(
            422,
            "validation_error",
            "body: give at least one of name, city, cuisine, is_featured",
            "body",
        )
    return values


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def parse_order(data: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an order body: ``restaurant_id``, ``items`` and ``amount``."""
    _reject_unknown(data, {"restaurant_id", "items", "amount"})
    for field in ("restaurant_id", "items", "amount"):
        if field not in data:
            raise invalid(field, "is required")
    restaurant_id = data["restaurant_id"]
    if not _positive_int(restaurant_id) or restaurant_id > MAX_DB_INT:
        raise invalid("restaurant_id", "must be a positive integer")
    return {
        "restaurant_id": restaurant_id,
        "items": _order_items(data["items"]),
        "amount_cents": _amount_cents(data["amount"]),
    }


def _order_items(items: Any) -> list[Any]:
    if not isinstance(items, list) or not items:
        raise invalid("items", "must be a non-empty array")
    if len(items) > MAX_ORDER_ITEMS:
        raise invalid("items", f"must have at most {MAX_ORDER_ITEMS} entries")
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise invalid(f"items[{index}]", "must be an object")
        if "quantity" in item and not (
            _positive_int(item["quantity"]) and item["quantity"] <= MAX_QUANTITY
        ):
            raise invalid(
                f"items[{index}].quantity", f"must be an integer from 1 to {MAX_QUANTITY}"
            )
    return items


def _amount_cents(amount: Any) -> int:
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise invalid("amount", "must be a number")
    if isinstance(amount, float) and not math.isfinite(amount):
        raise invalid("amount", "must be a finite number")
    cents = Decimal(str(amount)) * 100
    if cents != cents.to_integral_value():
        raise invalid("amount", "must have at most 2 decimal places")
    if cents < 0 or cents > MAX_AMOUNT_CENTS:
        raise invalid("amount", f"must be between 0 and {MAX_AMOUNT_CENTS // 100}")
    return int(cents)


def parse_page(query: Mapping[str, str]) -> tuple[int, int]:
    """``limit`` (1..MAX_LIMIT, default DEFAULT_LIMIT) and ``offset`` (>= 0, default 0)."""
    limit = _query_int(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = _query_int(query, "offset", 0, 0, MAX_DB_INT)
    return limit, offset


def query_text(query: Mapping[str, str], name: str) -> str | None:
    """An optional non-empty text filter."""
    value = query.get(name)
    if value is None:
        return None
    if not value.strip():
        raise invalid(name, "must not be empty")
    return value.strip()


def query_id(query: Mapping[str, str], name: str) -> int | None:
    """An optional positive integer filter."""
    if name not in query:
        return None
    return _query_int(query, name, 0, 1, MAX_DB_INT)


def _query_int(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid(name, f"must be an integer from {low} to {high}") from None
    if not low <= value <= high:
        raise invalid(name, f"must be an integer from {low} to {high}")
    return value
