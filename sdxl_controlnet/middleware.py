"""ASGI middleware for the public front Service."""

from __future__ import annotations

import json
import typing as t

Scope = dict[str, t.Any]
Receive = t.Callable[[], t.Awaitable[dict[str, t.Any]]]
Send = t.Callable[[dict[str, t.Any]], t.Awaitable[None]]
ASGIApp = t.Callable[[Scope, Receive, Send], t.Awaitable[None]]


class BodyGuard:
    """Refuse request bodies that must not be read, before a byte of them is:
    over ``max_bytes`` by their Content-Length, of unknown length (so chunked
    encoding cannot dodge the limit), or multipart without a boundary (which
    BentoML would answer with a 500)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is None:
                return await _refuse(send, 411, "send a Content-Length header")
            if not declared.isdigit():
                return await _refuse(send, 400, "Content-Length must be a number of bytes")
            if int(declared) > self.max_bytes:
                return await _refuse(
                    send, 413, f"request body is {int(declared)} bytes; at most {self.max_bytes}"
                )
            content_type = dict(scope["headers"]).get(b"content-type", b"")
            if content_type.startswith(b"multipart/") and b"boundary=" not in content_type:
                return await _refuse(send, 400, "multipart Content-Type needs a boundary")
        await self.app(scope, receive, send)


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
