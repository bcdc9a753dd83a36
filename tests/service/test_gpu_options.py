"""The GPU speed-ups a deployment turns on by configuration still generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdxl_controlnet import settings
from sdxl_controlnet.pipeline import ControlNetPipeline
from sdxl_controlnet.schemas import GenerationParams

PARAMS = GenerationParams(prompt="a red ball", num_inference_steps=2, seed=5)


def edges() -> np.ndarray:
    edge_map = np.zeros((64, 96), np.uint8)
    edge_map[16:48, 24] = 255
    return edge_map


def load(**options: bool) -> ControlNetPipeline:
    return ControlNetPipeline(
        settings.BASE_MODEL, settings.CONTROLNET_MODEL, settings.VAE_MODEL, **options
    )


def test_sdpa_is_the_attention_diffusers_picks() -> None:
    processors = load().pipe.unet.attn_processors.values()
    assert {type(p).__name__ for p in processors} == {"AttnProcessor2_0"}


def test_channels_last_and_fused_qkv_give_the_same_image() -> None:
    plain = load().generate(edges(), PARAMS)
    fast = load(channels_last=True, fuse_qkv=True)
    assert fast.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert {type(p).__name__ for p in fast.pipe.unet.attn_processors.values()} == {
        "FusedAttnProcessor2_0"
    }
    images = fast.generate(edges(), PARAMS)
    assert images.shape == plain.shape == (1, 64, 96, 3)
    # Same maths, other kernels: the pixels agree to rounding.
    assert np.abs(images.astype(int) - plain).max() <= 2


def test_compiling_wraps_both_models_and_warms_up(monkeypatch: pytest.MonkeyPatch) -> None:
    # Inductor takes minutes on a CPU: an identity stands in for it; the warm-up runs for real.
    compiled, warm_ups = [], []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compiled.append(model) or model)
    monkeypatch.setattr(settings, "MAX_OUTPUT_PIXELS", 64 * 64)
    real_generate = ControlNetPipeline.generate

    def recording_generate(self, edges, params, *args):
        warm_ups.append(real_generate(self, edges, params, *args))
        return warm_ups[-1]

    monkeypatch.setattr(ControlNetPipeline, "generate", recording_generate)
    pipeline = load(compile_models=True)
    assert compiled == [pipeline.pipe.unet, pipeline.pipe.controlnet]
    assert [images.shape for images in warm_ups] == [(1, 64, 64, 3)]
