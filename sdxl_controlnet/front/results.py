"""What the front hands back: the generated images with the settings and stage
timings that produced them, as headers or as a JSON result."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import typing as t
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from starlette.responses import Response

from ..schemas import BatchResult, GeneratedImage, Params
from .encoding import MEDIA_TYPES, encode_base64, encode_image


class Timings(dict[str, float]):
    """Milliseconds per stage, in the order the stages ran."""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = round((time.perf_counter() - start) * 1000, 1)


@dataclass
class Generation:
    """What one request produced, and the settings that produced it."""

    edges: np.ndarray  # the control image that steers first
    images: np.ndarray
    params: Params  # seed, width and height resolved
    timings_ms: Timings = field(default_factory=Timings)

    def headers(self) -> dict[str, str]:
        # Prompts and control images stay out: they can be long, and the client sent them.
        left_out: dict[str, t.Any] = {"controls": {"__all__": {"image"}}}
        left_out |= dict.fromkeys(
            ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2"), True
        )
        settings_used = self.params.model_dump(exclude=left_out)
        return {
            "X-Seed": str(self.params.seed),
            "X-Params": json.dumps(settings_used, separators=(",", ":")),
            "Server-Timing": ", ".join(f"{k};dur={v:.1f}" for k, v in self.timings_ms.items()),
        }

    async def response(self) -> Response:
        """The one image in the requested format, with the headers that say how it was made."""
        fmt = self.params.output_format
        with self.timings_ms.stage("encode"):
            body = await asyncio.to_thread(encode_image, self.images[0], fmt)
        return Response(body, media_type=MEDIA_TYPES[fmt], headers=self.headers())

    async def batch_result(self) -> BatchResult:
        """Every image base64-encoded in the requested format, with its seed."""
        fmt = self.params.output_format
        with self.timings_ms.stage("encode"):
            images = await asyncio.to_thread(lambda: [encode_base64(i, fmt) for i in self.images])
            edge_map = await asyncio.to_thread(encode_base64, self.edges, "png")
        seed = self.params.seed
        assert seed is not None, "params are resolved"
        return BatchResult(
            images=[GeneratedImage(image=data, seed=seed + i) for i, data in enumerate(images)],
            edge_map=edge_map,
            params=self.params,
            timings_ms=self.timings_ms,
        )
