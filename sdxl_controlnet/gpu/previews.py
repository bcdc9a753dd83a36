"""Live previews: the latents of a generation in progress, decoded by TAESD (diffusers'
``AutoencoderTiny``, a distilled VAE of a few MB) into a small WebP. Run on the pipeline's
thread between two denoising steps, so a preview never races the step that follows."""

from __future__ import annotations

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

    @torch.inference_mode()
    def webp(self, latents: torch.Tensor) -> bytes:
        """The first image of ``latents`` (N×4×h×w, as the UNet sees them: TAESD takes them
        unscaled) as a WebP at most ``PREVIEW_MAX_SIDE`` pixels on its long side."""
        latent = latents[:1].to(self.taesd.dtype)
        # Decoded at twice the preview's size at most (1024² latents are averaged down to
        # 512² pixels): a quarter of a full decode, with the detail the preview can show.
        if (scale := 2 * PREVIEW_MAX_SIDE / 8 / max(latent.shape[-2:])) < 1:
            latent = F.interpolate(latent, scale_factor=scale, mode="area")
        pixels = self.taesd.decode(latent).sample.float()  # in [-1, 1]
        if (scale := PREVIEW_MAX_SIDE / max(pixels.shape[-2:])) < 1:
            pixels = F.interpolate(pixels, scale_factor=scale, mode="bilinear", antialias=True)
        pixels = pixels[0].add(1).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)
        buffer = io.BytesIO()
        image = Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())
        image.save(buffer, format="WEBP", quality=WEBP_QUALITY)
        return buffer.getvalue()
