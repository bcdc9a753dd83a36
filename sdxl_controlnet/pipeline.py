"""Model loading and the diffusers call. Imported only by the GPU Service,
so torch and diffusers never load in the front Service's processes."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLControlNetPipeline,
    UniPCMultistepScheduler,
)

from . import settings
from .errors import GenerationCancelled
from .schemas import GenerationParams, Scheduler

logger = logging.getLogger("bentoml").getChild(__name__)  # shown in the server log

SCHEDULERS: dict[Scheduler, tuple[type, dict]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "ddim": (DDIMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}


class ControlNetPipeline:
    """SDXL + Canny ControlNet: an edge map and parameters in, uint8 RGB images out.

    Not thread-safe (diffusers pipelines keep per-call state): callers run one
    generation at a time.
    """

    def __init__(
        self,
        base: str,
        controlnet: str,
        vae: str,
        *,
        channels_last: bool = settings.CHANNELS_LAST,
        fuse_qkv: bool = settings.FUSE_QKV,
        compile_models: bool = settings.TORCH_COMPILE,
    ) -> None:
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # fp16 halves memory and time on a GPU; the fp16-fix VAE keeps it from overflowing.
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        logger.info("loading %s + %s + %s on %s (%s)", base, controlnet, vae, self.device, dtype)
        self.pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
            base,
            controlnet=ControlNetModel.from_pretrained(controlnet, dtype=dtype),
            vae=AutoencoderKL.from_pretrained(vae, dtype=dtype),
            dtype=dtype,
        ).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        config = self.pipe.scheduler.config
        self.schedulers = {
            name: cls.from_config(config, **kwargs) for name, (cls, kwargs) in SCHEDULERS.items()
        }
        # torch 2 picks scaled-dot-product attention by itself; the log shows it did.
        attention = {type(p).__name__ for p in self.pipe.unet.attn_processors.values()}
        logger.info("attention: %s", ", ".join(sorted(attention)))
        if channels_last:
            self.pipe.unet.to(memory_format=torch.channels_last)
            self.pipe.controlnet.to(memory_format=torch.channels_last)
        if fuse_qkv:
            self.pipe.fuse_qkv_projections()  # UNet and VAE; diffusers has none for ControlNet
        if compile_models:
            self.pipe.unet = torch.compile(self.pipe.unet, mode="max-autotune")
            self.pipe.controlnet = torch.compile(self.pipe.controlnet, mode="max-autotune")
            self.warm_up()

    def warm_up(self) -> None:
        """Generate once at the largest output size, so that the first request does
        not pay for compilation (other sizes compile on first use)."""
        side = math.isqrt(settings.MAX_OUTPUT_PIXELS) // 8 * 8
        logger.info("warm-up generation at %d² (compiling)", side)
        warm_up = GenerationParams(prompt="warm-up", num_inference_steps=2, seed=0)
        self.generate(np.zeros((side, side), np.uint8), warm_up)

    @torch.inference_mode()
    def generate(
        self,
        edges: np.ndarray,
        params: GenerationParams,
        on_step: Callable[[int, int], None] | None = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> np.ndarray:
        """Generate ``params.num_images`` images the size of ``edges`` (H×W uint8),
        returned as an N×H×W×3 uint8 array.

        After each denoising step ``on_step(done, total)`` reports progress, and
        ``cancelled()`` can stop the run (raising GenerationCancelled), so an
        abandoned request frees the GPU within one step.
        """
        assert params.seed is not None, "the caller resolves the seed"

        def step_end(pipe, step: int, timestep, tensors: dict) -> dict:
            if cancelled():
                raise GenerationCancelled
            if on_step is not None:
                on_step(step + 1, pipe.num_timesteps)
            return tensors

        height, width = edges.shape
        # The edge map crosses the wire as one channel; ControlNet wants RGB in [0, 1].
        # torch.tensor copies: the array BentoML unpickles is read-only.
        control = torch.tensor(edges, device=self.device).to(self.pipe.dtype).div_(255)
        control = control.expand(1, 3, height, width)
        generators = [
            torch.Generator(self.device).manual_seed(params.seed + i)
            for i in range(params.num_images)
        ]
        self.pipe.scheduler = self.schedulers[params.scheduler]
        images = self.pipe(
            prompt=params.prompt,
            prompt_2=params.prompt_2,
            negative_prompt=params.negative_prompt,
            negative_prompt_2=params.negative_prompt_2,
            image=control,
            height=height,
            width=width,
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            controlnet_conditioning_scale=params.controlnet_conditioning_scale,
            control_guidance_start=params.control_guidance_start,
            control_guidance_end=params.control_guidance_end,
            guess_mode=params.guess_mode,
            num_images_per_prompt=params.num_images,
            generator=generators,
            callback_on_step_end=step_end,
            output_type="pt",
        ).images
        # Quantize on the device: a quarter of the bytes to copy back.
        images = images.mul(255).round_().clamp_(0, 255).to(torch.uint8)
        return images.permute(0, 2, 3, 1).contiguous().cpu().numpy()
