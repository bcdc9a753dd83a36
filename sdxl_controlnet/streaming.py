"""The progress stream on the wire: newline-delimited JSON from the GPU Service
to the front, server-sent events from the front to the client."""

from __future__ import annotations

import base64
import json
import typing as t
from collections.abc import AsyncIterator

import numpy as np


def progress_line(step: int, total: int) -> str:
    return json.dumps({"step": step, "total": total}) + "\n"


def images_line(images: np.ndarray) -> str:
    """The raw uint8 array, so that encoding to the client's format happens
    once, on the front. ASCII only: the client decodes each chunk on its own."""
    data = base64.b64encode(images.tobytes()).decode("ascii")
    return json.dumps({"shape": images.shape, "images": data}) + "\n"


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


def server_sent_event(event: str, data: dict[str, t.Any] | str) -> str:
    """One server-sent event; ``data`` is JSON, on one line as the format requires."""
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"event: {event}\ndata: {payload}\n\n"
