"""Image prompts: a picture whose style and subject an IP-Adapter (SDXL_IP_ADAPTER) carries
into the image, beside the ControlNets' structure (a control of type ``image_prompt``).

diffusers loads the adapter into the UNet's cross-attentions, after which every call needs
image embeddings. A request without an image prompt gets zeros at scale 0, which diffusers'
adapter layers skip: its image is the same bytes as without an adapter loaded. The image
encoder runs once per picture: its embeddings are kept, least recently used out, by the
picture's hash. diffusers has no guidance window for an adapter: the scale is set before
each step instead, 0 outside the control's ``start``–``end``, as ControlNets' windows are.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import PurePosixPath

import numpy as np
import torch
from diffusers import StableDiffusionXLControlNetPipeline
from PIL import Image

from .. import logs
from ..controls import IMAGE_PROMPT
from ..schemas import ControlSettings
from .model_refs import IP_ADAPTER_VARIANTS

logger = logs.logger(__name__)


class ImagePrompts:
    """The IP-Adapter of ``pipe``, the ``variant`` (model_refs.IP_ADAPTER_VARIANTS) found
    in ``folder``, and its embeddings' cache."""

    def __init__(
        self, pipe: StableDiffusionXLControlNetPipeline, folder: str, variant: str, cache_size: int
    ) -> None:
        logger.info("loading the IP-Adapter %s (%s)", folder, variant)
        files = IP_ADAPTER_VARIANTS[variant]
        weight = PurePosixPath(files.weight)
        pipe.load_ip_adapter(
            folder,
            subfolder=str(weight.parent),
            weight_name=weight.name,
            image_encoder_folder=files.encoder,
        )
        self.pipe = pipe
        self.cache_size = max(cache_size, 1)
        self._embeddings: OrderedDict[tuple[bytes, bool], torch.Tensor] = OrderedDict()
        # The shape of one picture's embeddings, with and without guidance's negative side.
        blank = Image.new("RGB", (8, 8))
        self._nothing = {
            guided: torch.zeros_like(self._encode(blank, guided)) for guided in (False, True)
        }

    def _encode(self, picture: Image.Image, guided: bool) -> torch.Tensor:
        (embeddings,) = self.pipe.prepare_ip_adapter_image_embeds(
            [picture], None, self.pipe.device, 1, guided
        )
        return embeddings

    def embeddings(self, picture: np.ndarray | None, guided: bool) -> list[torch.Tensor]:
        """The pipeline's ``ip_adapter_image_embeds`` for ``picture`` (H×W×3 uint8), or
        zeros for none; with the negative side where ``guided``."""
        if picture is None:
            return [self._nothing[guided]]
        digest = hashlib.sha256(np.ascontiguousarray(picture).data)
        digest.update(str(picture.shape).encode())
        key = (digest.digest(), guided)
        if key in self._embeddings:
            self._embeddings.move_to_end(key)
        else:
            self._embeddings[key] = self._encode(Image.fromarray(picture), guided)
            if len(self._embeddings) > self.cache_size:
                self._embeddings.popitem(last=False)
        return [self._embeddings[key]]

    def set_scale(self, prompt: ControlSettings | None, step: int, steps: int) -> None:
        """The adapter's scale for ``step`` (from 0) of ``steps``: the prompt's inside its
        window, as diffusers reckons ControlNets' windows, and 0 elsewhere or without one."""
        inside = prompt is not None and not (
            step / steps < prompt.start or (step + 1) / steps > prompt.end
        )
        self.pipe.set_ip_adapter_scale(prompt.scale if inside else 0.0)


def split(
    controls: list[ControlSettings], images: np.ndarray
) -> tuple[list[ControlSettings], list[np.ndarray], tuple[ControlSettings, np.ndarray] | None]:
    """A request's controls as the ControlNets' (settings and images), and its image prompt
    (settings and picture), if it has one."""
    prompt = next(
        ((c, i) for c, i in zip(controls, images, strict=True) if c.type == IMAGE_PROMPT), None
    )
    kept = [(c, i) for c, i in zip(controls, images, strict=True) if c.type != IMAGE_PROMPT]
    return [c for c, _ in kept], [i for _, i in kept], prompt
