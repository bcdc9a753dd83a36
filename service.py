"""Distributed SDXL ControlNet on BentoML: ``ControlNet`` (CPU, ``sdxl_controlnet/front/``)
checks the upload, turns it into an edge map and sends it to ``SDXLControlNetService`` (GPU,
``sdxl_controlnet/gpu/``), which runs diffusers' SDXL ControlNet pipeline."""

from __future__ import annotations

import asyncio
import typing as t
from pathlib import Path

import bentoml
from PIL import Image
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

from sdxl_controlnet import bentoml_compat, middleware, schemas
from sdxl_controlnet.bentoml_compat import connections
from sdxl_controlnet.cancellation import cancel_on_disconnect
from sdxl_controlnet.errors import ONE_IMAGE, InvalidRequest, answers_errors
from sdxl_controlnet.front import admission, gpu_call, preprocessing, readiness, stores, webhooks
from sdxl_controlnet.front.job_endpoints import JobEndpoints
from sdxl_controlnet.front.job_runner import JobRunner
from sdxl_controlnet.front.preprocessing import ImageUpload
from sdxl_controlnet.front.references import ResolveReferences
from sdxl_controlnet.gpu import model_refs
from sdxl_controlnet.gpu.worker import GPUWorker
from sdxl_controlnet.middleware import BodyGuard, ErrorBodies
from sdxl_controlnet.schemas import BatchResult, EdgeParams, Params, TaskParams
from sdxl_controlnet.settings import settings

JOBS = stores.from_settings()  # the front's jobs: one host's, or every replica's (JOB_STORE_URL)
# The browser studio: plain files that call the front's APIs, like any other client.
STUDIO = StaticFiles(directory=Path(__file__).parent / "studio", html=True)


@bentoml.service(
    # One worker per GPU, each pinned to its own (pipeline.select_device).
    resources={"gpu": settings.gpus, "gpu_type": settings.gpu_type},
    workers=settings.gpus,
    # Beyond max_concurrency BentoML answers 429 at once: a bounded queue, not a pile-up.
    traffic={"timeout": settings.generation_timeout_s, "max_concurrency": settings.max_queue},
    runner_connection=connections.NEVER_RECYCLE,
)
@model_refs.with_controlnets(settings.controlnets)  # SDXL_CONTROLNETS: one, several, a Union
@model_refs.with_adapters(settings.lora_adapters)  # LoRA adapters, declared like the models
class SDXLControlNetService:
    # Pinned references (`bentoml build` records, `bentoml serve` downloads them) or folders.
    base = model_refs.reference("SDXL_BASE_MODEL", model_refs.BASE_INCLUDE)
    vae = model_refs.reference("SDXL_VAE_MODEL", model_refs.VAE_INCLUDE)
    preview = model_refs.optional_reference("SDXL_PREVIEW_MODEL", model_refs.PREVIEW_INCLUDE)
    ip_adapter = model_refs.optional_reference("SDXL_IP_ADAPTER", model_refs.ip_adapter_include())

    def __init__(self) -> None:
        from sdxl_controlnet.gpu.pipeline import ControlNetPipeline

        pipeline = ControlNetPipeline.from_settings(settings, **model_refs.folders(self))
        self.worker = GPUWorker(pipeline, settings.generation_timeout_s)

    @bentoml.api
    @answers_errors
    async def generate(
        self,
        edges: schemas.OptionalEdgeMap,
        params: schemas.GenerationParams,
        init_image: schemas.OptionalPicture = None,
        mask: schemas.OptionalMask = None,
        controls: schemas.OptionalControlImages = None,
    ) -> schemas.Images:
        """Images following ``edges`` (H×W, Canny) or ``controls`` (K×H×W×3, one per control),
        from noise or ``init_image`` (``params.strength``), repainting where ``mask`` is white."""
        request = schemas.GPURequest.of(params, edges, controls, init_image, mask)
        return await cancel_on_disconnect(self.worker.run(request))

    @bentoml.api
    async def generate_stream(
        self,
        edges: schemas.OptionalEdgeMap,
        params: schemas.GenerationParams,
        init_image: schemas.OptionalPicture = None,
        mask: schemas.OptionalMask = None,
        controls: schemas.OptionalControlImages = None,
    ) -> t.AsyncGenerator[str, None]:
        """Like ``generate``, as JSON lines: ``{"step", "total"}`` after each step (``"image"``,
        a WebP preview, every ``params.preview_every``), then ``{"shape", "images"}`` (raw
        uint8) or ``{"status", "error"}``; closing it stops the generation."""
        request = schemas.GPURequest.of(params, edges, controls, init_image, mask)
        async for line in self.worker.stream(request):
            yield line


@bentoml.asgi_app(STUDIO, path="/studio")
@bentoml.service(
    workers=settings.front_workers,
    traffic={"timeout": settings.front_timeout_s},
    runner_probe=readiness.NO_RUNNER_PROBE,  # __is_ready__ asks the GPU Service instead
    logging=middleware.ACCESS_LOG,  # without the request's Content-Type, which it can't print
)
class ControlNet:
    """The public CPU front; the name is the original example's, which clients use."""

    controlnet_service = bentoml.depends(SDXLControlNetService)

    def __init__(self) -> None:
        bentoml_compat.apply_to_front(allow_untested=settings.allow_untested_bentoml)

    @bentoml.on_deployment  # once per `bentoml serve`, before the workers start
    def open_job_store() -> None:
        JOBS.open()

    @bentoml.on_startup  # each worker runs jobs and delivers their webhooks
    async def start_jobs(self) -> None:
        spec = ControlNet.apis["generate_task"].input_spec
        self.jobs = JobRunner(JOBS, self.controlnet_service, spec)
        self.jobs.start()

    @bentoml.on_shutdown  # each worker, at a graceful stop: its jobs and webhooks handed back
    async def stop_jobs(self) -> None:
        await self.jobs.stop()

    async def __is_ready__(self) -> bool:  # /readyz: whether the GPU Service answers ready
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
        """An image following the edges of ``image``, from noise, ``init_image`` or ``image``
        (``params.strength``), repainting where ``mask`` is white; X- headers say how."""
        if params.num_images > 1:
            raise InvalidRequest(ONE_IMAGE.format(params.num_images))
        generation = await gpu_call.generation(
            self.controlnet_service, image, params, init_image, mask
        )
        return await generation.response()

    @bentoml.api
    @answers_errors
    async def generate_batch(
        self,
        image: ImageUpload,
        params: Params,
        init_image: ImageUpload | None = None,
        mask: ImageUpload | None = None,
    ) -> BatchResult:
        """``params.num_images`` images, base64, with their seeds, settings and timings."""
        return await gpu_call.batch_result(self.controlnet_service, image, params, init_image, mask)

    @bentoml.task
    @answers_errors
    async def generate_task(
        self,
        image: ImageUpload,
        params: TaskParams,
        init_image: ImageUpload | None = None,
        mask: ImageUpload | None = None,
    ) -> BatchResult:
        """``/generate_batch`` as a job: ``/submit`` answers a ``task_id`` for ``/status``,
        ``/get``, ``/cancel`` and ``/retry``; ``params.webhook`` is told how it ended. Jobs
        wait in the job store and run on any worker (front/job_endpoints.py, docs/api.md)."""
        work = gpu_call.batch_result(self.controlnet_service, image, params, init_image, mask)
        # Called directly (BentoCloud's queue calls it so), it tells the webhook itself.
        return await webhooks.told(params, JOBS, work)

    @bentoml.api
    async def generate_stream(
        self,
        image: ImageUpload,
        params: Params,
        init_image: ImageUpload | None = None,
        mask: ImageUpload | None = None,
    ) -> t.AsyncGenerator[str, None]:
        """``/generate_batch`` as server-sent events: ``progress`` after each step,
        ``preview`` every ``params.preview_every``, then ``result`` or ``error`` (with the
        status ``/generate_batch`` would answer). Bad input is a 400; leaving stops the GPU."""
        prepared = await gpu_call.prepare(image, params, init_image, mask)
        async for event in gpu_call.events(self.controlnet_service, prepared):
            yield event

    @bentoml.api
    @answers_errors
    async def canny(self, image: ImageUpload, params: EdgeParams | None = None) -> Image.Image:
        """The control image ``/generate`` would send the GPU, as a PNG, made here on the
        CPU: tune thresholds, or check a ready-made one, without spending GPU time."""
        with admission.DECODING.held(admission.pixels(image)):
            png = await asyncio.to_thread(preprocessing.edge_map_png, image, params or EdgeParams())
        return Response(png, media_type="image/png")


# Every error answer is {"error": ...}; oversized or malformed uploads are refused unread;
# pictures given by URL are fetched under the outbound policy; jobs answer as docs/api.md says.
ControlNet.add_asgi_middleware(ErrorBodies)
ControlNet.add_asgi_middleware(BodyGuard, max_bytes=settings.max_upload_bytes)
ControlNet.add_asgi_middleware(ResolveReferences, service=ControlNet)
ControlNet.add_asgi_middleware(JobEndpoints, service=ControlNet, api="generate_task", store=JOBS)
SDXLControlNetService.add_asgi_middleware(ErrorBodies)
