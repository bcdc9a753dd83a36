"""The GPU Service's work: each generation queued for the GPU, run on the pipeline's
own thread, stopped at its next step when its caller leaves, its progress streamed."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import typing as t
from collections.abc import AsyncIterator, Callable

import numpy as np

from .. import logs, metrics, streaming
from ..errors import ClientError, GenerationCanceled
from ..schemas import GPURequest
from .queue import GPUQueue, Work

if t.TYPE_CHECKING:
    from .pipeline import ControlNetPipeline

logger = logs.logger(__name__)  # shown in the server log


class GPUWorker:
    def __init__(self, pipeline: ControlNetPipeline, timeout_s: float) -> None:
        self.pipeline = pipeline
        self.queue = GPUQueue(timeout_s)

    async def run(
        self,
        request: GPURequest,
        on_step: Callable[[int, int], None] | None = None,
        on_preview: Callable[[int, int, bytes], None] | None = None,
    ) -> np.ndarray:
        """The images of ``request``, checked first (and previews, see
        ``ControlNetPipeline.generate``). If the caller is canceled, the pipeline stops at
        its next step, and the GPU is released once it has."""
        params = request.checked().params
        height, width = request.size
        stop = threading.Event()
        work = Work(
            width * height * params.batch, self.pipeline.runs_compiled(height, width, params)
        )
        async with self.queue.turn(work, params.steps) as step_done:

            def report(done: int, total: int) -> None:  # on the pipeline's thread
                step_done()
                if on_step is not None:
                    on_step(done, total)

            generation = asyncio.wrap_future(
                self.pipeline.submit(request, report, stop.is_set, on_preview)
            )
            try:
                images = await asyncio.shield(generation)
            except asyncio.CancelledError:
                stop.set()
                with contextlib.suppress(GenerationCanceled):
                    await generation
                logger.info("generation canceled: its caller went away or timed out")
                raise
        metrics.IMAGES_GENERATED.inc(len(images))
        if self.pipeline.device.startswith("cuda"):
            import torch  # here: service.py imports this module in the torch-free front too

            device = self.pipeline.device
            metrics.GPU_MEMORY_PEAK.labels("allocated").set(torch.cuda.max_memory_allocated(device))
            metrics.GPU_MEMORY_PEAK.labels("reserved").set(torch.cuda.max_memory_reserved(device))
        return images

    async def stream(self, request: GPURequest) -> AsyncIterator[str]:
        """``run`` as JSON lines: progress at once (step 0: waiting for the GPU) and after
        each step, a preview every ``params.preview_every`` steps, then the images, or the
        error. Closing it stops the generation."""

        async def produce(push: t.Callable[[str], None]) -> str:
            def on_step(done: int, total: int) -> None:  # on the pipeline's thread
                push(streaming.progress_line(done, total))

            def on_preview(done: int, total: int, webp: bytes) -> None:
                push(streaming.preview_line(done, total, webp))

            return streaming.images_line(await self.run(request, on_step, on_preview))

        yield streaming.progress_line(0, request.params.steps)
        try:
            async for line in streaming.pushed(produce):
                yield line
        except ClientError as exc:
            yield streaming.error_line(exc)
