"""Errors the sidecar answers itself, as RFC 9457 ``application/problem+json``."""

from __future__ import annotations

import json
from collections.abc import Iterable

from proxy.types import Send

TYPE_BASE = "urn:sidecar:problem:"

TITLES = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    414: "URI Too Long",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def problem_body(status: int, slug: str, detail: str, **extra: object) -> bytes:
    """The JSON body of a problem: ``type``, ``title``, ``status``, ``detail`` and extras."""
    document = {
        "type": TYPE_BASE + slug,
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        **extra,
    }
    return json.dumps(document, separators=(",", ":")).encode()


async def send_problem(
    send: Send,
    status: int,
    slug: str,
    detail: str,
    headers: Iterable[tuple[bytes, bytes]] = (),
    **extra: object,
) -> None:
    """Answer the request with a problem document (the response must not have started)."""
    body = problem_body(status, slug, detail, **extra)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
