"""The proxy listener's ASGI entry point: route, set up the request context, run the
route's pipeline. Everything else happens in the layers (see ``proxy/pipeline.py``)."""

from __future__ import annotations

import asyncio
import logging
import time

from proxy.context import RequestContext
from proxy.forward import ClientDisconnected
from proxy.headers import new_request_id, valid_request_id
from proxy.metrics import DRAINING, IN_FLIGHT
from proxy.pipeline import Runtime
from proxy.problem import send_problem
from proxy.types import Message, Receive, Scope, Send
from proxy.upstream.errors import UpstreamError

logger = logging.getLogger("sidecar.proxy")


class ProxyState:
    """Mutable process state shared by both listeners: the live runtime and drain flag."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.draining = False
        self.in_flight = 0
        IN_FLIGHT.set_function(lambda: self.in_flight)  # read at scrape time: free per request
        DRAINING.set_function(lambda: float(self.draining))


class ProxyApp:
    """ASGI app for the proxy listener."""

    def __init__(self, state: ProxyState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            return  # no lifespan; WebSocket upgrades arrive as HTTP and are refused below
        state = self.state
        runtime = state.runtime
        trusted = runtime.trusted
        request_id = b""
        xff = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value
            elif name == b"x-forwarded-for" and trusted:
                xff = value if xff is None else xff + b", " + value
            elif name == b"upgrade" and value.lower() == b"websocket":
                await send_problem(
                    send,
                    501,
                    "websocket-unsupported",
                    "WebSocket upgrades are not proxied by this sidecar; "
                    "connect to the upstream directly",
                    [(b"connection", b"close")],
                )
                return
        route = runtime.router.match(scope["method"], scope["path"])
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        if not valid_request_id(request_id):
            request_id = new_request_id()
        peer_trusted = bool(trusted) and trusted.contains(peer)
        client_ip = trusted.client_ip(peer, xff) if peer_trusted else peer
        ctx = RequestContext(route, client_ip, peer_trusted, request_id, time.perf_counter())
        ctx.draining = state.draining
        scope["sidecar"] = ctx

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if state.draining:  # even for requests that arrived before the signal
                    message = _closing(message)
            await send(message)

        state.in_flight += 1
        try:
            await route.app(scope, receive, tracking_send)  # type: ignore[misc]
        except ClientDisconnected:
            ctx.error = "client_disconnected"
        except asyncio.CancelledError:
            if not state.draining:
                raise
            # drain_timeout passed and server.py cancelled what was left: answer if we can
            # (a response already streaming is cut short), and let the process exit.
            ctx.error = "draining"
            if not started:
                await send_problem(
                    tracking_send,
                    503,
                    "draining",
                    "the sidecar shut down (drain_timeout) before the upstream answered; "
                    "the upstream may or may not have processed the request",
                )
        except UpstreamError:
            if not started:
                raise
            # The upstream failed mid-body: returning without completing makes the server
            # close the client connection, so the client sees a truncated response.
        except Exception:
            if started:
                raise
            logger.exception("unhandled error while proxying %s %s", scope["method"], scope["path"])
            ctx.error = "internal"
            await send_problem(
                tracking_send, 500, "internal-error", "the sidecar failed to handle the request"
            )
        finally:
            state.in_flight -= 1


def _closing(message: Message) -> Message:
    """A response head that also says ``Connection: close`` (answers sent while draining)."""
    headers = list(message.get("headers", ()))
    if not any(name == b"connection" and b"close" in value.lower() for name, value in headers):
        headers.append((b"connection", b"close"))
    return {**message, "headers": headers}
