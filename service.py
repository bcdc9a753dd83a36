"""Distributed SDXL ControlNet on BentoML.

A request enters ``ControlNet`` (CPU), which checks the upload, turns it into a
one-channel edge map at the output size and sends it to ``SDXLControlNetService``
(GPU). That runs diffusers' SDXL ControlNet pipeline and returns uint8 images, which
the front encodes once, as the client asked. Only the GPU Service imports torch
(``sdxl_controlnet/gpu/``); the front's code is ``sdxl_controlnet/front/``.
"""

from __future__ import annotations

import asyncio
import typing as t
from pathlib import Path

import bentoml
from PIL import Image
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

from sdxl_controlnet import bentoml_compat
from sdxl_controlnet.bentoml_compat import connections
from sdxl_controlnet.cancellation import cancel_on_disconnect
from sdxl_controlnet.errors import ONE_IMAGE, InvalidRequest, answers_errors
from sdxl_controlnet.front import gpu_call, jobs, preprocessing, readiness, webhooks
from sdxl_controlnet.front.encoding import MEDIA_TYPES, encode_image
from sdxl_controlnet.front.job_endpoints import JobEndpoints
from sdxl_controlnet.front.preprocessing import ImageUpload
from sdxl_controlnet.gpu import model_refs
from sdxl_controlnet.gpu.worker import GPUWorker
from sdxl_controlnet.middleware import BodyGuard, ErrorBodies
from sdxl_controlnet.schemas import (
    BatchResult,
    EdgeMap,
    EdgeParams,
    GenerationParams,
    Images,
    OptionalMask,
    OptionalPicture,
    Params,
    TaskParams,
)
from sdxl_controlnet.settings import settings
from sdxl_controlnet.streaming import Progress

# What the front keeps of its jobs, shared by its workers (front/jobs.py).
JOBS = jobs.JobStore(jobs.default_path())


@bentoml.service(
    # One worker per GPU, each pinned to its own (pipeline.select_device).
    resources={"gpu": settings.gpus, "gpu_type": settings.gpu_type},
    workers=settings.gpus,
    # Beyond max_concurrency BentoML answers 429 at once: a bounded queue, not a pile-up.
    traffic={"timeout": settings.generation_timeout_s, "max_concurrency": settings.max_queue},
    runner_connection=connections.NEVER_RECYCLE,
)
@model_refs.with_adapters(settings.lora_adapters)  # LoRA adapters, declared like the models
class SDXLControlNetService:
    # BentoML model references (`bentoml build` records them, `bentoml serve` downloads the
    # included files before the workers start) or local directories: each reads as a directory.
    base = model_refs.reference(settings.sdxl_base_model, model_refs.BASE_INCLUDE)
    controlnet = model_refs.reference(settings.sdxl_controlnet_model, model_refs.CONTROLNET_INCLUDE)
    vae = model_refs.reference(settings.sdxl_vae_model, model_refs.VAE_INCLUDE)

    def __init__(self) -> None:
        from sdxl_controlnet.gpu.pipeline import ControlNetPipeline, select_device

        pipeline = ControlNetPipeline(
            self.base,
            self.controlnet,
            self.vae,
            device=select_device(settings.allow_cpu, bentoml.server_context.worker_index),
            channels_last=settings.channels_last,
            fuse_qkv=settings.fuse_qkv,
            compile_sizes=settings.compile_sizes,
            compile_mode=settings.torch_compile_mode,
            adapters=model_refs.adapter_sources(self, settings.lora_adapters),
        )
        self.worker = GPUWorker(pipeline, settings.generation_timeout_s)

    @bentoml.api
    @answers_errors
    async def generate(
        self,
        edges: EdgeMap,
        params: GenerationParams,
        init_image: OptionalPicture = None,
        mask: OptionalMask = None,
    ) -> Images:
        """Generate images that follow ``edges``, an H×W uint8 Canny edge map: from noise,
        or from ``init_image`` at ``params.strength``, repainting where ``mask`` is white."""
        run = self.worker.run(edges, params, init_image=init_image, mask=mask)
        return await cancel_on_disconnect(run)

    @bentoml.api
    async def generate_stream(
        self,
        edges: EdgeMap,
        params: GenerationParams,
        init_image: OptionalPicture = None,
        mask: OptionalMask = None,
    ) -> t.AsyncGenerator[str, None]:
        """Like ``generate``, as JSON lines: ``{"step", "total"}`` at once and after each step,
        then ``{"shape", "images"}`` (raw uint8) or ``{"status", "error"}``; closing it stops."""
        async for line in self.worker.stream(edges, params, init_image=init_image, mask=mask):
            yield line


# The browser studio: plain files that call the APIs below, like any other client.
@bentoml.asgi_app(
    StaticFiles(directory=Path(__file__).parent / "studio", html=True), path="/studio"
)
@bentoml.service(
    workers=settings.front_workers,
    traffic={"timeout": settings.front_timeout_s},
    runner_probe=readiness.NO_RUNNER_PROBE,  # __is_ready__ asks the GPU Service instead
)
class ControlNet:
    """The public CPU front. It runs no ControlNet itself: the name is the original
    example's, kept because clients and BentoCloud configurations refer to it."""

    controlnet_service = bentoml.depends(SDXLControlNetService)  # the SDXL GPU Service

    def __init__(self) -> None:
        bentoml_compat.apply_to_front(allow_untested=settings.allow_untested_bentoml)

    @bentoml.on_deployment
    def empty_job_store() -> None:
        """Once per ``bentoml serve``, before the workers start: jobs start afresh."""
        JOBS.reset()

    async def __is_ready__(self) -> bool:
        """``/readyz``: 200 once the GPU Service answers ready, 503 until then, in seconds."""
        return await readiness.dependency_ready(self.controlnet_service)

    @bentoml.api
    @answers_errors
    async def generate(
        self,
        image: ImageUpload,
        params: Params,
        init_image: ImageUpload | None = None,
        mask: ImageUpload | None = None,
    ) -> Image.Image:
        """Generate an image that follows the edges of ``image``: from noise, from
        ``init_image`` (or ``image`` itself, given a ``params.strength``), repainting only
        where ``mask`` is white. See docs/api.md.

        The reply is the image in ``params.output_format`` (sent as a Response, to
        carry headers): ``X-Seed`` holds the seed used, ``X-Params`` every resolved
        setting, ``Server-Timing`` the stage times.
        """
        if params.num_images > 1:
            raise InvalidRequest(ONE_IMAGE.format(params.num_images))
        prepared = await gpu_call.prepare(image, params, init_image, mask)
        generation = await gpu_call.run(self.controlnet_service, prepared)
        with generation.timings_ms.stage("encode"):
            body = await asyncio.to_thread(encode_image, generation.images[0], params.output_format)
        return Response(
            body, media_type=MEDIA_TYPES[params.output_format], headers=generation.headers()
        )

    @bentoml.api
    @answers_errors
    async def generate_batch(
        self,
        image: ImageUpload,
        params: Params,
        init_image: ImageUpload | None = None,
        mask: ImageUpload | None = None,
    ) -> BatchResult:
        """Generate ``params.num_images`` images; return them base64-encoded with the
        control image, the seed of each image, the resolved settings and the timings."""
        prepared = await gpu_call.prepare(image, params, init_image, mask)
        return await (await gpu_call.run(self.controlnet_service, prepared)).batch_result()

    @bentoml.task
    @answers_errors
    async def generate_task(
        self,
        image: ImageUpload,
        params: TaskParams,
        init_image: ImageUpload | None = None,
        mask: ImageUpload | None = None,
    ) -> BatchResult:
        """``/generate_batch`` as a job: ``/generate_task/submit`` answers at once with a
        ``task_id``; ``/status`` (with the steps done), ``/get`` and ``/cancel`` take it;
        ``params.webhook`` has the outcome delivered. See docs/api.md."""

        async def work(progress: Progress | None) -> BatchResult:
            prepared = await gpu_call.prepare(image, params, init_image, mask)
            generation = await gpu_call.run(self.controlnet_service, prepared, progress)
            return await generation.batch_result()

        on_end = webhooks.on_job_end(params.webhook, params.webhook_events)
        return await jobs.run(JOBS, jobs.current_task_id(), work, on_end)

    @bentoml.api
    async def generate_stream(
        self,
        image: ImageUpload,
        params: Params,
        init_image: ImageUpload | None = None,
        mask: ImageUpload | None = None,
    ) -> t.AsyncGenerator[str, None]:
        """``/generate_batch`` as server-sent events, for long generations.

        ``progress`` events carry ``step`` of ``total`` and ``elapsed_s``; then one
        ``result`` event carries what ``/generate_batch`` returns. Bad input is a 400
        before the stream starts; any later failure is an ``error`` event with the
        body and ``status`` the same failure gets from ``/generate_batch``. A client
        that disconnects stops the generation.
        """
        prepared = await gpu_call.prepare(image, params, init_image, mask)
        async for event in gpu_call.events(self.controlnet_service, prepared):
            yield event

    @bentoml.api
    @answers_errors
    async def canny(self, image: ImageUpload, params: EdgeParams | None = None) -> Image.Image:
        """The control image ``/generate`` would send the GPU, as a PNG, computed here on
        the CPU: tune thresholds, or check a ready-made one, without spending GPU time."""
        edges = await asyncio.to_thread(preprocessing.edge_map, image, params or EdgeParams())
        return Response(encode_image(edges, "png"), media_type=MEDIA_TYPES["png"])


# Every error answer is {"error": ...}, whoever builds it; oversized or malformed uploads
# are refused before they are read, let alone decoded; jobs answer as docs/api.md says.
ControlNet.add_asgi_middleware(ErrorBodies)
ControlNet.add_asgi_middleware(BodyGuard, max_bytes=settings.max_upload_bytes)
ControlNet.add_asgi_middleware(JobEndpoints, service=ControlNet, api="generate_task", store=JOBS)
SDXLControlNetService.add_asgi_middleware(ErrorBodies)
