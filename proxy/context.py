"""Per-request state shared by the layers, stored in ``scope["sidecar"]``."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.routing import CompiledRoute


class RequestContext:
    """What the pipeline learns about one request, written once and read by later layers."""

    __slots__ = (
        "client_ip",
        "error",
        "idempotency_key",
        "peer_trusted",
        "request_id",
        "route",
        "start",
        "upstream_sent",
    )

    def __init__(
        self,
        route: CompiledRoute,
        client_ip: str,
        peer_trusted: bool,
        request_id: bytes,
        start: float,
    ) -> None:
        self.route = route
        self.client_ip = client_ip
        self.peer_trusted = peer_trusted
        self.request_id = request_id
        self.start = start
        self.error: str | None = None  # why the sidecar answered itself (metrics label)
        self.idempotency_key: str | None = None  # set when idempotency holds a claim
        # Whether any attempt may have reached the upstream (set by the forwarder when the
        # upstream call fails or is cancelled): idempotency then cannot release the key.
        self.upstream_sent = False
