"""The front's connections to the GPU Service, and two defects of BentoML 1.4.40 in them.

Connection recycling fails requests in flight. The Service-to-Service client
(``_bentoml_impl/client/proxy2.py``, ``SessionManager``) replaces its aiohttp session after
``max_requests`` (100) or ``max_age`` (300 s) and closes the old one with requests still
running on it, so queued generations failed under load. Passed as the GPU Service's
``runner_connection`` (public configuration, not a patch), ``NEVER_RECYCLE``'s limits are
never reached. No longer needed when ``SessionManager`` waits for the requests in flight
before closing a session.

An idle connection is closed under the next call. A dependency Service's workers get
uvicorn's keep-alive of 5 s (``create_dependency_watcher``, ``_bentoml_impl/server/
serving.py``, passes no ``--timeout-keep-alive``; ``bentoml serve --timeout-keep-alive``
reaches the entry Service alone), while the client keeps an idle connection for aiohttp's
15 s. A call that takes a connection the GPU Service is closing fails with an OS error
(a broken pipe, "Can not write request body") before the GPU Service has read it, so
``resend`` and ``resend_stream`` send it once more, on a fresh connection. A GPU Service
that goes away after reading a request closes cleanly instead (``ServerDisconnectedError``),
and that call is not sent again. No longer needed when a dependency Service takes the
keep-alive setting, or the client lets an idle connection go before the server does.
"""

from __future__ import annotations

import contextlib
import logging
import typing as t
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp

logger = logging.getLogger("bentoml").getChild(__name__)

NEVER = 2**31 - 1  # requests, or seconds (68 years)
NEVER_RECYCLE = {"max_requests": NEVER, "max_age": float(NEVER)}

T = t.TypeVar("T")


def _log_resend(exc: aiohttp.ClientOSError) -> None:
    logger.warning("the GPU Service closed the connection before reading a call (%r): resent", exc)


async def resend(call: Callable[[], Awaitable[T]]) -> T:
    """``call()``, made once more if its connection failed before the GPU Service read it."""
    try:
        return await call()
    except aiohttp.ClientOSError as exc:
        _log_resend(exc)
    return await call()


async def resend_stream(call: Callable[[], AsyncIterator[str]]) -> AsyncIterator[str]:
    """``call()``'s stream, opened once more if its connection failed before the GPU
    Service read it (which shows at the first item). Closing it closes the stream."""
    stream = call()
    try:
        first = await anext(stream, None)
    except aiohttp.ClientOSError as exc:
        _log_resend(exc)
        stream = call()
        first = await anext(stream, None)
    async with contextlib.aclosing(stream):  # type: ignore[type-var]
        if first is None:
            return
        yield first
        async for item in stream:
            yield item
