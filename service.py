"""Distributed SDXL ControlNet on BentoML.

A request enters ``ControlNet`` (CPU): the upload is checked from its header,
decoded and turned into a Canny edge map at the output size. The one-channel
edge map and the generation parameters cross to ``SDXLControlNetService``
(GPU), which runs diffusers' SDXL ControlNet pipeline and returns the images as
a uint8 array. The front encodes them once, in the format the client asked for.

torch and diffusers are imported only inside the GPU Service, so the CPU tier's
workers stay small.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import typing as t
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bentoml
import numpy as np
from PIL import Image
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

from sdxl_controlnet import metrics, preprocessing, settings, streaming
from sdxl_controlnet.cancellation import (
    ClientDisconnected,
    cancel_on_disconnect,
    close_abandoned_streams,
)
from sdxl_controlnet.encoding import MEDIA_TYPES, encode_base64, encode_image
from sdxl_controlnet.errors import (
    CLIENT_CLOSED_REQUEST,
    GenerationCancelled,
    GPUServiceUnavailable,
    InvalidRequest,
    errors_as_json,
    gpu_call_errors,
)
from sdxl_controlnet.middleware import BodyGuard
from sdxl_controlnet.schemas import (
    BatchResult,
    EdgeParams,
    GeneratedImage,
    GenerationParams,
    ImageUpload,
    Params,
    check_edge_map,
)

# A child of BentoML's logger, so INFO lines reach the server log like BentoML's own.
logger = logging.getLogger("bentoml").getChild(__name__)

# BentoML 1.4.40 keeps a Service-to-Service stream open after its reader leaves;
# closing it is what stops an abandoned generation.
close_abandoned_streams()

NEVER = 2**31 - 1  # requests, or seconds (68 years)
EdgeMap = np.ndarray[t.Any, np.dtype[np.uint8]]  # H×W, one channel, 0 or 255
Images = np.ndarray[t.Any, np.dtype[np.uint8]]  # N×H×W×3 RGB


@bentoml.service(
    resources={"gpu": 1, "gpu_type": "nvidia-l4"},
    workers=1,
    # Beyond max_concurrency BentoML answers 503 at once: a bounded queue, not a pile-up.
    traffic={"timeout": settings.GENERATION_TIMEOUT_S, "max_concurrency": settings.MAX_QUEUE},
    # Callers' clients must never recycle their connection pool: bentoml 1.4.40 closes
    # the old pool after max_requests or max_age, failing the requests still in flight.
    runner_connection={"max_requests": NEVER, "max_age": float(NEVER)},
)
class SDXLControlNetService:
    def __init__(self) -> None:
        from sdxl_controlnet.pipeline import ControlNetPipeline

        self.pipeline = ControlNetPipeline(
            settings.BASE_MODEL, settings.CONTROLNET_MODEL, settings.VAE_MODEL
        )
        # One generation at a time: the rest wait here instead of fighting for GPU memory.
        self.gpu_lock = asyncio.Lock()

    @bentoml.api
    async def generate(self, edges: EdgeMap, params: GenerationParams) -> Images:
        """Generate images that follow ``edges``, an H×W uint8 Canny edge map."""
        check_edge_map(edges)
        try:
            return await cancel_on_disconnect(self._run(edges, params.with_seed()))
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_REQUEST)

    @bentoml.api
    async def generate_stream(
        self, edges: EdgeMap, params: GenerationParams
    ) -> t.AsyncGenerator[str, None]:
        """Like ``generate``, as JSON lines: ``{"step", "total"}`` at once (step 0,
        waiting for the GPU) and after each denoising step, then ``{"shape", "images"}``
        with the raw uint8 array. Closing the stream stops the generation."""
        check_edge_map(edges)
        yield streaming.progress_line(0, params.num_inference_steps)
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue()

        def on_step(done: int, total: int) -> None:
            # Called on the pipeline's thread; asyncio queues belong to the loop's.
            loop.call_soon_threadsafe(steps.put_nowait, (done, total))

        job = asyncio.ensure_future(self._run(edges, params.with_seed(), on_step))
        job.add_done_callback(lambda _: steps.put_nowait(None))
        try:
            while step := await steps.get():
                yield streaming.progress_line(*step)
            images = job.result()
        finally:
            job.cancel()
        yield streaming.images_line(images)

    async def _run(
        self,
        edges: np.ndarray,
        params: GenerationParams,
        on_step: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Run the pipeline on a worker thread, so health checks and metrics keep
        answering. If the caller is cancelled, the pipeline stops at its next
        step, and the GPU is released only once it has."""
        stop = threading.Event()
        async with metrics.gpu_turn(self.gpu_lock):
            job = asyncio.get_running_loop().run_in_executor(
                None, self.pipeline.generate, edges, params, on_step, stop.is_set
            )
            try:
                images = await asyncio.shield(job)
            except asyncio.CancelledError:
                stop.set()
                with contextlib.suppress(GenerationCancelled):
                    await job
                logger.info("generation cancelled: its caller went away or timed out")
                raise
        metrics.IMAGES_GENERATED.inc(len(images))
        return images


@dataclass
class Generation:
    """What one request produced, and the settings that produced it."""

    edges: np.ndarray
    images: np.ndarray
    params: Params  # seed, width and height resolved
    timings_ms: dict[str, float]

    def headers(self) -> dict[str, str]:
        # Prompts stay out: they can be long, and the client sent them anyway.
        settings_used = self.params.model_dump(
            exclude={"prompt", "prompt_2", "negative_prompt", "negative_prompt_2"}
        )
        return {
            "X-Seed": str(self.params.seed),
            "X-Params": json.dumps(settings_used, separators=(",", ":")),
            "Server-Timing": ", ".join(f"{k};dur={v:.1f}" for k, v in self.timings_ms.items()),
        }


# The browser studio: plain files that call the APIs below, like any other client.
@bentoml.asgi_app(
    StaticFiles(directory=Path(__file__).parent / "studio", html=True), path="/studio"
)
@bentoml.service(workers="cpu_count", traffic={"timeout": settings.GENERATION_TIMEOUT_S + 30})
class ControlNet:
    controlnet_service = bentoml.depends(SDXLControlNetService)

    @bentoml.api
    @errors_as_json
    async def generate(self, image: ImageUpload, params: Params) -> Image.Image:
        """Generate an image that follows the edges of ``image``.

        The reply is the image in ``params.output_format``. ``X-Seed`` holds the seed
        used, ``X-Params`` every resolved setting, ``Server-Timing`` the stage times.
        """
        generation = await self._generate(image, params)
        start = time.perf_counter()
        body = await asyncio.to_thread(encode_image, generation.images[0], params.output_format)
        generation.timings_ms["encode"] = _ms_since(start)
        return Response(
            body, media_type=MEDIA_TYPES[params.output_format], headers=generation.headers()
        )

    @bentoml.api
    @errors_as_json
    async def generate_batch(self, image: ImageUpload, params: Params) -> BatchResult:
        """Generate ``params.num_images`` images; return them base64-encoded with the
        edge map, the seed of each image, the resolved settings and the timings."""
        return await _batch_result(await self._generate(image, params))

    @bentoml.api
    async def generate_stream(
        self, image: ImageUpload, params: Params
    ) -> t.AsyncGenerator[str, None]:
        """``/generate_batch`` as server-sent events, for long generations.

        ``progress`` events carry ``step`` of ``total`` and ``elapsed_s``; then one
        ``result`` event carries what ``/generate_batch`` returns. Bad input is a 400
        before the stream starts; a later failure is an ``error`` event. A client
        that disconnects stops the generation.
        """
        start = time.perf_counter()
        edges, resolved = await self._prepare(image, params)
        timings_ms = {"preprocess": _ms_since(start)}

        gpu_start = time.perf_counter()
        gpu_stream = self.controlnet_service.generate_stream(
            edges=edges, params=resolved.generation_params()
        )
        images = None
        try:
            with gpu_call_errors():
                # Leaving early closes the GPU stream at once, and that stops the GPU.
                async with contextlib.aclosing(gpu_stream):
                    async for event in streaming.read_lines(gpu_stream):
                        if "images" in event:
                            images = streaming.decode_images(event)
                        else:
                            event["elapsed_s"] = round(time.perf_counter() - start, 2)
                            yield streaming.server_sent_event("progress", event)
            if images is None:
                raise GPUServiceUnavailable("the GPU Service stopped before the images were ready")
        except (InvalidRequest, GPUServiceUnavailable) as exc:
            yield streaming.server_sent_event("error", {"error": exc.message})
            return
        timings_ms["generate"] = _ms_since(gpu_start)

        result = await _batch_result(Generation(edges, images, resolved, timings_ms))
        yield streaming.server_sent_event("result", result.model_dump_json())

    @bentoml.api
    @errors_as_json
    async def canny(self, image: ImageUpload, params: EdgeParams | None = None) -> Image.Image:
        """The Canny edge map ``/generate`` would use, as a PNG, computed here on
        the CPU: tune thresholds without spending GPU time."""
        edges = await asyncio.to_thread(preprocessing.edge_map, image, params or EdgeParams())
        return Response(encode_image(edges, "png"), media_type=MEDIA_TYPES["png"])

    async def _generate(self, image: Image.Image, params: Params) -> Generation:
        start = time.perf_counter()
        edges, resolved = await self._prepare(image, params)
        timings_ms = {"preprocess": _ms_since(start)}

        start = time.perf_counter()
        images = await cancel_on_disconnect(self._call_gpu(edges, resolved.generation_params()))
        timings_ms["generate"] = _ms_since(start)
        return Generation(edges, images, resolved, timings_ms)

    async def _prepare(self, image: Image.Image, params: Params) -> tuple[np.ndarray, Params]:
        """The edge map, and ``params`` with the seed, width and height they resolve to."""
        edges = await asyncio.to_thread(preprocessing.edge_map, image, params)
        height, width = edges.shape
        return edges, params.with_seed().model_copy(update={"width": width, "height": height})

    async def _call_gpu(self, edges: np.ndarray, params: GenerationParams) -> np.ndarray:
        """The GPU Service's answer, with its failures turned into errors a client can act on."""
        with gpu_call_errors():
            async with asyncio.timeout(settings.GENERATION_TIMEOUT_S):
                return await self.controlnet_service.generate(edges=edges, params=params)


async def _batch_result(generation: Generation) -> BatchResult:
    """Every image base64-encoded in the requested format, with its seed."""
    start = time.perf_counter()
    fmt = generation.params.output_format
    images = await asyncio.to_thread(lambda: [encode_base64(i, fmt) for i in generation.images])
    edge_map = await asyncio.to_thread(encode_base64, generation.edges, "png")
    generation.timings_ms["encode"] = _ms_since(start)
    seed = generation.params.seed
    return BatchResult(
        images=[GeneratedImage(image=data, seed=seed + i) for i, data in enumerate(images)],
        edge_map=edge_map,
        params=generation.params,
        timings_ms=generation.timings_ms,
    )


# Oversized or malformed uploads are refused before they are read, let alone decoded.
ControlNet.add_asgi_middleware(BodyGuard, max_bytes=settings.MAX_UPLOAD_BYTES)


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 1)
