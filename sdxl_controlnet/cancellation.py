"""Stop work nobody will read: cancel an awaitable when the HTTP client leaves, or when
whatever else is asked says so (a job's runner asks its store whether it was canceled)."""

from __future__ import annotations

import asyncio
import typing as t

import bentoml

from .errors import ClientDisconnected

T = t.TypeVar("T")

POLL_S = 0.25


async def stopped(
    task: asyncio.Future[t.Any], stop: t.Callable[[], t.Awaitable[bool]], every_s: float
) -> bool:
    """Wait for ``task``, asking ``stop()`` every ``every_s`` while it runs, and cancel it
    once the answer is yes. Whether it was stopped so."""
    while not (await asyncio.wait({task}, timeout=every_s))[0]:
        if await stop():
            task.cancel()
            return True
    return False


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
        if request is not None and await stopped(task, request.is_disconnected, POLL_S):
            raise ClientDisconnected
        return await task
    finally:
        task.cancel()
