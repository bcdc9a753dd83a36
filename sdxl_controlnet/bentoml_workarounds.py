"""Workarounds for upstream behaviour of BentoML 1.4.40, the version this project pins.

Each says what it works around, where it lives upstream, and how to tell that it is
no longer needed; ``tests/unit/test_bentoml_workarounds.py`` fails when one stops
taking effect. Upgrading BentoML means re-reading this file: ``apply()`` logs a
warning when another version is installed.

Handled elsewhere, named here so that the list is whole:
- 5xx messages are replaced with a generic one and response headers dropped
  (``_bentoml_impl/server/app.py``, ``api_endpoint_wrapper``): APIs answer their own
  errors with ``errors.answers_errors``.
- A multipart Content-Type without a boundary is a 500 inside BentoML's form parser:
  ``middleware.BodyGuard`` answers it with a 400 before BentoML reads the body.
"""

from __future__ import annotations

import logging
import typing as t

import bentoml

logger = logging.getLogger("bentoml").getChild(__name__)

TESTED_VERSION = "1.4.40"
NEVER = 2**31 - 1  # requests, or seconds (68 years)

# Connection recycling fails requests in flight: the Service-to-Service client
# (``_bentoml_impl/client/proxy2.py``, ``SessionManager``) replaces its aiohttp session
# after ``max_requests`` (100) or ``max_age`` (300 s) and closes the old one with requests
# still running on it, so queued generations failed under load. Passed as the GPU
# Service's ``runner_connection``, these limits are never reached. No longer needed when
# ``SessionManager`` waits for requests in flight before closing a session
# (``tests/e2e/test_load.py`` crosses 100 requests).
NEVER_RECYCLE_CONNECTIONS = {"max_requests": NEVER, "max_age": float(NEVER)}


async def _read_then_close(read_stream: t.Callable, self: t.Any, endpoint: t.Any, resp: t.Any):
    try:
        async for chunk in read_stream(self, endpoint, resp):
            yield chunk
    finally:
        resp.close()


def close_abandoned_streams() -> None:
    """An abandoned stream stays open: ``AsyncClient._parse_stream_response``
    (``_bentoml_impl/client/proxy2.py``) closes the response only once the stream has
    ended, so when the front's client leaves, the GPU Service goes on generating for
    nobody. Wrapped, it closes the response when its reader leaves, and closing the
    connection is what tells the GPU Service to stop. No longer needed when
    upstream closes it in a ``finally``; ``tests/e2e/test_stream.py`` shows whether
    it does."""
    from _bentoml_impl.client.proxy2 import AsyncClient

    read_stream = AsyncClient._parse_stream_response
    if getattr(read_stream, "closes_abandoned_streams", False):
        return

    def read_then_close(self: t.Any, endpoint: t.Any, resp: t.Any) -> t.AsyncGenerator:
        return _read_then_close(read_stream, self, endpoint, resp)

    read_then_close.closes_abandoned_streams = True  # type: ignore[attr-defined]
    AsyncClient._parse_stream_response = read_then_close


def apply() -> None:
    """Apply the workarounds that patch BentoML; safe to call more than once."""
    if bentoml.__version__ != TESTED_VERSION:
        logger.warning(
            "bentoml %s is installed; the workarounds in %s were written for %s: re-check them",
            bentoml.__version__,
            __name__,
            TESTED_VERSION,
        )
    close_abandoned_streams()
