"""Model loading, the device, and running each request's diffusers call (which ``call.py``
builds) on the pipeline's own thread. Imported only by the GPU Service, so torch and
diffusers never load in the front Service's processes."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import typing as t
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import bentoml
import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    ControlNetUnionModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLControlNetUnionImg2ImgPipeline,
    StableDiffusionXLControlNetUnionInpaintPipeline,
    StableDiffusionXLControlNetUnionPipeline,
    UniPCMultistepScheduler,
)

from .. import logs, metrics
from ..controls import UNION, UNION_MODE_COUNT
from ..errors import GenerationCanceled, GPUOutOfMemory
from ..schemas import GenerationParams, GPURequest, LoraChoice, Scheduler
from ..settings import CompileScope, Settings, settings
from . import control_skip
from .call import active_adapters, build_call
from .compilation import (
    CompiledModels,
    cache_counts,
    graph_key,
    load_cache,
    report_counts,
    running_eagerly,
    save_cache,
    without_compiling,
)
from .image_prompts import ImagePrompts
from .previews import PreviewDecoder
from .prompt_cache import PromptEmbeddings
from .step_pacing import StepPacer

logger = logs.logger(__name__)  # shown in the server log

SCHEDULERS: dict[Scheduler, tuple[type, dict]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_trailing": (EulerDiscreteScheduler, {"timestep_spacing": "trailing"}),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "ddim": (DDIMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "lcm": (LCMScheduler, {}),
}


class NoGPUError(RuntimeError):
    """No CUDA device is visible and serving on the CPU was not allowed."""


class AdapterError(RuntimeError):
    """A declared LoRA adapter is missing or does not fit the base model."""


class ControlNetError(RuntimeError):
    """A declared ControlNet is not what SDXL_CONTROLNETS names it."""


# Text-to-image, image-to-image and inpainting, for ControlNets and for a ControlNet Union.
PIPELINES = (
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
)
UNION_PIPELINES = (
    StableDiffusionXLControlNetUnionPipeline,
    StableDiffusionXLControlNetUnionImg2ImgPipeline,
    StableDiffusionXLControlNetUnionInpaintPipeline,
)


def load_controlnets(
    controlnets: Mapping[str, str], dtype: torch.dtype
) -> dict[str, torch.nn.Module]:
    """Each declared ControlNet, by name, as its own config says it is: a ControlNet Union
    (named ``union``) or a ControlNet (named for the type it serves)."""
    loaded = {}
    for name, path in controlnets.items():
        config = json.loads((Path(path) / "config.json").read_text())
        union = config.get("_class_name") == ControlNetUnionModel.__name__
        if union != (name == UNION):
            what = "a ControlNet Union: name it union" if union else "not a ControlNet Union"
            raise ControlNetError(f"SDXL_CONTROLNETS: {name}={path} is {what}")
        model_class = ControlNetUnionModel if union else ControlNetModel
        model = model_class.from_pretrained(path, dtype=dtype, variant=_variant(path))
        if union and model.config.num_control_type < UNION_MODE_COUNT:
            raise ControlNetError(
                f"SDXL_CONTROLNETS: {name}={path} has {model.config.num_control_type} control "
                f"types; the Union this serves has {UNION_MODE_COUNT} (controls.UNION_MODES)"
            )
        loaded[name] = model
    return loaded


def select_device(allow_cpu: bool, worker_index: int | None) -> str:
    """The device this worker generates on: with several GPUs, worker i (from 1, as
    BentoML counts) takes GPU i-1, since BentoML shows every worker all of them. It is
    made the worker's current device too (and the pipeline thread's: ``pipeline_thread``):
    what names no index (a CUDA event, the graph pool, a bare ``"cuda"``) would otherwise
    open a context on GPU 0 from every worker."""
    if torch.cuda.is_available():
        index = ((worker_index or 1) - 1) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return f"cuda:{index}"
    if allow_cpu:
        return "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    raise NoGPUError(
        f"no CUDA GPU is visible (torch {torch.__version__}, CUDA build "
        f"{torch.version.cuda or 'none'}, CUDA_VISIBLE_DEVICES={visible}); check the driver "
        "and the GPU resource of this container, or set ALLOW_CPU=1 to serve on the CPU "
        "(development only: a generation takes minutes)"
    )


def pipeline_thread(device: str) -> concurrent.futures.ThreadPoolExecutor:
    """The one thread all of a pipeline's work runs on. A CUDA device is current per
    thread: this one makes ``device`` its own, so that its events, graphs and pinned
    memory are on this worker's GPU, not GPU 0."""
    if not device.startswith("cuda"):
        return concurrent.futures.ThreadPoolExecutor(1, "pipeline")
    return concurrent.futures.ThreadPoolExecutor(
        1, "pipeline", initializer=torch.cuda.set_device, initargs=(torch.device(device),)
    )


def _variant(path: str) -> str | None:
    """fp16 where the model provides fp16 files: half the download and the load."""
    return "fp16" if any(Path(path).rglob("*.fp16.safetensors")) else None


class ControlNetPipeline:
    """SDXL + ControlNets: control images and parameters in, uint8 RGB images out.

    All of its work runs on one thread of its own (``submit``), so compiled graphs
    are recorded once and reused, and one generation runs at a time.
    """

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        base: str,
        controlnets: Mapping[str, str],
        vae: str,
        preview: str | None,
        adapters: Mapping[str, tuple[str, str]],
        ip_adapter: str | None,
    ) -> ControlNetPipeline:
        """The pipeline as the operator configured it, on this worker's own GPU."""
        return cls(
            base,
            controlnets,
            vae,
            device=select_device(settings.allow_cpu, bentoml.server_context.worker_index),
            channels_last=settings.channels_last,
            fuse_qkv=settings.fuse_qkv,
            compile_sizes=settings.compile_sizes,
            compile_mode=settings.torch_compile_mode,
            compile_scope=settings.torch_compile_scope,
            inductor_speed_guide=settings.inductor_speed_guide,
            compile_cache=settings.compile_cache,
            adapters=adapters,
            preview=preview,
            ip_adapter=ip_adapter,
            ip_adapter_variant=settings.sdxl_ip_adapter_variant,
            prompt_cache_size=settings.prompt_cache_size,
        )

    def __init__(
        self,
        base: str,
        controlnets: str | Mapping[str, str],
        vae: str,
        *,
        device: str = "cpu",
        channels_last: bool = False,
        fuse_qkv: bool = False,
        compile_sizes: Iterable[tuple[int, int]] = (),
        compile_mode: str = "reduce-overhead",
        compile_scope: CompileScope = "blocks",
        inductor_speed_guide: bool = False,
        compile_cache: Path | None = None,
        adapters: Mapping[str, tuple[str, str]] | None = None,
        preview: str | None = None,
        ip_adapter: str | None = None,
        ip_adapter_variant: str = "sdxl",
        prompt_cache_size: int = settings.prompt_cache_size,
    ) -> None:
        self.device = device
        # fp16 halves memory and time on a GPU; the fp16-fix VAE keeps it from overflowing.
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        if isinstance(controlnets, str):  # a path: the one Canny ControlNet
            controlnets = {"canny": controlnets}
        logger.info("loading %s + %s + %s on %s (%s)", base, controlnets, vae, device, dtype)
        self.controlnets = load_controlnets(controlnets, dtype)
        self.union = UNION in self.controlnets
        text_to_image, image_to_image, inpainting = UNION_PIPELINES if self.union else PIPELINES
        self.pipe = text_to_image.from_pretrained(
            base,
            controlnet=next(iter(self.controlnets.values())),
            vae=AutoencoderKL.from_pretrained(vae, dtype=dtype, variant=_variant(vae)),
            dtype=dtype,
            variant=_variant(base),
        ).to(device)
        for controlnet in self.controlnets.values():
            controlnet.to(device)
        # Image-to-image and inpainting: the same modules in other pipelines, no weight copied.
        # from_pipe casts every module to its dtype, float32 unless told (diffusers 0.42.1).
        # An IP-Adapter for image prompts, before the other pipelines share the modules.
        self.image_prompts = (
            ImagePrompts(self.pipe, ip_adapter, ip_adapter_variant, prompt_cache_size)
            if ip_adapter
            else None
        )
        self.img2img = image_to_image.from_pipe(self.pipe, dtype=dtype)
        self.inpaint = inpainting.from_pipe(self.pipe, dtype=dtype)
        for pipe in (self.pipe, self.img2img, self.inpaint):
            pipe.set_progress_bar_config(disable=True)
        # Decode a batch one image at a time: four 1024² images at once overflow a 24 GB L4.
        self.pipe.vae.enable_slicing()
        # TAESD for live previews (params.preview_every), where the operator declared one.
        self.previews = PreviewDecoder(preview, device, dtype) if preview else None
        config = self.pipe.scheduler.config
        self.schedulers = {
            name: cls.from_config(config, **kwargs) for name, (cls, kwargs) in SCHEDULERS.items()
        }
        # torch 2 picks scaled-dot-product attention by itself; the log shows it did.
        attention = {type(p).__name__ for p in self.pipe.unet.attn_processors.values()}
        logger.info("attention: %s", ", ".join(sorted(attention)))
        # LoRA adapters by name: (directory, weight file).
        adapters = adapters or {}
        self.adapters = list(adapters)
        for name, (path, weight_name) in adapters.items():
            self._load_adapter(name, path, weight_name)
        # What the models have on now; None after a failed switch: unknown, set afresh.
        self._active: tuple[tuple[str, float], ...] | None = ()
        if adapters:
            self.pipe.disable_lora()  # until a request asks for one
        if channels_last:  # as diffusers' speed guide does, the VAE too
            self.pipe.unet.to(memory_format=torch.channels_last)
            self.pipe.vae.to(memory_format=torch.channels_last)
            for controlnet in self.controlnets.values():
                controlnet.to(memory_format=torch.channels_last)
        if fuse_qkv:
            self.pipe.fuse_qkv_projections()  # UNet and VAE; diffusers has none for ControlNet
        for controlnet in self.controlnets.values():
            control_skip.skip_when_unscaled(controlnet)
        self.prompt_cache = PromptEmbeddings(prompt_cache_size) if prompt_cache_size else None
        self._thread = pipeline_thread(device)
        # The pipeline holds the eager modules except during a compiled call, so that
        # diffusers always finds the adapters on them.
        self._eager = (self.pipe.unet, self.pipe.controlnet)
        self._compiled: CompiledModels | None = None
        if sizes := list(compile_sizes):
            self._compile(sizes, compile_mode, compile_scope, compile_cache, inductor_speed_guide)

    def _load_adapter(self, name: str, path: str, weight_name: str) -> None:
        """Load one LoRA adapter beside the others, unfused; fail naming it."""
        where = f"LoRA adapter {name!r} ({Path(path) / weight_name})"
        if not (Path(path) / weight_name).is_file():
            raise AdapterError(f"{where}: no such file; check LORA_ADAPTERS")
        logger.info("loading %s", where)
        try:
            with warnings.catch_warnings():  # peft warns at every adapter after the first
                warnings.filterwarnings("ignore", "Already found a `peft_config`")
                self.pipe.load_lora_weights(path, weight_name=weight_name, adapter_name=name)
        except Exception as exc:  # diffusers and peft raise many kinds for a misfit
            reason = " ".join(str(exc).split())  # peft lists every misfit layer: the start
            reason = reason if len(reason) <= 300 else reason[:300] + " …"
            raise AdapterError(f"{where} does not fit the base model: {reason}") from exc
        if not any(name in names for names in self.pipe.get_list_adapters().values()):
            raise AdapterError(f"{where} does not fit the base model: it matches no layer")

    def _use_adapters(self, loras: list[LoraChoice]) -> None:
        """Activate the request's adapters at their scales, unfused: switching costs no
        reload. With none (or all at scale 0) they are disabled: the base model, exactly.
        If switching fails, they are disabled before the error goes on, so no adapter is
        left on for a later request."""
        active = active_adapters(loras)
        if active == self._active:
            return
        self._active = None
        try:
            if active:
                self.pipe.enable_lora()
                names, scales = zip(*active, strict=True)
                self.pipe.set_adapters(list(names), adapter_weights=list(scales))
            else:
                self.pipe.disable_lora()
        except Exception:
            self.pipe.disable_lora()
            self._active = ()
            raise
        self._active = active

    def _compile(
        self,
        sizes: list[tuple[int, int]],
        mode: str,
        scope: CompileScope,
        cache: Path | None,
        speed_guide: bool,
    ) -> None:
        """Compile the UNet, ControlNet and VAE decoder, and record their graphs at
        ``sizes``, one image with guidance: a warm-up generation at each, before the
        Service is ready.
        Its second step is past the guidance window: the UNet's graph without the
        ControlNet's residuals is recorded too. A size whose compile fails is logged and
        runs uncompiled. With a ``cache`` file, its artifacts are loaded first; where there
        was none to load, or the warm-up still compiled afresh (a stale file, a size it
        lacked), everything the warm-up used is saved into it."""
        loaded = load_cache(cache) if cache is not None else None
        self._compiled = CompiledModels(
            *self._eager, self.pipe.vae, self.device, mode, scope, speed_guide
        )
        warm_up = GenerationParams(
            prompt="warm-up", num_inference_steps=2, control_guidance_end=0.5, seed=0
        )
        for width, height in sizes:
            logger.info("compiling for %d×%d (warm-up generation)", width, height)
            key = graph_key(height, width, warm_up)
            self._compiled.warmed.add(key)
            request = GPURequest.of(warm_up, np.zeros((height, width), np.uint8))
            try:
                for _ in range(self._compiled.warm_ups):
                    self._thread.submit(
                        self._run_diffusers, request, None, lambda: False, None
                    ).result()
            except Exception:
                self._compiled.warmed.discard(key)
                logger.exception(
                    "compiling for %d×%d failed; requests of that size run uncompiled",
                    width,
                    height,
                )
        report_counts()
        if cache is not None and (loaded is None or cache_counts()["misses"]):
            save_cache(cache)

    def runs_compiled(self, height: int, width: int, params: GenerationParams) -> bool:
        """Whether a request runs the compiled models: compiling is on, its shape was
        warmed, it has one control, and no adapter is on (the graphs are traced with the
        adapters off)."""
        return (
            self._compiled is not None
            and graph_key(height, width, params) in self._compiled.warmed
            and len(params.controls) <= 1
            and not active_adapters(params.loras)
        )

    def submit(self, *args: t.Any, **kwargs: t.Any) -> concurrent.futures.Future[np.ndarray]:
        """Run ``generate`` with these arguments on the pipeline's own thread."""
        return self._thread.submit(self.generate, *args, **kwargs)

    def generate(
        self,
        request: GPURequest,
        on_step: Callable[[int, int], None] | None = None,
        canceled: Callable[[], bool] = lambda: False,
        on_preview: Callable[[int, int, bytes], None] | None = None,
    ) -> np.ndarray:
        """Generate ``params.num_images`` images the size of ``request.controls``, returned
        as an N×H×W×3 uint8 array: from noise, or from ``init_image`` at
        ``params.strength``, repainting only where ``mask`` is white.

        After each denoising step ``on_step(done, total)`` reports progress, and
        ``canceled()`` can stop the run (raising GenerationCanceled), so an
        abandoned request frees the GPU within one step. Every ``params.preview_every``
        steps before the last, ``on_preview(done, total, webp)`` receives a preview of the
        first image. Nothing is compiled here: what the warmed graphs do not fit runs the
        eager models.
        """
        with without_compiling(), metrics.PIPELINE.time():
            return self._run_diffusers(request, on_step, canceled, on_preview)

    @torch.inference_mode()
    def _run_diffusers(
        self,
        request: GPURequest,
        on_step: Callable[[int, int], None] | None,
        canceled: Callable[[], bool],
        on_preview: Callable[[int, int, bytes], None] | None,
    ) -> np.ndarray:
        params = request.params
        assert params.seed is not None, "the caller resolves the seed"
        every = params.preview_every if on_preview and self.previews else 0

        pacer = StepPacer(self.device)
        # The preview of the step before, ready by now: delivered before this step's progress.
        preview: tuple[int, concurrent.futures.Future[bytes]] | None = None

        def step_end(pipe, step: int, timestep, tensors: dict) -> dict:
            nonlocal preview
            pacer.step_done()  # on a GPU, what follows ticks as the GPU works
            if canceled():
                raise GenerationCanceled
            if self.image_prompts is not None:  # the next step's scale, inside its window
                self.image_prompts.set_scale(call.image_prompt, step + 1, pipe.num_timesteps)
            if preview is not None:
                on_preview(preview[0], pipe.num_timesteps, preview[1].result())
                preview = None
            if on_step is not None:
                on_step(step + 1, pipe.num_timesteps)
            # Read only: the latents go on unchanged, so the images are the same bytes.
            if every and (step + 1) % every == 0 and step + 1 < pipe.num_timesteps:
                preview = (step + 1, self.previews.start(tensors["latents"]))
            return tensors

        height, width = request.size
        self._use_adapters(params.loras)
        compiled = self.runs_compiled(height, width, params)
        if self._compiled is not None:
            self._compiled.take_fallbacks()  # a failed or canceled call's, not this one's
        call = build_call(self, request)
        pipe = call.pipe
        pipe.scheduler = self.schedulers[params.scheduler]
        modules = self._compiled.modules if compiled else (pipe.unet, call.controlnet)
        pipe.unet, pipe.controlnet = modules
        # Uncompiled, nothing compiled runs: not the VAE's decoder, nor the blocks that
        # regional compilation compiled in place in the eager modules.
        eagerly = running_eagerly() if not compiled else contextlib.nullcontext()
        try:
            with eagerly:
                images = pipe(
                    **call.arguments, callback_on_step_end=step_end, output_type="pt"
                ).images
        except torch.OutOfMemoryError as exc:
            # Free what the failed call left cached, so the next request has the memory.
            torch.cuda.empty_cache()
            raise GPUOutOfMemory(
                f"the GPU ran out of memory generating {params.num_images} image(s) at "
                f"{width}×{height}; try fewer images or a smaller size"
            ) from exc
        finally:
            pipe.unet, pipe.controlnet = self._eager
        if self._compiled is not None:
            self._say_what_ran_eagerly(height, width, params, compiled)
        # Quantize on the device: a quarter of the bytes to copy back.
        images = images.mul(255).round_().clamp_(0, 255).to(torch.uint8)
        return images.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    def _say_what_ran_eagerly(
        self, height: int, width: int, params: GenerationParams, compiled: bool
    ) -> None:
        """With compiling on, a log line and a metric for each request that ran the
        slower, uncompiled models: chosen beforehand, or where the graphs did not fit."""
        fallbacks = self._compiled.take_fallbacks()
        if not compiled:
            if active_adapters(params.loras):
                reason = "adapters"
            elif len(params.controls) > 1:
                reason = "controls"
            else:
                reason = "shape"
            logger.info(
                "uncompiled generation (%s): %d×%d, batch of %d",
                reason,
                width,
                height,
                params.batch,
            )
        elif params.guess_mode and set(fallbacks) == {"controlnet"}:
            reason = "guess_mode"
            logger.info("uncompiled ControlNet (guess mode); the UNet ran compiled")
        elif fallbacks:
            reason = "recompile"
            logger.warning(
                "uncompiled %s: the warmed graphs did not fit (%s)",
                ", ".join(fallbacks),
                "; ".join(fallbacks.values()),
            )
        else:
            return
        metrics.UNCOMPILED.labels(reason).inc()
