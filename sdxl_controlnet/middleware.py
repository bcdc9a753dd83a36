"""ASGI middleware, BentoML's public hook around every request of a Service."""

from __future__ import annotations

import json
import logging
import typing as t

from starlette.responses import JSONResponse

from . import logs
from .errors import (
    BENTOML_EXCEPTION_LOGGER,
    ClientError,
    ClientErrorTraces,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
    error_body,
    in_shape,
)

logger = logs.logger(__name__)

# What a client reads of a failure the log explains.
SERVER_FAILURE = "the request failed on the server; see its log"

Scope = dict[str, t.Any]
Message = dict[str, t.Any]
Receive = t.Callable[[], t.Awaitable[Message]]
Send = t.Callable[[Message], t.Awaitable[None]]
ASGIApp = t.Callable[[Scope, Receive, Send], t.Awaitable[None]]


def replayed(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body``, read already, then what ``receive`` hears next
    (the client's disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


# The media types the public APIs read (docs/api.md). Anything else, in any spelling, is a
# 415 before the body is read: BentoML would unpickle application/vnd.bentoml+pickle.
READABLE_MEDIA_TYPES = (
    b"application/json",
    b"multipart/form-data",
    b"application/x-www-form-urlencoded",
)
# BentoML 1.4.40's access log decodes a request's Content-Type as UTF-8 after the answer
# has started (``AccessLogMiddleware``, ``bentoml/_internal/server/http/access.py``): any
# other byte there breaks the answer off. The front's access log leaves the type out.
ACCESS_LOG = {"access": {"request_content_type": False}}
# HTTP's optional whitespace, the only bytes around a media type that a client may add.
# Python's str.strip() would also remove \xa0, \x85 and \x1c-\x1f, which a server accepts.
OWS = b" \t"


class BodyGuard:
    """Refuse request bodies that must not be read: over ``max_bytes`` by their
    Content-Length before a byte of them is read, or, sent without one (chunked), as
    soon as what arrived passes it; in a media type the APIs do not read; and multipart
    without a boundary (which BentoML would answer with a 500).

    A body's Content-Type is checked once, then written back in the one spelling that
    was checked (the media type in lower case, nothing around it), so that BentoML and
    the application act on exactly the value the check accepted."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        try:
            scope = {**scope, "headers": _one_spelling(scope["headers"])}
        except ClientError as refusal:
            return await refusal.response()(scope, receive, send)
        headers = dict(scope["headers"])
        if refusal := self.refusal(headers):
            return await refusal.response()(scope, receive, send)
        # The server reads no more than a Content-Length declares, unless the body is also
        # chunked: then the chunks count, whatever the length says.
        if b"content-length" in headers and b"transfer-encoding" not in headers:
            return await self.app(scope, receive, send)
        await self._counting(scope, receive, send)

    async def _counting(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass a body of unknown length on as it arrives, counting; past ``max_bytes``
        the app's reading fails, and its answer is replaced with a 413."""
        received = 0
        too_large: PayloadTooLarge | None = None

        async def counted() -> Message:
            nonlocal received, too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                too_large = PayloadTooLarge(
                    f"request body is over {self.max_bytes} bytes, the most this server reads"
                )
                raise too_large
            return message

        async def send_unless_refused(message: Message) -> None:
            if too_large is None:
                await send(message)

        try:
            await self.app(scope, counted, send_unless_refused)
        except Exception:
            if too_large is None:
                raise
        if too_large is not None:
            await too_large.response()(scope, receive, send)

    def refusal(self, headers: dict[bytes, bytes]) -> ClientError | None:
        declared = headers.get(b"content-length")
        if declared is not None and not declared.isdigit():
            return InvalidRequest("Content-Length must be a number of bytes")
        if declared is not None and int(declared) > self.max_bytes:
            return PayloadTooLarge(
                f"request body is {int(declared)} bytes; at most {self.max_bytes}"
            )
        media_type, *parameters = headers.get(b"content-type", b"").split(b";")
        boundary = (p.split(b"=", 1) for p in parameters if b"=" in p)
        has_boundary = any(
            k.strip(OWS).lower() == b"boundary" and v.strip(OWS) for k, v in boundary
        )
        if media_type.strip(OWS).lower().startswith(b"multipart/") and not has_boundary:
            return InvalidRequest("multipart Content-Type needs a boundary")
        return None


def _one_spelling(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` with the Content-Type in the spelling that is checked and acted on;
    raises the client's error for a body that must not be read: two Content-Types or
    Content-Lengths (each reader would take another one), or a media type outside
    ``READABLE_MEDIA_TYPES``. A request without a Content-Type is read as JSON, by
    BentoML as by the application."""
    for name in (b"content-type", b"content-length"):
        if sum(n.lower() == name for n, _ in headers) > 1:
            raise InvalidRequest(f"send one {name.decode().title()} header, not several")
    declared = next((v for n, v in headers if n.lower() == b"content-type"), None)
    if declared is None or not _has_body(headers):
        return headers
    media_type, separator, parameters = declared.partition(b";")
    media_type = media_type.strip(OWS).lower()
    if media_type not in READABLE_MEDIA_TYPES or not declared.isascii():
        raise UnsupportedMediaType(
            f"Content-Type {ascii(declared.decode('latin-1'))[:100]} is not read here: send "
            + ", ".join(m.decode() for m in READABLE_MEDIA_TYPES[:-1])
            + f" or {READABLE_MEDIA_TYPES[-1].decode()}"
        )
    spelled = media_type + separator + parameters
    return [(n, spelled if n.lower() == b"content-type" else v) for n, v in headers]


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    names = {n.lower(): v for n, v in headers}
    return names.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in names


# A request's scope key for the Retry-After of an error raised where BentoML builds the
# answer itself (while it reads the request), without the header.
RETRY_AFTER = "sdxl_controlnet.retry_after_s"


class ErrorBodies:
    """Every error answer in the one shape, ``{"error": ...}`` (``errors.in_shape``),
    including those BentoML builds itself: a list from its 4xx branch, plain text from
    ``/readyz`` and unknown routes. Answers under 400 pass untouched. A client's error
    is logged in one line, not with BentoML's stack trace."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        logger = logging.getLogger(BENTOML_EXCEPTION_LOGGER)
        if not any(isinstance(f, ClientErrorTraces) for f in logger.filters):
            logger.addFilter(ClientErrorTraces())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start: Message | None = None
        chunks: list[bytes] = []
        started = False  # whether an answer began to leave

        async def reshape(message: Message) -> None:
            nonlocal start, started
            started = started or message["type"] == "http.response.start"
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = json.dumps(in_shape(start["status"], b"".join(chunks))).encode()
            headers = [
                (name, value)
                for name, value in start.get("headers", [])
                if name.lower() not in (b"content-length", b"content-type")
            ]
            if RETRY_AFTER in scope and not any(n.lower() == b"retry-after" for n, _ in headers):
                headers.append((b"retry-after", str(scope[RETRY_AFTER]).encode()))
            headers += [
                (b"content-length", str(len(body)).encode()),
                (b"content-type", b"application/json"),
            ]
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        try:
            await self.app(scope, receive, reshape)
        except Exception:
            if started:
                raise
            # Unanswered, BentoML's timeout middleware would hold the client for the whole
            # timeout, and report nothing.
            logger.exception("%s %s failed on the server", scope["method"], scope["path"])
            await JSONResponse(error_body(SERVER_FAILURE), status_code=500)(scope, receive, send)
