"""The idempotency layer's decisions, driven directly as ASGI with a fake upstream app.

End-to-end proofs over real sockets are in ``test_idempotency_e2e.py``; these cover every
branch cheaply: key validation, scoping, fingerprints, what is stored, released or kept
unknown, store failures, and the ordering guarantee (recorded before the client sees it).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from prometheus_client import REGISTRY

from proxy.config.loader import ConfigError, parse_config
from proxy.config.schema import Idempotency
from proxy.context import RequestContext
from proxy.forward import Forwarder
from proxy.layers.idempotency import IdempotencyLayer
from proxy.problem import send_problem
from proxy.store.idempotency import Record, StoreUnavailable
from proxy.store.idempotency_memory import MemoryIdempotencyStore
from proxy.types import Message, Receive, Scope, Send
from proxy.upstream.cluster import UpstreamRequest
from proxy.upstream.errors import ConnectionReset

ENDPOINT = "/unit/orders"


class FakeUpstream:
    """Stands in for the forwarder: counts executions and answers as told."""

    def __init__(self) -> None:
        self.calls: list[Scope] = []
        self.status = 201
        self.headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
        self.chunks = [b'{"id":', b"1}"]
        self.failure: str | None = None  # "timeout" (after sending) or "connect-failure"
        self.on_final_chunk: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls.append(scope)
        ctx: RequestContext = scope["sidecar"]
        if self.failure == "timeout":
            ctx.error, ctx.upstream_sent = "timeout", True
            await send_problem(send, 504, "upstream-timeout", "no response")
            return
        if self.failure == "connect-failure":
            ctx.error, ctx.upstream_sent = "connect-failure", False
            await send_problem(send, 502, "upstream-unreachable", "refused")
            return
        if self.failure in ("cancelled-after-send", "cancelled-before-send"):
            ctx.upstream_sent = self.failure == "cancelled-after-send"
            raise asyncio.CancelledError()
        if self.failure == "circuit-open":
            ctx.error, ctx.upstream_sent = "circuit-open", False
            await send_problem(send, 503, "circuit-open", "open", [(b"retry-after", b"5")])
            return
        headers = [*self.headers, (b"via", b"1.1 sidecar"), (b"x-request-id", ctx.request_id)]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        for chunk in self.chunks[:-1]:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if self.failure == "mid-body":
            ctx.error = "reset"
            raise ConnectionReset("upstream closed mid-body", sent=True)
        await send({"type": "http.response.body", "body": self.chunks[-1]})


class FailingStore:
    backend = "broken"

    def __init__(self) -> None:
        self.calls = 0

    async def claim(self, *args: object) -> Record | None:
        self.calls += 1
        raise StoreUnavailable("down")

    async def finish(self, *args: object) -> bool:
        self.calls += 1
        raise StoreUnavailable("down")

    async def release(self, *args: object) -> bool:
        self.calls += 1
        raise StoreUnavailable("down")


class Result:
    def __init__(self, messages: list[Message], ctx: RequestContext) -> None:
        start = messages[0]
        self.status: int = start["status"]
        self.headers: list[tuple[bytes, bytes]] = start["headers"]
        self.body = b"".join(m.get("body", b"") for m in messages[1:])
        self.ctx = ctx

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)

    def json(self) -> Any:
        return json.loads(self.body)


def make_layer(
    upstream: FakeUpstream, store: Any = None, max_body: int | None = None, **settings: Any
) -> IdempotencyLayer:
    return IdempotencyLayer(
        upstream,
        Idempotency(**settings),
        store if store is not None else MemoryIdempotencyStore(1000),
        endpoint=ENDPOINT,
        max_body=max_body,
    )


async def call(
    layer: IdempotencyLayer,
    *,
    key: bytes | None = b"k1",
    body: bytes = b'{"amount": 5}',
    method: str = "POST",
    path: str = "/orders",
    headers: list[tuple[bytes, bytes]] | None = None,
    client_ip: str = "10.0.0.1",
    chunks: list[bytes] | None = None,
    on_send: Any = None,
) -> Result:
    raw = list(headers or [])
    if key is not None:
        raw.append((b"idempotency-key", key))
    if chunks is None:
        raw.append((b"content-length", str(len(body)).encode()))
        chunks = [body]
    else:
        raw.append((b"transfer-encoding", b"chunked"))
    ctx = RequestContext(None, client_ip, False, b"req-" + str(id(raw)).encode(), 0.0)  # type: ignore[arg-type]
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": raw,
        "scheme": "http",
        "client": (client_ip, 1234),
        "sidecar": ctx,
    }
    pending = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive() -> Message:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    messages: list[Message] = []

    async def send(message: Message) -> None:
        if on_send is not None:
            await on_send(message)
        messages.append(message)

    await layer(scope, receive, send)
    return Result(messages, ctx)


def outcome(name: str) -> float:
    value = REGISTRY.get_sample_value(
        "sidecar_idempotency_requests_total", {"endpoint": ENDPOINT, "outcome": name}
    )
    return value or 0.0


def problem_type(result: Result) -> str:
    return result.json()["type"].rsplit(":", 1)[1]


# -- what bypasses the store ----------------------------------------------------------------


async def test_other_methods_and_unkeyed_requests_never_touch_the_store() -> None:
    upstream, store = FakeUpstream(), FailingStore()
    layer = make_layer(upstream, store)
    assert (await call(layer, method="PUT")).status == 201
    assert (await call(layer, key=None)).status == 201
    assert store.calls == 0
    assert len(upstream.calls) == 2


async def test_missing_key_on_a_required_route_is_400_and_not_forwarded() -> None:
    upstream = FakeUpstream()
    before = outcome("missing_key")
    result = await call(make_layer(upstream, required=True), key=None)
    assert result.status == 400 and problem_type(result) == "idempotency-key-missing"
    assert result.header(b"content-type") == b"application/problem+json"
    assert upstream.calls == [] and outcome("missing_key") == before + 1


@pytest.mark.parametrize("key", [b"", b"x" * 256, b"bad\x01key", b"caf\xc3\xa9"])
async def test_malformed_keys_are_400(key: bytes) -> None:
    upstream = FakeUpstream()
    result = await call(make_layer(upstream), key=key)
    assert result.status == 400 and problem_type(result) == "idempotency-key-invalid"
    assert upstream.calls == []


async def test_two_different_key_headers_are_400() -> None:
    upstream = FakeUpstream()
    result = await call(make_layer(upstream), headers=[(b"x-idempotency-key", b"other")])
    assert result.status == 400 and upstream.calls == []


async def test_longest_valid_key_and_the_x_header_alias_are_accepted() -> None:
    upstream = FakeUpstream()
    layer = make_layer(upstream)
    assert (await call(layer, key=b"k" * 255)).status == 201
    alias = await call(layer, key=None, headers=[(b"x-idempotency-key", b"alias")])
    assert alias.status == 201 and alias.header(b"x-idempotency-key") == b"alias"
    assert len(upstream.calls) == 2


async def test_quoted_key_from_the_ietf_draft_is_the_same_key_as_the_bare_one() -> None:
    upstream = FakeUpstream()
    layer = make_layer(upstream)
    await call(layer, key=b"abc")
    replay = await call(layer, key=b'"abc"')
    assert replay.header(b"idempotent-replayed") == b"true"
    assert replay.header(b"x-idempotency-key") == b'"abc"'
    assert len(upstream.calls) == 1


# -- execution and replay -------------------------------------------------------------------


async def test_upstream_gets_the_scoped_key_the_buffered_body_and_a_held_claim() -> None:
    upstream = FakeUpstream()
    layer = make_layer(upstream)
    result = await call(
        layer, body=b"hello", chunks=[b"hel", b"lo"], headers=[(b"x-idempotency-key", b"k1")]
    )
    assert result.status == 201
    scope = upstream.calls[0]
    assert scope["sidecar.body"] == b"hello"
    sent = [(n, v) for n, v in scope["headers"] if b"idempotency" in n]
    assert len(sent) == 1 and sent[0][0] == b"idempotency-key"
    assert sent[0][1].endswith(b":k1") and sent[0][1] != b"k1"  # scoped by client
    assert scope["sidecar"].idempotency_key == sent[0][1].decode()


async def test_key_headers_are_not_forwarded_when_forward_header_is_null() -> None:
    upstream = FakeUpstream()
    await call(make_layer(upstream, forward_header=None))
    assert not [n for n, _ in upstream.calls[0]["headers"] if b"idempotency" in n]


async def test_replay_is_identical_with_markers_and_its_own_request_id() -> None:
    upstream = FakeUpstream()
    upstream.headers += [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]
    layer = make_layer(upstream)
    stored_before, replayed_before = outcome("stored"), outcome("replayed")
    first = await call(layer)
    replay = await call(layer)
    assert len(upstream.calls) == 1
    assert (replay.status, replay.body) == (first.status, first.body)

    def end_to_end(result: Result) -> list[tuple[bytes, bytes]]:
        skip = {b"x-request-id", b"x-idempotent-replayed", b"idempotent-replayed"}
        return [(n, v) for n, v in result.headers if n not in skip]

    assert end_to_end(replay) == end_to_end(first)
    assert replay.header(b"x-idempotent-replayed") == b"true"
    assert replay.header(b"idempotent-replayed") == b"true"
    assert first.header(b"idempotent-replayed") is None
    assert replay.header(b"x-request-id") == replay.ctx.request_id != first.ctx.request_id
    assert first.header(b"x-idempotency-key") == replay.header(b"x-idempotency-key") == b"k1"
    assert (outcome("stored"), outcome("replayed")) == (stored_before + 1, replayed_before + 1)


async def test_record_is_written_before_the_client_sees_the_end_of_the_response() -> None:
    upstream = FakeUpstream()
    store = MemoryIdempotencyStore(1000)
    layer = make_layer(upstream, store)
    seen_at_end: list[Record | None] = []

    async def on_send(message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            record_id = next(iter(store._entries))
            seen_at_end.append(await store.claim(record_id, "probe", "fp", 30, 60))

    await call(layer, on_send=on_send)
    assert seen_at_end[0] is not None and seen_at_end[0].state == "done"


async def test_same_key_with_a_different_body_path_or_method_is_422() -> None:
    upstream = FakeUpstream()
    layer = make_layer(upstream)
    await call(layer)
    before = outcome("mismatch")
    for variant in ({"body": b"other"}, {"path": "/orders/2"}, {"method": "PATCH"}):
        result = await call(layer, **variant)
        assert result.status == 422 and problem_type(result) == "idempotency-key-mismatch"
        assert result.header(b"x-idempotency-key") == b"k1"
    assert len(upstream.calls) == 1 and outcome("mismatch") == before + 3


async def test_configured_fingerprint_headers_take_part_in_the_fingerprint() -> None:
    upstream = FakeUpstream()
    layer = make_layer(upstream, fingerprint_headers=["X-Tenant"])
    await call(layer, headers=[(b"x-tenant", b"a")])
    assert (await call(layer, headers=[(b"x-tenant", b"b")])).status == 422
    assert (await call(layer, headers=[(b"x-tenant", b"a")])).header(b"idempotent-replayed")


async def test_concurrent_duplicate_gets_409_with_retry_after() -> None:
    upstream = FakeUpstream()
    layer = make_layer(upstream)
    duplicates: list[Result] = []

    async def on_send(message: Message) -> None:
        if message["type"] == "http.response.start" and not duplicates:
            duplicates.append(await call(layer))  # arrives while the first is in flight

    await call(layer, on_send=on_send)
    assert duplicates[0].status == 409
    assert problem_type(duplicates[0]) == "idempotency-key-in-flight"
    assert duplicates[0].header(b"retry-after") == b"1"
    assert len(upstream.calls) == 1


# -- scoping --------------------------------------------------------------------------------


async def test_clients_at_different_addresses_have_separate_keys() -> None:
    upstream = FakeUpstream()
    layer = make_layer(upstream)
    await call(layer, client_ip="10.0.0.1")
    other = await call(layer, client_ip="10.0.0.2")
    assert other.header(b"idempotent-replayed") is None
    assert len(upstream.calls) == 2


async def test_header_scope_separates_credentials_and_falls_back_to_the_address() -> None:
    upstream = FakeUpstream()
    layer = make_layer(upstream, scope={"by": "header", "header": "Authorization"})
    alice = [(b"authorization", b"Bearer alice")]
    await call(layer, headers=alice, client_ip="10.0.0.1")
    same = await call(layer, headers=alice, client_ip="10.0.0.9")  # same user, other address
    assert same.header(b"idempotent-replayed") == b"true"
    bob = await call(layer, headers=[(b"authorization", b"Bearer bob")])
    assert bob.header(b"idempotent-replayed") is None
    anonymous = await call(layer)
    assert anonymous.header(b"idempotent-replayed") is None
    assert len(upstream.calls) == 3


async def test_scope_none_shares_keys_between_clients() -> None:
    upstream = FakeUpstream()
    layer = make_layer(upstream, scope={"by": "none"})
    await call(layer, client_ip="10.0.0.1")
    assert (await call(layer, client_ip="10.0.0.2")).header(b"idempotent-replayed") == b"true"
    assert upstream.calls[0]["sidecar"].idempotency_key == "k1"


# -- ambiguous and failed outcomes ----------------------------------------------------------


async def test_timeout_after_sending_is_kept_unknown_and_never_re_executed() -> None:
    upstream = FakeUpstream()
    upstream.failure = "timeout"
    layer = make_layer(upstream)
    before = outcome("unknown")
    assert (await call(layer)).status == 504
    upstream.failure = None
    again = await call(layer)
    assert again.status == 409 and problem_type(again) == "idempotency-outcome-unknown"
    assert len(upstream.calls) == 1 and outcome("unknown") == before + 1


@pytest.mark.parametrize("failure", ["connect-failure", "circuit-open"])
async def test_failure_before_reaching_the_upstream_releases_the_key(failure: str) -> None:
    upstream = FakeUpstream()
    upstream.failure = failure
    layer = make_layer(upstream)
    before = outcome("released")
    assert (await call(layer)).status in (502, 503)
    upstream.failure = None
    assert (await call(layer)).status == 201
    assert len(upstream.calls) == 2 and outcome("released") == before + 1


@pytest.mark.parametrize(
    ("failure", "after"),
    [("cancelled-after-send", "idempotency-outcome-unknown"), ("cancelled-before-send", None)],
)
async def test_cancelled_request_is_kept_unknown_only_if_it_may_have_been_sent(
    failure: str, after: str | None
) -> None:
    upstream = FakeUpstream()
    upstream.failure = failure
    layer = make_layer(upstream)
    with pytest.raises(asyncio.CancelledError):
        await call(layer)
    upstream.failure = None
    again = await call(layer)
    if after is None:
        assert again.status == 201 and len(upstream.calls) == 2
    else:
        assert again.status == 409 and problem_type(again) == after
        assert len(upstream.calls) == 1


async def test_sidecar_answers_like_413_are_never_stored() -> None:
    upstream = FakeUpstream()
    layer = make_layer(upstream, max_body=8)
    result = await call(layer, body=b"x" * 9)
    assert result.status == 413 and upstream.calls == []
    chunked = await call(layer, body=b"x" * 9, chunks=[b"xxxxx", b"xxxx"])
    assert chunked.status == 413 and upstream.calls == []
    assert (await call(layer, body=b"small")).status == 201


async def test_upstream_5xx_is_stored_by_default_and_released_when_configured() -> None:
    for store_server_errors, executions in ((True, 1), (False, 2)):
        upstream = FakeUpstream()
        upstream.status = 500
        layer = make_layer(upstream, store_server_errors=store_server_errors)
        await call(layer)
        second = await call(layer)
        assert second.status == 500 and len(upstream.calls) == executions


async def test_response_over_max_stored_body_is_forwarded_whole_but_not_replayable() -> None:
    upstream = FakeUpstream()
    upstream.chunks = [b"a" * 600, b"b" * 600]
    layer = make_layer(upstream, max_stored_body=1000)
    first = await call(layer)
    assert first.body == b"a" * 600 + b"b" * 600
    again = await call(layer)
    assert again.status == 409 and problem_type(again) == "idempotency-response-not-stored"
    assert again.json()["original_status"] == 201
    assert len(upstream.calls) == 1


async def test_response_cut_short_is_not_replayable_and_not_re_executed() -> None:
    upstream = FakeUpstream()
    upstream.failure = "mid-body"
    layer = make_layer(upstream)
    with pytest.raises(ConnectionReset):
        await call(layer)
    upstream.failure = None
    again = await call(layer)
    assert again.status == 409 and problem_type(again) == "idempotency-response-not-stored"
    assert len(upstream.calls) == 1


# -- store failures -------------------------------------------------------------------------


async def test_store_failure_fails_closed_with_503_and_no_forwarding() -> None:
    upstream = FakeUpstream()
    before = outcome("store_error")
    result = await call(make_layer(upstream, FailingStore()))
    assert result.status == 503 and problem_type(result) == "idempotency-store-unavailable"
    assert result.header(b"retry-after") == b"1"
    assert upstream.calls == [] and outcome("store_error") == before + 1


async def test_store_failure_can_be_configured_to_fail_open() -> None:
    upstream = FakeUpstream()
    result = await call(make_layer(upstream, FailingStore(), on_store_error="fail_open"))
    assert result.status == 201 and result.header(b"x-idempotency-key") == b"k1"
    assert len(upstream.calls) == 1
    assert upstream.calls[0]["sidecar"].idempotency_key is None  # no claim: not retryable


# -- configuration --------------------------------------------------------------------------


def test_idempotency_settings_are_validated_with_their_field_path() -> None:
    text = """
routes:
  - match: {path_prefix: /orders}
    idempotency: {ttl: 10s, lease: 1m, methods: [POST, FETCH], headers: []}
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "f.yaml", {})
    assert sorted(str(caught.value).splitlines()) == [
        "f.yaml: routes[0].idempotency.headers: name at least one header carrying the key",
        "f.yaml: routes[0].idempotency.methods: unknown HTTP method 'FETCH'",
    ]
    with pytest.raises(ConfigError) as caught:
        parse_config("routes: [{idempotency: {ttl: 10s, lease: 1m}}]", "f.yaml", {})
    assert str(caught.value) == "f.yaml: routes[0].idempotency.lease: must not exceed ttl"


# -- what the forwarder tells the layer -----------------------------------------------------


@pytest.mark.parametrize("sent", [True, False])
async def test_forwarder_reports_whether_a_cancelled_call_may_have_been_sent(sent: bool) -> None:
    async def upstream_call(request: UpstreamRequest) -> Any:
        request.sent = sent
        raise asyncio.CancelledError()

    forwarder = Forwarder(upstream_call, max_buffered_body=65536)
    ctx = RequestContext(None, "10.0.0.1", False, b"rid", 0.0)  # type: ignore[arg-type]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/orders",
        "raw_path": b"/orders",
        "query_string": b"",
        "headers": [(b"content-length", b"2")],
        "scheme": "http",
        "client": ("10.0.0.1", 1234),
        "sidecar": ctx,
        "sidecar.body": b"{}",
    }

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        raise AssertionError("nothing is sent on cancellation")

    with pytest.raises(asyncio.CancelledError):
        await forwarder(scope, receive, send)
    assert ctx.upstream_sent is sent
