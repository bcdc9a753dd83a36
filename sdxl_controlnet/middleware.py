"""ASGI middleware for the public front Service."""

from __future__ import annotations

import typing as t

from .errors import ClientError, InvalidRequest, LengthRequired, PayloadTooLarge

Scope = dict[str, t.Any]
Receive = t.Callable[[], t.Awaitable[dict[str, t.Any]]]
Send = t.Callable[[dict[str, t.Any]], t.Awaitable[None]]
ASGIApp = t.Callable[[Scope, Receive, Send], t.Awaitable[None]]


class BodyGuard:
    """Refuse request bodies that must not be read, before a byte of them is:
    over ``max_bytes`` by their Content-Length, of unknown length (chunked, so that
    it cannot dodge the limit), or multipart without a boundary (which
    BentoML would answer with a 500)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        has_body = scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH")
        if has_body and (refusal := self.refusal(dict(scope["headers"]))):
            return await refusal.response()(scope, receive, send)
        await self.app(scope, receive, send)

    def refusal(self, headers: dict[bytes, bytes]) -> ClientError | None:
        declared = headers.get(b"content-length")
        if declared is None and b"transfer-encoding" not in headers:
            return None  # no body at all: curl's PUT /generate_task/cancel, say
        if declared is None:
            return LengthRequired("send a Content-Length header")
        if not declared.isdigit():
            return InvalidRequest("Content-Length must be a number of bytes")
        if int(declared) > self.max_bytes:
            return PayloadTooLarge(
                f"request body is {int(declared)} bytes; at most {self.max_bytes}"
            )
        content_type = headers.get(b"content-type", b"")
        if content_type.startswith(b"multipart/") and b"boundary=" not in content_type:
            return InvalidRequest("multipart Content-Type needs a boundary")
        return None
