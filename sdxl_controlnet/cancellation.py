"""Stop work nobody will read: cancel an awaitable when the HTTP client leaves."""

from __future__ import annotations

import asyncio
import typing as t

import bentoml

T = t.TypeVar("T")

POLL_S = 0.25


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready."""


async def cancel_on_disconnect(awaitable: t.Awaitable[T]) -> T:
    """Await ``awaitable``, cancelling it if the current request's client disconnects.

    Outside a request (an in-process call) it simply awaits.
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


def close_abandoned_streams() -> None:
    """Make BentoML's Service-to-Service client close a streamed response that
    its reader leaves early: closing the connection is what tells the other
    Service to stop.

    bentoml 1.4.40 closes it only once the stream has ended, so a front whose
    client had gone kept the GPU Service generating for nobody.
    """
    from _bentoml_impl.client.proxy2 import AsyncClient

    read_stream = AsyncClient._parse_stream_response

    async def read_then_close(
        self: AsyncClient, endpoint: t.Any, resp: t.Any
    ) -> t.AsyncGenerator[t.Any, None]:
        try:
            async for chunk in read_stream(self, endpoint, resp):
                yield chunk
        finally:
            resp.close()

    AsyncClient._parse_stream_response = read_then_close
