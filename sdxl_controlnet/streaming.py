"""The progress stream on the wire: newline-delimited JSON from the GPU Service
to the front, server-sent events from the front to the client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import typing as t
from collections.abc import AsyncIterator

import numpy as np

from .errors import ClientError, GPUServiceUnavailable, error_for_status

# Where the front hears of each step, as ``relay`` yields it: ("progress", {"step", "total",
# "elapsed_s"}) after each, and ("preview", {... and "image"}) where the request asked for one.
Progress = t.Callable[[str, dict[str, t.Any]], t.Awaitable[None]]
# A preview's long side at most, in pixels: enough to watch the picture form, a few KB.
PREVIEW_MAX_SIDE = 256


def progress_line(step: int, total: int) -> str:
    return json.dumps({"step": step, "total": total}) + "\n"


def preview_line(step: int, total: int, webp: bytes) -> str:
    """A preview of the image after ``step``: a small WebP, base64-encoded."""
    image = base64.b64encode(webp).decode("ascii")
    return json.dumps({"step": step, "total": total, "image": image}) + "\n"


def images_line(images: np.ndarray) -> str:
    """The raw uint8 array, so that encoding to the client's format happens
    once, on the front. ASCII only: the client decodes each chunk on its own."""
    data = base64.b64encode(images.tobytes()).decode("ascii")
    return json.dumps({"shape": images.shape, "images": data}) + "\n"


def error_line(error: ClientError) -> str:
    """A failure after the stream started: the status and body it would have had."""
    return json.dumps(error.body_with_status()) + "\n"


def decode_images(event: dict[str, t.Any]) -> np.ndarray:
    """The array that ``images_line`` sent."""
    pixels = np.frombuffer(base64.b64decode(event["images"]), dtype=np.uint8)
    return pixels.reshape(event["shape"])


async def read_lines(chunks: AsyncIterator[str]) -> AsyncIterator[dict[str, t.Any]]:
    """Each JSON line of a stream whose chunks may end anywhere, even mid-line."""
    partial: list[str] = []
    async for chunk in chunks:
        *ends, rest = chunk.split("\n")
        for end in ends:
            yield json.loads("".join([*partial, end]))
            partial = []
        partial.append(rest)


async def pushed(
    run: t.Callable[[t.Callable[[str], None]], t.Awaitable[str]],
) -> AsyncIterator[str]:
    """Each line ``run`` pushes while it runs (from any thread: the GPU's pushes from the
    pipeline's), then the line it returns. Closing it cancels ``run``, and waits for it."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def push(line: str) -> None:
        loop.call_soon_threadsafe(lines.put_nowait, line)

    running = asyncio.ensure_future(run(push))
    # After every line pushed before it ended: call_soon queues behind call_soon_threadsafe.
    running.add_done_callback(lambda _: loop.call_soon(lines.put_nowait, None))
    try:
        while (line := await lines.get()) is not None:
            yield line
        yield running.result()
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


def server_sent_event(event: str, data: dict[str, t.Any] | str) -> str:
    """One server-sent event; ``data`` is JSON, on one line as the format requires."""
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"event: {event}\ndata: {payload}\n\n"


def error_event(error: ClientError) -> str:
    """A failure as a server-sent event: the status and body the request would have had."""
    return server_sent_event("error", error.body_with_status())


async def relay(
    gpu_stream: AsyncIterator[str], timeout_s: float
) -> AsyncIterator[tuple[str, t.Any]]:
    """The GPU Service's stream as ``("progress", event)`` and ``("preview", event)`` items,
    each with the seconds elapsed, then one ``("images", array)``; an error line raises its
    ClientError.

    Leaving early closes the GPU stream at once, and that stops the GPU."""
    start = time.perf_counter()
    async with asyncio.timeout(timeout_s), contextlib.aclosing(gpu_stream):
        async for event in read_lines(gpu_stream):
            if "error" in event:
                raise error_for_status(event.pop("status"), event)
            if "images" in event:
                yield "images", decode_images(event)
                return
            event["elapsed_s"] = round(time.perf_counter() - start, 2)
            yield ("preview" if "image" in event else "progress"), event
    raise GPUServiceUnavailable("the GPU Service stopped before the images were ready")
