"""A controllable upstream for the proxy tests (run as a real uvicorn process).

Endpoints:
  /echo                  JSON of method, path, query, headers and body digest
  /status/{code}         answers that status (body unless 204/304 or HEAD)
  /slow?delay=S          sleeps S seconds before answering
  /download?size=N       N bytes streamed in 64 KiB chunks
  /upload                reads the body, answers its size and sha256
  /cookies               two Set-Cookie headers and hop-by-hop junk
  /counter               counts calls per X-Test-Key (GET /stats to read, POST /reset to clear)
  /orders, /idem/...     POST creates an order: 201 with a new id; ?delay=S waits S seconds,
                         ?size=N pads the answer, ?status=C overrides 201 (calls are counted)
  /flaky?fail=N&of=M&status=503   of every M calls per key, the first N fail
  /cache/...             JSON with this path's call number (per X-Test-Key) and the request's
                         Accept and Authorization; the answer obeys X-Respond-* request
                         headers (Cache-Control, Vary, Set-Cookie, Expires, Status, Delay,
                         Size), which caches do not key on
  /retry-after?seconds=S&fail=N   like flaky with a Retry-After header
  /healthz               200, or the status set by POST /admin/health?status=503&delay=S
  /stats                 call counts and open-connection/disconnect counts
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter, defaultdict
from urllib.parse import parse_qs

calls: Counter[str] = Counter()
flaky_state: defaultdict[str, int] = defaultdict(int)
health = {"status": 200, "delay": 0.0}
stats = {"disconnects": 0, "downloads_finished": 0}
orders = {"last_id": 0}


async def _body(receive) -> bytes:  # type: ignore[no-untyped-def]
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(parts)


async def _send(send, status: int, body: bytes = b"", headers=None, ctype=b"application/json"):  # type: ignore[no-untyped-def]
    hdrs = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
    hdrs += headers or []
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    path: str = scope["path"]
    query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
    hmap = {k: v for k, v in headers}
    key = hmap.get("x-test-key", "default")
    calls[f"{scope['method']} {path} {key}"] += 1
    calls[f"total {key}"] += 1

    if path == "/echo" or path.startswith("/echo/") or path.startswith("/api/"):
        body = await _body(receive)
        doc = {
            "method": scope["method"],
            "path": path,
            "raw_path": scope.get("raw_path", b"").decode("latin-1"),
            "query": scope["query_string"].decode("latin-1"),
            "headers": headers,
            "body_size": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body": body.decode("utf-8", "replace") if len(body) < 4096 else None,
        }
        status = int(query.get("status", 200))
        await _send(send, status, json.dumps(doc).encode())
    elif path == "/orders" or path.startswith("/idem/"):
        body = await _body(receive)
        orders["last_id"] += 1
        order_id = orders["last_id"]
        if "delay" in query:
            await asyncio.sleep(float(query["delay"]))
        doc = {
            "id": order_id,
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "idempotency_key": hmap.get("idempotency-key"),
            "pad": "x" * int(query.get("size", "0")),
        }
        extra = [(b"location", f"/orders/{order_id}".encode()), (b"set-cookie", b"o=1; Path=/")]
        await _send(send, int(query.get("status", "201")), json.dumps(doc).encode(), extra)
    elif path.startswith("/cache/"):
        await _body(receive)
        if "x-respond-delay" in hmap:
            await asyncio.sleep(float(hmap["x-respond-delay"]))
        doc = {
            "call": calls[f"{scope['method']} {path} {key}"],
            "path": path,
            "query": scope["query_string"].decode("latin-1"),
            "accept": hmap.get("accept"),
            "authorization": hmap.get("authorization"),
            "pad": "x" * int(hmap.get("x-respond-size", "0")),
        }
        extra = [(b"etag", b'"v1"'), (b"x-upstream-custom", b"kept")]
        for control in ("cache-control", "vary", "set-cookie", "expires"):
            if f"x-respond-{control}" in hmap:
                extra.append((control.encode(), hmap[f"x-respond-{control}"].encode()))
        status = int(hmap.get("x-respond-status", "200"))
        await _send(send, status, json.dumps(doc).encode(), extra)
    elif path.startswith("/status/"):
        await _body(receive)
        status = int(path.rsplit("/", 1)[1])
        body = b"" if status in (204, 304) else json.dumps({"status": status}).encode()
        if status in (204, 304):
            await send(
                {"type": "http.response.start", "status": status, "headers": [(b"etag", b'"x"')]}
            )
            await send({"type": "http.response.body", "body": b""})
        else:
            await _send(send, status, body)
    elif path == "/slow":
        await _body(receive)
        await asyncio.sleep(float(query.get("delay", "1")))
        await _send(send, 200, b'{"slow":true}')
    elif path == "/download":
        size = int(query.get("size", "1048576"))
        chunk = b"x" * 65536
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/octet-stream"),
                    (b"content-length", str(size).encode()),
                ],
            }
        )
        sent = 0
        while sent < size:
            piece = chunk[: min(65536, size - sent)]
            sent += len(piece)
            await send({"type": "http.response.body", "body": piece, "more_body": sent < size})
            if "pace" in query:
                await asyncio.sleep(float(query["pace"]))
        stats["downloads_finished"] += 1
    elif path == "/upload":
        digest = hashlib.sha256()
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                stats["disconnects"] += 1
                return
            body = message.get("body", b"")
            size += len(body)
            digest.update(body)
            if not message.get("more_body"):
                break
        await _send(send, 200, json.dumps({"size": size, "sha256": digest.hexdigest()}).encode())
    elif path == "/cookies":
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/plain"),
                    (b"content-length", b"2"),
                    (b"set-cookie", b"a=1; Path=/"),
                    (b"set-cookie", b"b=2; Path=/"),
                    (b"connection", b"x-upstream-secret"),
                    (b"x-upstream-secret", b"hidden"),
                    (b"keep-alive", b"timeout=5"),
                    (b"proxy-authenticate", b"Basic"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"ok"})
    elif path == "/flaky" or path == "/retry-after":
        await _body(receive)
        fail = int(query.get("fail", "1"))
        of = int(query.get("of", "0")) or fail + 1
        n = flaky_state[f"{path} {key}"]
        flaky_state[f"{path} {key}"] += 1
        if n % of < fail:
            extra = (
                [(b"retry-after", query.get("seconds", "1").encode())]
                if path == "/retry-after"
                else []
            )
            await _send(send, int(query.get("status", "503")), b'{"failed":true}', extra)
        else:
            await _send(send, 200, json.dumps({"ok": True, "call": n}).encode())
    elif path == "/healthz":
        if health["delay"]:
            await asyncio.sleep(health["delay"])
        await _send(send, health["status"], b'{"status":"ok"}')
    elif path == "/admin/health":
        health["status"] = int(query.get("status", "200"))
        health["delay"] = float(query.get("delay", "0"))
        await _send(send, 200, b"{}")
    elif path == "/stats":
        await _send(send, 200, json.dumps({"calls": dict(calls), **stats}).encode())
    elif path == "/reset":
        calls.clear()
        flaky_state.clear()
        await _send(send, 200, b"{}")
    else:
        await _body(receive)
        await _send(send, 404, b'{"error":"not found"}')
