"""The restaurant API served by uvicorn in a real subprocess, on migrated + seeded databases."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

try:
    import upstream_conftest_helpers as helpers
except ImportError:  # tests/ is a package
    from tests import upstream_conftest_helpers as helpers

postgres_database = helpers.postgres_database  # fixture: one PostgreSQL database per module

STARTUP_TIMEOUT_S = 15.0


def _wait_until_healthy(base_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=0.5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"server did not become healthy:\n{log.read_text()}")


@pytest.fixture(scope="module", params=helpers.BACKENDS)
def base_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """``restaurant-api serve`` on a free port, after ``migrate`` and ``seed``."""
    workdir = tmp_path_factory.mktemp(f"api-{request.param}")
    env = {"DATABASE_URL": helpers.database_url_for(request.param, request, workdir)}
    helpers.run_cli("migrate", env=env, cwd=workdir)
    helpers.run_cli("seed", env=env, cwd=workdir)
    port = helpers.free_port()
    log = workdir / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "upstream_app", "serve", "--port", str(port)],
            env={**os.environ, **env},
            cwd=workdir,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    """An HTTP client for the running server."""
    with httpx.Client(base_url=base_url, timeout=10) as http:
        yield http


def unique_city() -> str:
    """A city no other test uses, so filters see only this test's rows."""
    return f"Testcity-{uuid.uuid4().hex[:8]}"


def create_restaurant(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    body = {"name": "Test Kitchen", "city": unique_city(), "cuisine": "fusion", **fields}
    response = client.post("/api/restaurants", json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def create_order(client: httpx.Client, restaurant_id: int, amount: float = 21.5) -> dict[str, Any]:
    body = {"restaurant_id": restaurant_id, "items": [{"name": "Pizza", "quantity": 2}]}
    response = client.post("/api/orders", json={**body, "amount": amount})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def assert_json_error(response: httpx.Response, status: int, error: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert body["error"] == error
    assert body["message"]
    return body


def test_healthz_answers_ok(client: httpx.Client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_seeded_restaurants_are_listed_with_page_metadata(client: httpx.Client) -> None:
    body = client.get("/api/restaurants").json()
    assert body["limit"] == 50
    assert body["offset"] == 0
    assert body["total"] >= 8
    first = body["restaurants"][0]
    assert set(first) == {"id", "name", "city", "cuisine", "is_featured"}
    names = {restaurant["name"] for restaurant in body["restaurants"]}
    assert {"Trattoria Roma", "Le Petit Bistro", "Casa do Mar"} <= names


def test_restaurants_filter_by_city_and_cuisine_ignoring_case(client: httpx.Client) -> None:
    paris = client.get("/api/restaurants", params={"city": "paris"}).json()
    assert paris["total"] == 3
    assert {r["city"] for r in paris["restaurants"]} == {"Paris"}

    mexican = client.get("/api/restaurants", params={"city": "Paris", "cuisine": "MEXICAN"})
    assert [r["name"] for r in mexican.json()["restaurants"]] == ["Taqueria El Sol"]


def test_limit_and_offset_page_through_restaurants_without_overlap(client: httpx.Client) -> None:
    city = unique_city()
    ids = [create_restaurant(client, name=f"Branch {n}", city=city)["id"] for n in range(5)]

    seen: list[int] = []
    for offset in (0, 2, 4):
        page = client.get("/api/restaurants", params={"city": city, "limit": 2, "offset": offset})
        body = page.json()
        assert body["total"] == 5
        assert (body["limit"], body["offset"]) == (2, offset)
        seen += [restaurant["id"] for restaurant in body["restaurants"]]
    assert seen == ids
    beyond = client.get("/api/restaurants", params={"city": city, "offset": 10}).json()
    assert beyond["restaurants"] == []


def test_created_restaurant_answers_201_with_id_and_can_be_fetched(client: httpx.Client) -> None:
    created = create_restaurant(client, name="  Noodle Bar  ", cuisine="chinese")
    assert isinstance(created["id"], int)
    assert created["name"] == "Noodle Bar"
    assert created["is_featured"] is False

    fetched = client.get(f"/api/restaurants/{created['id']}")
    assert fetched.status_code == 200
    assert fetched.json() == created


def test_put_replaces_every_field_of_a_restaurant(client: httpx.Client) -> None:
    created = create_restaurant(client, is_featured=True)
    replacement = {"name": "Renamed", "city": "Lisbon", "cuisine": "seafood"}

    response = client.put(f"/api/restaurants/{created['id']}", json=replacement)

    assert response.status_code == 200
    expected = {"id": created["id"], **replacement, "is_featured": False}
    assert response.json() == expected
    assert client.get(f"/api/restaurants/{created['id']}").json() == expected


def test_patch_updates_only_the_given_fields(client: httpx.Client) -> None:
    created = create_restaurant(client)

    response = client.patch(f"/api/restaurants/{created['id']}", json={"is_featured": True})

    assert response.status_code == 200
    assert response.json() == {**created, "is_featured": True}


def test_deleted_restaurant_answers_204_then_404(client: httpx.Client) -> None:
    created = create_restaurant(client)

    response = client.delete(f"/api/restaurants/{created['id']}")

    assert response.status_code == 204
    assert response.content == b""
    missing = client.get(f"/api/restaurants/{created['id']}")
    assert_json_error(missing, 404, "not_found")
    assert_json_error(client.delete(f"/api/restaurants/{created['id']}"), 404, "not_found")


def test_restaurant_with_orders_cannot_be_deleted(client: httpx.Client) -> None:
    restaurant = create_restaurant(client)
    create_order(client, restaurant["id"])

    response = client.delete(f"/api/restaurants/{restaurant['id']}")

    assert_json_error(response, 409, "conflict")
    assert client.get(f"/api/restaurants/{restaurant['id']}").status_code == 200


def test_menu_lists_the_seeded_items_of_a_restaurant(client: httpx.Client) -> None:
    roma = client.get("/api/restaurants", params={"city": "Berlin", "cuisine": "italian"}).json()
    restaurant_id = roma["restaurants"][0]["id"]

    body = client.get(f"/api/restaurants/{restaurant_id}/menu").json()

    assert body["restaurant_id"] == restaurant_id
    by_name = {item["name"]: item for item in body["menu_items"]}
    assert by_name["Margherita"]["price"] == 9.5
    assert set(by_name["Margherita"]) == {"id", "restaurant_id", "name", "description", "price"}
    assert all(item["restaurant_id"] == restaurant_id for item in body["menu_items"])


def test_created_order_answers_201_with_id_and_can_be_fetched_and_listed(
    client: httpx.Client,
) -> None:
    restaurant = create_restaurant(client)

    order = create_order(client, restaurant["id"], amount=12.34)

    assert isinstance(order["id"], int)
    assert order["restaurant_id"] == restaurant["id"]
    assert order["items"] == [{"name": "Pizza", "quantity": 2}]
    assert order["amount"] == 12.34
    assert order["created_at"].endswith("+00:00")
    assert client.get(f"/api/orders/{order['id']}").json() == order
    listed = client.get("/api/orders", params={"restaurant_id": restaurant["id"]}).json()
    assert listed["orders"] == [order]
    assert listed["total"] == 1


def test_every_order_post_is_executed_even_when_identical(client: httpx.Client) -> None:
    restaurant = create_restaurant(client)

    first = create_order(client, restaurant["id"])
    second = create_order(client, restaurant["id"])

    assert first["id"] != second["id"]
    listed = client.get("/api/orders", params={"restaurant_id": restaurant["id"]}).json()
    assert listed["total"] == 2


def test_orders_filter_by_city_and_paginate(client: httpx.Client) -> None:
    restaurant = create_restaurant(client)
    ids = [create_order(client, restaurant["id"], amount=n)["id"] for n in range(3)]

    page = client.get(
        "/api/orders", params={"city": restaurant["city"], "limit": 2, "offset": 1}
    ).json()

    assert page["total"] == 3
    assert [order["id"] for order in page["orders"]] == ids[1:]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/restaurants/999999"),
        ("PUT", "/api/restaurants/999999"),
        ("PATCH", "/api/restaurants/999999"),
        ("DELETE", "/api/restaurants/999999"),
        ("GET", "/api/restaurants/999999/menu"),
        ("GET", "/api/orders/999999"),
        ("GET", "/api/orders/99999999999999999999"),
        ("GET", "/api/orders/abc"),
        ("GET", "/api/no-such-route"),
    ],
)
def test_unknown_ids_and_routes_answer_404_json(
    client: httpx.Client, method: str, path: str
) -> None:
    body = {"name": "X", "city": "Y", "cuisine": "Z"}
    response = client.request(method, path, json=body if method in ("PUT", "PATCH") else None)
    assert_json_error(response, 404, "not_found")


def test_unsupported_method_answers_405_json(client: httpx.Client) -> None:
    response = client.delete("/api/orders/1")
    assert_json_error(response, 405, "method_not_allowed")
    assert "GET" in response.headers["allow"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"city": "Berlin", "cuisine": "thai"}, "name"),
        ({"name": "", "city": "Berlin", "cuisine": "thai"}, "name"),
        ({"name": "A", "city": 42, "cuisine": "thai"}, "city"),
        ({"name": "A", "city": "Berlin", "cuisine": "x" * 101}, "cuisine"),
        ({"name": "A", "city": "Berlin", "cuisine": "thai", "is_featured": "yes"}, "is_featured"),
        ({"name": "A", "city": "Berlin", "cuisine": "thai", "stars": 5}, "stars"),
        (["not", "an", "object"], "body"),
    ],
)
def test_invalid_restaurant_answers_422_naming_the_field(
    client: httpx.Client, body: Any, field: str
) -> None:
    error = assert_json_error(client.post("/api/restaurants", json=body), 422, "validation_error")
    assert error["field"] == field
    assert field in error["message"]


def test_empty_patch_answers_422(client: httpx.Client) -> None:
    restaurant = create_restaurant(client)
    response = client.patch(f"/api/restaurants/{restaurant['id']}", json={})
    assert assert_json_error(response, 422, "validation_error")["field"] == "body"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"restaurant_id": None}, "restaurant_id"),
        ({"restaurant_id": "1"}, "restaurant_id"),
        ({"restaurant_id": 999999}, "restaurant_id"),
        ({"items": []}, "items"),
        ({"items": ["pizza"]}, "items[0]"),
        ({"items": [{"name": "Pizza", "quantity": 0}]}, "items[0].quantity"),
        ({"amount": "12"}, "amount"),
        ({"amount": -1}, "amount"),
        ({"amount": 1.234}, "amount"),
        ({"amount": True}, "amount"),
        ({"coupon": "FREE"}, "coupon"),
    ],
)
def test_invalid_order_answers_422_naming_the_field(
    client: httpx.Client, changes: dict[str, Any], field: str
) -> None:
    body = {"restaurant_id": 1, "items": [{"name": "Pizza", "quantity": 1}], "amount": 9.5}
    body.update(changes)
    body = {key: value for key, value in body.items() if value is not None}
    response = client.post("/api/orders", json=body)
    error = assert_json_error(response, 422, "validation_error")
    assert error["field"] == field
    assert error["message"].startswith(f"{field}:")


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/api/restaurants", {"limit": "0"}, "limit"),
        ("/api/restaurants", {"limit": "many"}, "limit"),
        ("/api/restaurants", {"offset": "-1"}, "offset"),
        ("/api/restaurants", {"city": " "}, "city"),
        ("/api/orders", {"restaurant_id": "x"}, "restaurant_id"),
    ],
)
def test_invalid_query_parameters_answer_422(
    client: httpx.Client, path: str, params: dict[str, str], field: str
) -> None:
    response = client.get(path, params=params)
    assert assert_json_error(response, 422, "validation_error")["field"] == field


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/restaurants"),
        ("PUT", "/api/restaurants/1"),
        ("PATCH", "/api/restaurants/1"),
        ("POST", "/api/orders"),
    ],
)
@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe"])
def test_malformed_json_body_answers_400(
    client: httpx.Client, method: str, path: str, content: bytes
) -> None:
    response = client.request(
        method, path, content=content, headers={"content-type": "application/json"}
    )
    assert_json_error(response, 400, "malformed_json")
