"""Distributed SDXL ControlNet on BentoML.

A request enters ``ControlNet`` (CPU): the upload is checked, decoded and turned
into a Canny edge map. The one-channel edge map and the parameters cross to
``SDXLControlNetService`` (GPU), which runs diffusers' SDXL ControlNet pipeline
and returns the images as a uint8 array. The front encodes the reply.

torch and diffusers are imported only inside the GPU Service, so the CPU tier's
workers stay small.
"""

from __future__ import annotations

import asyncio
import secrets
import typing as t

import bentoml
import numpy as np
from PIL import Image

from sdxl_controlnet import preprocessing, settings
from sdxl_controlnet.schemas import GenerationParams, ImageUpload, InvalidRequest, Params

EdgeMap = np.ndarray[t.Any, np.dtype[np.uint8]]  # H×W, one channel, 0 or 255
Images = np.ndarray[t.Any, np.dtype[np.uint8]]  # N×H×W×3 RGB


@bentoml.service(
    resources={"gpu": 1, "gpu_type": "nvidia-l4"},
    workers=1,
    traffic={"timeout": settings.GENERATION_TIMEOUT_S},
)
class SDXLControlNetService:
    def __init__(self) -> None:
        from sdxl_controlnet.pipeline import ControlNetPipeline

        self.pipeline = ControlNetPipeline(
            settings.BASE_MODEL, settings.CONTROLNET_MODEL, settings.VAE_MODEL
        )
        # One generation at a time: the rest queue here instead of fighting for GPU memory.
        self.gpu_lock = asyncio.Lock()

    @bentoml.api
    async def generate(self, edges: EdgeMap, params: GenerationParams) -> Images:
        """Generate images that follow ``edges`` (an H×W uint8 Canny map)."""
        check_edge_map(edges)
        if params.seed is None:
            params = params.model_copy(update={"seed": secrets.randbelow(2**32)})
        async with self.gpu_lock:
            # A worker thread keeps the event loop free for health checks meanwhile.
            return await asyncio.to_thread(self.pipeline.generate, edges, params)


@bentoml.service(traffic={"timeout": settings.GENERATION_TIMEOUT_S + 30})
class ControlNet:
    controlnet_service = bentoml.depends(SDXLControlNetService)

    @bentoml.api
    async def generate(self, image: ImageUpload, params: Params) -> Image.Image:
        """Generate an image that follows the edges of ``image``."""
        edges = await asyncio.to_thread(edge_map, image, params)
        seed = params.seed if params.seed is not None else secrets.randbelow(2**32)
        images = await self.controlnet_service.generate(
            edges=edges, params=params.generation_params(seed)
        )
        result = Image.fromarray(images[0])
        result.format = params.output_format.upper()
        return result


def edge_map(image: Image.Image, params: Params) -> np.ndarray:
    size = (params.width, params.height) if params.width and params.height else None
    return preprocessing.edge_map(
        preprocessing.to_grayscale(image),
        params.low_threshold,
        params.high_threshold,
        size,
        params.resize_mode,
    )


def check_edge_map(edges: np.ndarray) -> None:
    """The GPU Service can be called directly: hold its input to the same limits."""
    if edges.ndim != 2:
        raise InvalidRequest(f"edges must be a one-channel H×W array, got shape {edges.shape}")
    height, width = edges.shape
    if height % 8 or width % 8 or min(height, width) < settings.MIN_OUTPUT_SIDE:
        raise InvalidRequest(
            f"edges is {width}×{height}; both sides must be multiples of 8 "
            f"and at least {settings.MIN_OUTPUT_SIDE}"
        )
    if height * width > settings.MAX_OUTPUT_PIXELS:
        raise InvalidRequest(
            f"edges is {width}×{height}; at most {settings.MAX_OUTPUT_PIXELS} pixels"
        )
