"""Every operator-tunable setting, read once from the environment.

Model ids default to the production SDXL models; point them at local
directories (``make tiny-model``) to run offline. Limits default to what one
NVIDIA L4 (24 GB) serves comfortably.
"""

from __future__ import annotations

import os


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


BASE_MODEL = os.environ.get("SDXL_BASE_MODEL", "stabilityai/stable-diffusion-xl-base-1.0")
CONTROLNET_MODEL = os.environ.get("SDXL_CONTROLNET_MODEL", "diffusers/controlnet-canny-sdxl-1.0")
VAE_MODEL = os.environ.get("SDXL_VAE_MODEL", "madebyollin/sdxl-vae-fp16-fix")

# Uploads: the body size is checked from Content-Length before it is read,
# the pixel count from the image header before any pixel is decoded.
MAX_UPLOAD_BYTES = _int("MAX_UPLOAD_BYTES", 32 * 1024 * 1024)
MAX_INPUT_PIXELS = _int("MAX_INPUT_PIXELS", 4096 * 4096)
# Generated images: the input is scaled down to fit this area (SDXL's native 1024²).
MAX_OUTPUT_PIXELS = _int("MAX_OUTPUT_PIXELS", 1024 * 1024)
MIN_OUTPUT_SIDE = _int("MIN_OUTPUT_SIDE", 64)
MAX_STEPS = _int("MAX_STEPS", 100)
MAX_IMAGES = _int("MAX_IMAGES", 4)
MAX_PROMPT_CHARS = _int("MAX_PROMPT_CHARS", 2000)

# How long one generation may take, queue included, before the caller gets a 504.
GENERATION_TIMEOUT_S = _int("GENERATION_TIMEOUT_S", 300)
# Requests one GPU replica holds at once, one generating and the rest queued;
# past that it answers 503 at once, and the front passes that on.
MAX_QUEUE = _int("MAX_QUEUE", 32)

# GPU speed-ups, each off by default: see the README's "Performance" section.
CHANNELS_LAST = _flag("CHANNELS_LAST")  # NHWC memory layout for the UNet and ControlNet
FUSE_QKV = _flag("FUSE_QKV")  # one matmul for attention's Q, K and V projections
# torch.compile the UNet and ControlNet; start-up then runs one warm-up generation.
TORCH_COMPILE = _flag("TORCH_COMPILE")
