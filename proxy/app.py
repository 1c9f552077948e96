"""The proxy listener's ASGI entry point: route, set up the request context, run the
route's pipeline. Everything else happens in the layers (see ``proxy/pipeline.py``)."""

from __future__ import annotations

import asyncio
import logging
import time

from proxy.context import RequestContext
from proxy.forward import ClientDisconnected, answer_upstream_error
from proxy.headers import new_request_id, valid_request_id
from proxy.metrics import DRAINING, IN_FLIGHT
from proxy.pipeline import Runtime
from proxy.problem import send_problem
from proxy.types import Receive, Scope, Send
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
        scope["sidecar"] = ctx

        state.in_flight += 1
        try:
            await route.app(scope, receive, send)  # type: ignore[misc]
        except ClientDisconnected:
            ctx.error = "client_disconnected"
        except asyncio.CancelledError:
            # The drain timeout cut the request: the server answers 503 `draining` if the
            # response has not started (proxy/http_protocol.py).
            ctx.error = "draining" if state.draining else "cancelled"
            raise
        except UpstreamError as exc:
            # The upstream failed mid-body (the forwarder answers earlier failures itself).
            # If no byte of the answer reached the client yet (a layer may hold the head,
            # as idempotency does), the client still gets a 502/504; otherwise returning
            # without completing makes the server close the connection: a truncated answer.
            try:
                await answer_upstream_error(send, exc, ctx.request_id)
            except RuntimeError:
                pass
        except Exception:
            logger.exception("unhandled error while proxying %s %s", scope["method"], scope["path"])
            ctx.error = "internal"
            try:
                await send_problem(
                    send, 500, "internal-error", "the sidecar failed to handle the request"
                )
            except RuntimeError:  # the response had started: the server cuts it short
                pass
        finally:
            state.in_flight -= 1
