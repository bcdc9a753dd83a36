"""The one path every generating endpoint takes: preprocess on the CPU, call the GPU
Service, and take its images back, with the settings and stage times that made them."""

from __future__ import annotations

import asyncio
import typing as t
from collections.abc import AsyncIterator
from dataclasses import dataclass

from PIL import Image

from .. import streaming
from ..bentoml_compat import connections
from ..cancellation import cancel_on_disconnect
from ..errors import from_gpu_failure, gpu_call_errors, raise_for_answer
from ..schemas import BatchResult, GPURequest, Params
from ..settings import settings
from ..streaming import Progress
from . import preprocessing, references
from .admission import DECODING, pixels
from .results import Generation, Timings


@dataclass
class Prepared:
    """A request ready for the GPU: what it sends, and its parameters resolved."""

    request: GPURequest
    params: Params
    timings: Timings


async def prepare(
    image: Image.Image,
    params: Params,
    init_image: Image.Image | None = None,
    mask: Image.Image | None = None,
) -> Prepared:
    """Preprocess on a worker thread; bad input raises its 400 here, before any GPU work."""
    timings = Timings()
    with timings.stage("preprocess"):
        pictures = await references.control_pictures(params.controls)
        with DECODING.held(pixels(image, init_image, mask, *pictures)):
            request, resolved = await asyncio.to_thread(
                preprocessing.prepare, image, params, init_image, mask, pictures
            )
    return Prepared(request, resolved, timings)


async def run(gpu: t.Any, prepared: Prepared, progress: Progress | None = None) -> Generation:
    """Generate on ``gpu`` (what ``bentoml.depends`` gave): in one call, or through its
    stream to hear of each step and preview. The caller leaving, or being canceled, stops
    the GPU."""
    arguments = prepared.request.arguments()
    timeout_s = settings.generation_timeout_s
    with prepared.timings.stage("generate"), gpu_call_errors(timeout_s):
        if progress is None:
            async with asyncio.timeout(timeout_s):
                answer = await cancel_on_disconnect(
                    connections.resend(lambda: gpu.generate(**arguments))
                )
            images = raise_for_answer(answer)
        else:
            stream = connections.resend_stream(lambda: gpu.generate_stream(**arguments))
            async for kind, data in streaming.relay(stream, timeout_s):
                if kind == "images":
                    images = data
                else:
                    await progress(kind, data)
    request, params = prepared.request, prepared.params
    if request.mask is not None and params.keep_unmasked:
        with prepared.timings.stage("keep_unmasked"):
            images = await asyncio.to_thread(
                preprocessing.keep_unmasked,
                images,
                request.init_image,
                request.mask,
                params.mask_blur,
            )
    return Generation(request.first_control(), images, params, prepared.timings)


async def generation(
    gpu: t.Any,
    image: Image.Image,
    params: Params,
    init_image: Image.Image | None = None,
    mask: Image.Image | None = None,
    progress: Progress | None = None,
) -> Generation:
    """``prepare`` and ``run``: a request's images, from its upload to the GPU and back."""
    return await run(gpu, await prepare(image, params, init_image, mask), progress)


async def batch_result(
    gpu: t.Any,
    image: Image.Image,
    params: Params,
    init_image: Image.Image | None = None,
    mask: Image.Image | None = None,
    progress: Progress | None = None,
) -> BatchResult:
    """``generation``, answered as ``/generate_batch`` answers."""
    return await (await generation(gpu, image, params, init_image, mask, progress)).batch_result()


async def events(gpu: t.Any, prepared: Prepared) -> AsyncIterator[str]:
    """``run`` as server-sent events: ``progress`` after each step, ``preview`` where asked,
    then ``result`` (what ``/generate_batch`` answers) or ``error``. Closing it stops the
    generation."""

    async def produce(push: t.Callable[[str], None]) -> str:
        async def progress(kind: str, event: dict[str, t.Any]) -> None:
            push(streaming.server_sent_event(kind, event))

        try:
            result = await (await run(gpu, prepared, progress)).batch_result()
            return streaming.server_sent_event("result", result.model_dump_json())
        except Exception as exc:  # every failure reaches the client as an event
            return streaming.error_event(from_gpu_failure(exc, settings.generation_timeout_s))

    async for event in streaming.pushed(produce):
        yield event
