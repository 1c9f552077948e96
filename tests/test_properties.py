"""Property tests: header rewriting, idempotency keys, config parsing and the hardened
request parser, over inputs hypothesis generates (a fuzzer for the request-head path)."""

from __future__ import annotations

import asyncio

import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from uvicorn.server import ServerState

from proxy.config import ConfigError, parse_config
from proxy.config.schema import Limits
from proxy.headers import HOP_BY_HOP, add_forwarding, response_headers, scan_request
from proxy.http_protocol import protocol_for
from proxy.layers.idempotency import _KEY_RE, _unquote

token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=12)
value = st.binary(min_size=0, max_size=40).map(lambda b: bytes(c for c in b if 0x20 <= c < 0x7F))
header_name = st.one_of(
    st.sampled_from(
        [n.decode() for n in HOP_BY_HOP] + ["host", "x-forwarded-for", "content-length"]
    ),
    token,
)
headers_strategy = st.lists(st.tuples(header_name.map(str.encode), value), max_size=20)


@given(headers_strategy)
def test_no_hop_by_hop_or_connection_named_header_reaches_the_upstream(raw) -> None:
    raw = [(n, v) for n, v in raw if n != b"content-length" or v.isdigit()]
    named = set()
    for name, val in raw:
        if name == b"connection":
            named |= {t.strip().lower() for t in val.split(b",") if t.strip()}
    request = scan_request(raw)
    add_forwarding(request, "10.0.0.1", False, "http", b"rid")
    names = [n for n, _ in request.headers]
    assert not (set(names) & HOP_BY_HOP)
    assert not (set(names) & named) or set(names) & named <= {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"forwarded",
        b"via",
        b"x-request-id",
    }
    for added in (b"x-forwarded-for", b"via", b"x-request-id", b"forwarded"):
        assert names.count(added) == 1
    assert dict(request.headers)[b"x-forwarded-for"] == b"10.0.0.1"


@given(headers_strategy)
def test_no_hop_by_hop_header_reaches_the_client(raw) -> None:
    out = response_headers(raw, b"rid")
    names = [n for n, _ in out]
    assert not (set(names) & HOP_BY_HOP)
    assert names.count(b"via") == 1


@given(
    st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=255
    )
)
def test_printable_keys_up_to_255_characters_are_valid(key: str) -> None:
    raw = key.encode()
    if not (raw.startswith(b'"') and raw.endswith(b'"') and len(raw) >= 2):
        assert _KEY_RE.fullmatch(_unquote(raw))


@given(st.binary(min_size=0, max_size=300))
def test_keys_with_control_bytes_or_wrong_length_are_invalid(raw: bytes) -> None:
    key = _unquote(raw)
    valid = 1 <= len(key) <= 255 and all(0x20 <= c <= 0x7E for c in key)
    assert bool(_KEY_RE.fullmatch(key)) == valid


yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 100000),
    st.text(max_size=12),
    st.sampled_from(["250ms", "5s", "1MiB", "redis", "memory", "http://127.0.0.1:1", "/api/x"]),
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(
            st.sampled_from(
                [
                    "listen",
                    "admin",
                    "store",
                    "upstreams",
                    "app",
                    "url",
                    "routes",
                    "match",
                    "path",
                    "retry",
                    "max_attempts",
                    "idempotency",
                    "rate_limit",
                    "cache",
                    "ttl",
                    "limits",
                    "port",
                    "host",
                    "backend",
                    "requests_per_second",
                    "methods",
                    "x",
                ]
            ),
            children,
            max_size=4,
        ),
    ),
    max_leaves=12,
)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(["listen", "admin", "store", "upstreams", "routes", "limits", "junk"]),
        yaml_values,
        max_size=4,
    )
)
def test_config_loader_accepts_or_explains_but_never_crashes(document) -> None:
    import yaml

    try:
        parse_config(yaml.safe_dump(document), "f.yaml", {})
    except ConfigError as exc:
        assert exc.errors and all(isinstance(e, str) and e for e in exc.errors)
        assert str(exc).startswith("f.yaml: ")


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def write(self, data) -> None:  # type: ignore[no-untyped-def]
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):  # type: ignore[no-untyped-def]
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


REQUEST_PARTS = st.lists(
    st.one_of(
        st.sampled_from(
            [
                b"GET / HTTP/1.1\r\n",
                b"POST /x HTTP/1.1\r\n",
                b"Host: a\r\n",
                b"Content-Length: 5\r\n",
                b"Transfer-Encoding: chunked\r\n",
                b"\r\n",
                b"0\r\n\r\n",
                b"5\r\nhello\r\n",
                b" folded\r\n",
                b"X: y\r\n",
                b"Host : b\r\n",
                b"Content-Length: -1\r\n",
                b"\x00",
                b"\n",
            ]
        ),
        st.binary(max_size=30),
    ),
    max_size=12,
)


@settings(max_examples=400, deadline=None)
@given(REQUEST_PARTS)
def test_request_parser_never_crashes_and_refuses_with_a_problem(parts) -> None:
    async def run() -> None:
        calls = []

        async def app(scope, receive, send):  # type: ignore[no-untyped-def]
            calls.append(scope)

        config = uvicorn.Config(app, http="httptools", lifespan="off", log_config=None)
        config.load()
        protocol_class = protocol_for(
            Limits(max_header_bytes=2048, max_headers=10, max_url_bytes=512)
        )
        protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
        transport = _Transport()
        protocol.connection_made(transport)
        for part in parts:
            if transport.closed:
                break
            protocol.data_received(part)
        await asyncio.sleep(0)
        if transport.written:
            status = int(transport.written.split(b" ", 2)[1])
            assert status in (400, 408, 414, 431, 500) or status < 400
            if status >= 400 and status != 500:
                assert b"application/problem+json" in transport.written
                assert transport.closed
        protocol.connection_lost(None)

    asyncio.run(run())
