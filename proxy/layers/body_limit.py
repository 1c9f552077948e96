"""Request body size limit: 413 from the declared ``Content-Length`` before reading a byte,
or as soon as a chunked body crosses the limit; the upstream is never called in the first
case, and its half-sent request is aborted in the second."""

from __future__ import annotations

from proxy.problem import send_problem
from proxy.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    """Raised from ``receive`` when a streamed body crosses the limit."""


class BodyLimitLayer:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limit
        for name, value in scope["headers"]:
            if name == b"content-length":
                if int(value) > limit:
                    scope["sidecar"].error = "body_too_large"
                    await send_problem(
                        send,
                        413,
                        "body-too-large",
                        f"request body of {int(value)} bytes exceeds the limit of {limit} bytes",
                        [(b"connection", b"close")],
                    )
                    return
                break  # a declared length within the limit cannot grow past it
        else:
            if scope["method"] in ("GET", "HEAD"):
                await self.app(scope, receive, send)
                return
            received = 0

            async def counting_receive() -> Message:
                nonlocal received
                message = await receive()
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge()
                return message

            started = False

            async def watching_send(message: Message) -> None:
                nonlocal started
                if message["type"] == "http.response.start":
                    started = True
                await send(message)

            try:
                await self.app(scope, counting_receive, watching_send)
            except BodyTooLarge:
                if started:
                    raise
                scope["sidecar"].error = "body_too_large"
                await send_problem(
                    send,
                    413,
                    "body-too-large",
                    f"request body exceeds the limit of {limit} bytes",
                    [(b"connection", b"close")],
                )
            return
        await self.app(scope, receive, send)
