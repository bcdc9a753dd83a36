"""Stop work nobody will read: cancel an awaitable when the HTTP client leaves."""

from __future__ import annotations

import asyncio
import typing as t

import bentoml

from .errors import ClientDisconnected

T = t.TypeVar("T")

POLL_S = 0.25


async def cancel_on_disconnect(awaitable: t.Awaitable[T]) -> T:
    """Await ``awaitable``, cancelling it if the current request's client disconnects.

    Outside a request (an in-process call, or a job's runner: a job is stopped through
    ``/cancel``, ``front/job_runner.py``) it simply awaits.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        request = bentoml.Context().request
    except LookupError:
        request = None
    try:
        while request is not None:
            done, _ = await asyncio.wait({task}, timeout=POLL_S)
            if done:
                break
            if await request.is_disconnected():
                raise ClientDisconnected
        return await task
    finally:
        task.cancel()
