"""Upstream failure kinds, named after the ``retry_on`` / ``failure_on`` conditions."""

from __future__ import annotations


class UpstreamError(Exception):
    """An exchange with an upstream failed before a usable response head arrived.

    ``kind`` is one of ``connect-failure``, ``reset``, ``timeout``, ``protocol``;
    ``sent`` tells whether any byte of the request may have reached the upstream, which
    decides whether a non-idempotent request can be retried and how idempotency records it.
    """

    kind = "protocol"

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class ConnectFailure(UpstreamError):
    """Refused, unreachable or connect timeout: the upstream certainly saw nothing."""

    kind = "connect-failure"

    def __init__(self, message: str) -> None:
        super().__init__(message, sent=False)


class ConnectionReset(UpstreamError):
    """The connection closed or reset before a complete response head."""

    kind = "reset"


class UpstreamTimeout(UpstreamError):
    """No response head (or no body progress) within the configured time."""

    kind = "timeout"


class ProtocolError(UpstreamError):
    """The upstream sent something that is not valid HTTP/1.1."""

    kind = "protocol"
