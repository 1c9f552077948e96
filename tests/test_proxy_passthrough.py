"""The sidecar is a transparent HTTP/1.1 proxy: methods, statuses, bodies and headers."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from tests.conftest import basic_config
from tests.support.processes import Sidecar, Upstream


@pytest.fixture(scope="module")
def proxied(echo_upstream: Upstream, tmp_path_factory: pytest.TempPathFactory):
    config = basic_config(echo_upstream.url)
    # These tests send strings of 5xx answers through one sidecar on purpose; with the
    # default breaker (5 consecutive 5xx) the circuit would open (tests/test_circuit_*.py).
    config["upstreams"]["app"]["circuit_breaker"] = {"enabled": False}
    sidecar = Sidecar(config, tmp_path_factory.mktemp("sc")).start(wait_ready=True)
    yield sidecar
    sidecar.stop()


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"])
def test_every_method_reaches_the_upstream_unchanged(proxied: Sidecar, method: str) -> None:
    body = b'{"k": "v"}' if method in ("POST", "PUT", "PATCH") else b""
    response = httpx.request(method, proxied.url + "/echo/x?a=1&b=%20two", content=body)
    assert response.status_code == 200
    echoed = response.json()
    assert echoed["method"] == method
    assert echoed["path"] == "/echo/x"
    assert echoed["query"] == "a=1&b=%20two"
    assert echoed["body_size"] == len(body)


@pytest.mark.parametrize(
    "status", [200, 201, 202, 301, 302, 400, 401, 403, 404, 409, 418, 422, 429, 500, 502, 503]
)
def test_every_status_passes_through_with_its_body(proxied: Sidecar, status: int) -> None:
    response = httpx.get(proxied.url + f"/status/{status}", follow_redirects=False)
    assert response.status_code == status
    assert response.json() == {"status": status}


@pytest.mark.parametrize("status", [204, 304])
def test_bodyless_statuses_have_no_body(proxied: Sidecar, status: int) -> None:
    response = httpx.get(proxied.url + f"/status/{status}")
    assert response.status_code == status
    assert response.content == b""
    assert response.headers["etag"] == '"x"'


def test_head_response_has_headers_but_no_body_and_connection_stays_usable(
    proxied: Sidecar,
) -> None:
    with httpx.Client() as client:
        head = client.head(proxied.url + "/download?size=5000")
        assert head.status_code == 200
        assert head.headers["content-length"] == "5000"
        assert head.content == b""
        # The same keep-alive connection (and the sidecar's pooled one) still works.
        after = client.get(proxied.url + "/echo")
        assert after.json()["method"] == "GET"


def test_hop_by_hop_headers_never_reach_the_upstream(proxied: Sidecar) -> None:
    response = httpx.get(
        proxied.url + "/echo",
        headers={
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "do-not-forward",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic abc",
            "Upgrade": "h2c",
            "X-Kept": "yes",
        },
    )
    names = {name for name, _ in response.json()["headers"]}
    for dropped in ("connection", "x-secret", "keep-alive", "te", "proxy-authorization", "upgrade"):
        assert dropped not in names
    assert ("x-kept", "yes") in [tuple(h) for h in response.json()["headers"]]


def test_hop_by_hop_headers_never_reach_the_client(proxied: Sidecar) -> None:
    response = httpx.get(proxied.url + "/cookies")
    assert response.status_code == 200
    assert "x-upstream-secret" not in response.headers
    assert "keep-alive" not in response.headers
    assert "proxy-authenticate" not in response.headers
    assert response.headers.get("connection", "").lower() != "x-upstream-secret"


def test_multiple_set_cookie_headers_stay_separate(proxied: Sidecar) -> None:
    response = httpx.get(proxied.url + "/cookies")
    assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]


def test_forwarding_headers_are_set_and_client_values_are_not_trusted(proxied: Sidecar) -> None:
    response = httpx.get(
        proxied.url + "/echo",
        headers={
            "X-Forwarded-For": "6.6.6.6",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "evil.example",
            "Forwarded": "for=6.6.6.6",
        },
    )
    headers = dict((k, v) for k, v in response.json()["headers"])
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == f"127.0.0.1:{proxied.port}"
    assert headers["forwarded"] == f'for=127.0.0.1;proto=http;host="127.0.0.1:{proxied.port}"'
    assert headers["via"] == "1.1 sidecar"
    assert response.headers["via"] == "1.1 sidecar"


def test_trusted_proxy_forwarding_headers_are_appended(
    echo_upstream: Upstream, start_sidecar
) -> None:
    sidecar = start_sidecar(basic_config(echo_upstream.url, trusted_proxies=["127.0.0.0/8"]))
    response = httpx.get(
        sidecar.url + "/echo",
        headers={
            "X-Forwarded-For": "203.0.113.9",
            "X-Forwarded-Proto": "https",
            "Forwarded": "for=203.0.113.9",
        },
    )
    headers = dict((k, v) for k, v in response.json()["headers"])
    assert headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "https"
    assert headers["forwarded"].startswith("for=203.0.113.9, for=127.0.0.1")


def test_request_id_is_kept_when_sent_and_generated_otherwise(proxied: Sidecar) -> None:
    kept = httpx.get(proxied.url + "/echo", headers={"X-Request-ID": "abc-123"})
    assert kept.headers["x-request-id"] == "abc-123"
    assert ["x-request-id", "abc-123"] in kept.json()["headers"]
    generated = httpx.get(proxied.url + "/echo")
    request_id = generated.headers["x-request-id"]
    assert len(request_id) == 32
    assert ["x-request-id", request_id] in generated.json()["headers"]


def test_chunked_request_body_is_streamed_to_the_upstream(proxied: Sidecar) -> None:
    def chunks():
        for i in range(10):
            yield f"part{i};".encode()

    response = httpx.post(proxied.url + "/upload", content=chunks())
    expected = b"".join(f"part{i};".encode() for i in range(10))
    assert response.json()["size"] == len(expected)


def test_raw_path_and_query_are_forwarded_byte_for_byte(proxied: Sidecar) -> None:
    with socket.create_connection(("127.0.0.1", proxied.port)) as sock:
        sock.sendall(b"GET /echo/a%2Fb?x=%41&y HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["raw_path"] == "/echo/a%2Fb"
    assert body["query"] == "x=%41&y"


def test_admin_paths_are_not_served_on_the_proxy_port(proxied: Sidecar) -> None:
    response = httpx.get(proxied.url + "/api/live")
    # The proxy forwards it: the echo upstream answers, not the admin handler.
    assert response.json()["path"] == "/api/live"
    assert response.headers["via"] == "1.1 sidecar"


def test_admin_port_never_proxies(proxied: Sidecar) -> None:
    response = httpx.get(proxied.admin_url + "/echo")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert httpx.get(proxied.admin_url + "/api/live").status_code == 200
