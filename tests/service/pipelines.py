"""The tiny pipeline as the in-process tests load it: this process's model settings (the
tiny model, tests/conftest.py), with whatever options a test turns on."""

from __future__ import annotations

from sdxl_controlnet.gpu.pipeline import ControlNetPipeline
from sdxl_controlnet.settings import settings

# The tiny LoRA adapters the settings declare, as the pipeline takes them.
ADAPTERS = {name: (a.model, a.weight_name) for name, a in settings.lora_adapters.items()}


def tiny_pipeline(**options: object) -> ControlNetPipeline:
    return ControlNetPipeline(
        settings.sdxl_base_model, settings.sdxl_controlnet_model, settings.sdxl_vae_model, **options
    )
