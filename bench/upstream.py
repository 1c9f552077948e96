"""The benchmark's upstream: a trivial pure-ASGI app answering ~50 bytes of JSON.

Run under uvicorn with uvloop and httptools (``python -m uvicorn bench.upstream:app``), it
is the fastest thing a Python upstream can be, so the benchmark measures the proxy, not
the app. Behaviour:

- ``GET`` (any path) answers 200 with a fixed JSON body (``/healthz`` included);
- ``POST`` (any path) reads the body and answers 201 with a fixed JSON body;
- ``?cpu_us=N`` first burns N microseconds of this thread's CPU time in a busy loop
  (``?cpu_us=1000`` is the "upstream that spends 1 ms of CPU per request" scenario).

Hand-written rather than a starlette app: routing and request objects would cost more
than the proxy overhead being measured.
"""

from __future__ import annotations

import time
from typing import Any

GET_BODY = b'{"id":42,"name":"bench","city":"Lyon","ok":true}'
POST_BODY = b'{"id":42,"status":"created","amount":1250,"ok":1}'

_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(GET_BODY)).encode()),
]
_POST_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(POST_BODY)).encode()),
]
_CPU_PREFIX = b"cpu_us="


def burn_cpu(microseconds: int) -> None:
    """Spin until this thread has used ``microseconds`` of CPU (not wall-clock) time."""
    end = time.thread_time() + microseconds / 1_000_000
    while time.thread_time() < end:
        pass


def _cpu_request(query: bytes) -> int:
    """The ``cpu_us`` value of a query string, 0 when absent or malformed."""
    for part in query.split(b"&"):
        if part.startswith(_CPU_PREFIX):
            value = part[len(_CPU_PREFIX) :]
            return int(value) if value.isdigit() else 0
    return 0


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI entry point (lifespan events are acknowledged, nothing else is needed)."""
    kind = scope["type"]
    if kind == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if kind != "http":
        return
    query = scope["query_string"]
    if query:
        cpu_us = _cpu_request(query)
        if cpu_us:
            burn_cpu(cpu_us)
    if scope["method"] == "POST":
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 201, "headers": _POST_HEADERS})
        await send({"type": "http.response.body", "body": POST_BODY})
        return
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": GET_BODY})
