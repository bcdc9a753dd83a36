"""An abandoned stream from the GPU Service stays open.

``AsyncClient._parse_stream_response`` (``_bentoml_impl/client/proxy2.py``) closes the
response only once the stream has ended, so when the front stops reading (its client left,
a job was canceled), the GPU Service goes on generating for nobody. Wrapped, the response is
closed when its reader leaves, and the closed connection is what stops the GPU Service at
its next step. No longer needed when upstream closes it in a ``finally``.
"""

from __future__ import annotations

import typing as t

UPSTREAM = {
    ("_bentoml_impl.client.proxy2", "AsyncClient._parse_stream_response"): (
        "(self, endpoint: 'ClientEndpoint', resp: 'aiohttp.ClientResponse') "
        "-> 't.AsyncGenerator[t.Any, None]'"
    ),
}


async def _read_then_close(read_stream: t.Callable, self: t.Any, endpoint: t.Any, resp: t.Any):
    try:
        async for chunk in read_stream(self, endpoint, resp):
            yield chunk
    finally:
        resp.close()


def apply() -> None:
    from _bentoml_impl.client.proxy2 import AsyncClient

    read_stream = AsyncClient._parse_stream_response
    if getattr(read_stream, "closes_abandoned_streams", False):
        return

    def read_then_close(self: t.Any, endpoint: t.Any, resp: t.Any) -> t.AsyncGenerator:
        return _read_then_close(read_stream, self, endpoint, resp)

    read_then_close.closes_abandoned_streams = True  # type: ignore[attr-defined]
    read_then_close.__wrapped__ = read_stream  # type: ignore[attr-defined]
    AsyncClient._parse_stream_response = read_then_close
