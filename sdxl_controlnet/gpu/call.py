"""One request as a diffusers call: the pipeline of its mode, the ControlNet module its
controls run, and every argument of the call, built from a ``GPURequest`` and the models
``pipeline.py`` loaded. Nothing here runs a model but the image prompt's encoder."""

from __future__ import annotations

import typing as t
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.models import MultiControlNetUnionModel
from PIL import Image

from ..controls import UNION, UNION_MODES
from ..schemas import ControlSettings, GenerationParams, GPURequest, LoraChoice
from . import control_skip, image_prompts

if t.TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from .pipeline import ControlNetPipeline


@dataclass
class Call:
    pipe: DiffusionPipeline  # text-to-image, image-to-image or inpainting
    controlnet: torch.nn.Module  # one ControlNet, or several combined
    arguments: dict[str, t.Any]  # the call's, but for the step callback and the output type
    image_prompt: ControlSettings | None  # its scale is set before each step


def active_adapters(loras: list[LoraChoice]) -> tuple[tuple[str, float], ...]:
    """The adapters a request turns on, with their scales: those at scale 0 change nothing."""
    return tuple((lora.name, lora.scale) for lora in loras if lora.scale != 0)


def build_call(models: ControlNetPipeline, request: GPURequest) -> Call:
    params = request.params
    if models.prompt_cache is None:
        prompts = {
            "prompt": params.prompt,
            "prompt_2": params.prompt_2,
            "negative_prompt": params.negative_prompt,
            "negative_prompt_2": params.negative_prompt_2,
        }
    else:
        prompts = models.prompt_cache.get(models.pipe, params, active_adapters(params.loras))
    controls, controlnets, (prompt, picture) = request.controls, params.controls, (None, None)
    if params.controls:  # an image prompt travels among them: it is no ControlNet's
        controlnets, pictures, image_prompt = image_prompts.split(params.controls, controls)
        controls, (prompt, picture) = np.stack(pictures), image_prompt or (None, None)
    controlnet, images, steering = _steering(models, controls, params, controlnets)
    if models.image_prompts is not None:
        guided = params.guidance_scale > 1
        steering["ip_adapter_image_embeds"] = models.image_prompts.embeddings(picture, guided)
        models.image_prompts.set_scale(prompt, 0, params.steps)
    # A Union's pipelines take a list of control images, with a mode for each.
    control = images if models.union else (images[0] if len(images) == 1 else images)
    if request.init_image is None:
        pipe = models.pipe
        pictures = {"control_image" if models.union else "image": control}
    else:
        pictures = {
            "image": Image.fromarray(request.init_image),
            "control_image": control,
            "strength": params.strength,
        }
        pipe = models.img2img
        if request.mask is not None:
            pipe, pictures["mask_image"] = models.inpaint, Image.fromarray(request.mask)
    height, width = request.size
    arguments = {
        **prompts,
        **pictures,
        "height": height,
        "width": width,
        "num_inference_steps": params.num_inference_steps,
        "guidance_scale": params.guidance_scale,
        **steering,
        "guess_mode": params.guess_mode,
        "num_images_per_prompt": params.num_images,
        "generator": [
            torch.Generator(models.device).manual_seed(params.seed + i)
            for i in range(params.num_images)
        ],
    }
    return Call(pipe, controlnet, arguments, prompt)


def _steering(
    models: ControlNetPipeline,
    controls: np.ndarray,
    params: GenerationParams,
    settings: list[ControlSettings],
) -> tuple[torch.nn.Module, list[torch.Tensor], dict]:
    """The ControlNet module ``controls`` (K×H×W×C) run, their images as 1×3×H×W tensors
    in [0, 1], and the pipeline's arguments for their scales and windows: one
    ControlNet, or several combined, each with its own ``settings``."""
    # torch.tensor copies: the arrays BentoML unpickles are read-only.
    stack = torch.tensor(controls, device=models.device).permute(0, 3, 1, 2)
    # The one Canny control has one channel (C = 1).
    stack = stack.to(models.pipe.dtype).div_(255).expand(-1, 3, -1, -1)
    images = list(stack.split(1))
    if params.controls:
        steering = [(c.type, c.scale, c.start, c.end) for c in settings]
    else:
        one = params.controlnet_conditioning_scale, params.control_guidance_start
        steering = [("canny", *one, params.control_guidance_end)]
    kinds, scales, starts, ends = (list(values) for values in zip(*steering, strict=True))
    arguments: dict[str, t.Any] = {}
    if models.union:
        nets = [models.controlnets[UNION]] * len(kinds)
        arguments["control_mode"] = [UNION_MODES[kind] for kind in kinds]
    else:
        nets = [models.controlnets[kind] for kind in kinds]
    if len(nets) == 1:
        module = nets[0]
        scales, starts, ends = scales[0], starts[0], ends[0]
    elif models.union:
        module = MultiControlNetUnionModel(nets)
    else:
        module = control_skip.Combined(nets)
    arguments |= {
        "controlnet_conditioning_scale": scales,
        "control_guidance_start": starts,
        "control_guidance_end": ends,
    }
    return module, images, arguments
