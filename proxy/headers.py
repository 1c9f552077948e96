"""Header rules of a transparent HTTP/1.1 proxy (RFC 9110 §7.6).

One pass over the client's headers produces the upstream's: hop-by-hop fields (and every
field the ``Connection`` header names) are dropped, the sidecar's own control headers and
``Proxy-*`` are stripped, and the forwarding headers are set. Client-sent
``X-Forwarded-*`` and ``Forwarded`` values are believed only from ``trusted_proxies``.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
from functools import lru_cache

from proxy.types import Headers

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Dropped from requests besides hop-by-hop: forwarding headers we rewrite, `Expect` (the
# sidecar streams the body itself), and anything addressed to the sidecar.
_REQUEST_DROP = HOP_BY_HOP | {
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"forwarded",
    b"x-request-id",
    b"via",
    b"expect",
    b"content-length",
}
VIA = b"1.1 sidecar"


class TrustedProxies:
    """Which peers may tell us who the client is (``trusted_proxies`` CIDRs)."""

    def __init__(self, cidrs: list[str]) -> None:
        self.networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
        self.contains = lru_cache(maxsize=4096)(self._contains)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def _contains(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    def client_ip(self, peer: str, forwarded_for: bytes | None) -> str:
        """The client address: the peer, or (behind trusted proxies) the right-most
        ``X-Forwarded-For`` entry that is not itself a trusted proxy."""
        if not self.networks or forwarded_for is None or not self.contains(peer):
            return peer
        for hop in reversed(forwarded_for.decode("latin-1").split(",")):
            hop = hop.strip()
            if hop and not self.contains(hop):
                return hop
        return peer


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """Field names listed in ``Connection`` headers (lower-case)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


_REQUEST_ID_PREFIX = os.urandom(8).hex()
_request_ids = itertools.count(int.from_bytes(os.urandom(4), "big"))


def new_request_id() -> bytes:
    """A 32-hex-digit id unique across processes: a random per-process prefix and a
    counter (no ``getrandom`` syscall per request, unlike ``uuid4``)."""
    return b"%s%016x" % (_REQUEST_ID_PREFIX.encode(), next(_request_ids))


def valid_request_id(value: bytes) -> bool:
    return 0 < len(value) <= 200 and all(0x21 <= c <= 0x7E for c in value)


class RequestHeaders:
    """The upstream request's headers and what the client's headers told us on the way."""

    __slots__ = ("chunked", "content_length", "headers", "host", "request_id", "x_forwarded_for")

    def __init__(self) -> None:
        self.headers: Headers = []
        self.content_length: int | None = None
        self.chunked = False
        self.host = b""
        self.request_id = b""
        self.x_forwarded_for: bytes | None = None


def scan_request(raw: Headers) -> RequestHeaders:
    """Split the client's headers into the end-to-end ones and the facts we need."""
    result = RequestHeaders()
    kept = result.headers
    named: frozenset[bytes] = frozenset()
    for name, value in raw:
        if name in _REQUEST_DROP:
            if name == b"content-length":
                result.content_length = int(value)
            elif name == b"transfer-encoding":
                result.chunked = b"chunked" in value.lower()
            elif name == b"x-forwarded-for":
                result.x_forwarded_for = (
                    value
                    if result.x_forwarded_for is None
                    else result.x_forwarded_for + b", " + value
                )
            elif name == b"x-request-id":
                result.request_id = value
            elif name == b"connection":
                named = named | connection_tokens([(name, value)])
            elif name in (b"forwarded", b"x-forwarded-proto", b"x-forwarded-host", b"via"):
                kept.append((name, value))  # decided in add_forwarding()
            continue
        if name == b"host":
            result.host = value
        elif name.startswith(b"x-sidecar-") or name.startswith(b"proxy-"):
            continue
        kept.append((name, value))
    if named:
        result.headers = [(n, v) for n, v in kept if n not in named]
    return result


def add_forwarding(
    req: RequestHeaders, peer: str, trusted: bool, scheme: str, request_id: bytes
) -> None:
    """Set ``X-Forwarded-*``, ``Forwarded``, ``Via`` and ``X-Request-ID`` on ``req.headers``."""
    headers = req.headers
    client_forwarded = client_proto = client_host = client_via = None
    if any(
        n in (b"forwarded", b"x-forwarded-proto", b"x-forwarded-host", b"via") for n, _ in headers
    ):
        rest: Headers = []
        for name, value in headers:
            if name == b"forwarded":
                client_forwarded = (
                    value if client_forwarded is None else client_forwarded + b", " + value
                )
            elif name == b"x-forwarded-proto":
                client_proto = value
            elif name == b"x-forwarded-host":
                client_host = value
            elif name == b"via":
                client_via = value if client_via is None else client_via + b", " + value
            else:
                rest.append((name, value))
        headers[:] = rest
    peer_b = peer.encode()
    host = req.host
    proto = scheme.encode()
    if trusted:
        xff = peer_b if req.x_forwarded_for is None else req.x_forwarded_for + b", " + peer_b
        proto = client_proto or proto
        host = client_host or host
    else:
        xff = peer_b
        client_forwarded = None
    for_node = b'"[' + peer_b + b']"' if b":" in peer_b else peer_b
    element = b"for=" + for_node + b";proto=" + scheme.encode()
    if req.host:
        element += b';host="' + req.host.replace(b'"', b"") + b'"'
    headers.append((b"x-forwarded-for", xff))
    headers.append((b"x-forwarded-proto", proto))
    if host:
        headers.append((b"x-forwarded-host", host))
    headers.append(
        (b"forwarded", element if client_forwarded is None else client_forwarded + b", " + element)
    )
    headers.append((b"via", VIA if client_via is None else client_via + b", " + VIA))
    headers.append((b"x-request-id", request_id))


def response_headers(raw: Headers, request_id: bytes) -> Headers:
    """The client's view of an upstream response's headers (while the process drains, the
    server protocol adds ``Connection: close`` to every answer)."""
    named = connection_tokens(raw) if any(n == b"connection" for n, _ in raw) else frozenset()
    out: Headers = []
    has_request_id = False
    via: bytes | None = None
    for name, value in raw:
        if name in HOP_BY_HOP or name in named:
            continue
        if name == b"via":
            via = value if via is None else via + b", " + value
            continue
        if name == b"x-request-id":
            has_request_id = True
        out.append((name, value))
    out.append((b"via", VIA if via is None else via + b", " + VIA))
    if not has_request_id:
        out.append((b"x-request-id", request_id))
    return out
