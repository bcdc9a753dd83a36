"""Live previews: the latents of a generation in progress, decoded by TAESD (diffusers'
``AutoencoderTiny``, a distilled VAE of a few MB) into a small WebP.

The decode is queued on the pipeline's thread between two denoising steps, so it never
races the step that follows. Nothing there waits for it: on a GPU its pixels are copied
into pinned host memory without blocking, and a helper thread waits for that copy and
encodes the WebP while the GPU goes on denoising. The pipeline delivers it at the end of
the next step, by which time it is ready: one step late, in order, and never after the
images.
"""

from __future__ import annotations

import concurrent.futures
import io

import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny
from PIL import Image

from .. import logs
from ..streaming import PREVIEW_MAX_SIDE

logger = logs.logger(__name__)  # shown in the server log

# Enough to see the picture form, at a few KB a preview.
WEBP_QUALITY = 70


class PreviewDecoder:
    """TAESD for SDXL latents: the first image of a batch as WebP bytes."""

    def __init__(self, path: str, device: str, dtype: torch.dtype) -> None:
        logger.info("loading the preview decoder %s on %s", path, device)
        self.taesd = AutoencoderTiny.from_pretrained(path, dtype=dtype).to(device).eval()
        self.on_gpu = device.startswith("cuda")
        # One thread: previews are delivered in the order they were sent.
        self._encoder = concurrent.futures.ThreadPoolExecutor(1, "preview-encoder")

    def start(self, latents: torch.Tensor) -> concurrent.futures.Future[bytes]:
        """Queue the decode of ``latents`` now; the WebP, once the helper thread has it."""
        return self._encoder.submit(_encode, *self._decode(latents))

    def webp(self, latents: torch.Tensor) -> bytes:
        """The same preview, waited for: its decode, copy and encode, one after another."""
        return _encode(*self._decode(latents))

    @torch.inference_mode()
    def _decode(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """The first image of ``latents`` (N×4×h×w, as the UNet sees them: TAESD takes them
        unscaled) at most ``PREVIEW_MAX_SIDE`` pixels on its long side, as H×W×3 uint8 on
        the host, and, on a GPU, the event its copy there completes."""
        latent = latents[:1].to(self.taesd.dtype)
        # Decoded at twice the preview's size at most (1024² latents are averaged down to
        # 512² pixels): a quarter of a full decode, with the detail the preview can show.
        if (scale := 2 * PREVIEW_MAX_SIDE / 8 / max(latent.shape[-2:])) < 1:
            latent = F.interpolate(latent, scale_factor=scale, mode="area")
        pixels = self.taesd.decode(latent).sample.float()  # in [-1, 1]
        if (scale := PREVIEW_MAX_SIDE / max(pixels.shape[-2:])) < 1:
            pixels = F.interpolate(pixels, scale_factor=scale, mode="bilinear", antialias=True)
        pixels = pixels[0].add(1).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)
        pixels = pixels.permute(1, 2, 0)
        if not self.on_gpu:
            return pixels.contiguous(), None
        host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return host, copied


def _encode(pixels: torch.Tensor, copied: torch.cuda.Event | None) -> bytes:
    if copied is not None:
        copied.synchronize()  # this thread waits for the copy, not the pipeline's
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="WEBP", quality=WEBP_QUALITY)
    return buffer.getvalue()
