"""Both Services in one process: the front's dependency resolves to a real
SDXLControlNetService instance running the tiny pipeline."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from sdxl_controlnet.schemas import GenerationParams, InvalidRequest, Params
from tests.conftest import ROOT, as_array, shapes_image

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def front():
    from service import ControlNet

    return ControlNet()


async def test_front_generates_an_image_of_the_input_size(front) -> None:
    params = Params(prompt="a red ball", num_inference_steps=2, seed=3)
    result = await front.generate(image=shapes_image(160, 120), params=params)
    assert result.size == (160, 120)
    assert as_array(result).std() > 0  # a generated picture, not a blank


async def test_same_seed_same_image_different_seed_different_image(front) -> None:
    image = shapes_image(128, 128)
    first, again, other = [
        as_array(
            await front.generate(
                image=image, params=Params(prompt="x", num_inference_steps=2, seed=seed)
            )
        )
        for seed in (1, 1, 2)
    ]
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


async def test_gpu_service_validates_direct_calls(front) -> None:
    gpu = front.controlnet_service
    with pytest.raises(InvalidRequest, match="one-channel"):
        await gpu.generate(
            edges=np.zeros((64, 64, 3), np.uint8), params=GenerationParams(prompt="x")
        )
    with pytest.raises(InvalidRequest, match="multiples of 8"):
        await gpu.generate(edges=np.zeros((66, 64), np.uint8), params=GenerationParams(prompt="x"))


async def test_gpu_service_returns_uint8_rgb_batches(front) -> None:
    edges = np.zeros((64, 96), np.uint8)
    edges[20:40, 30:60] = 255
    images = await front.controlnet_service.generate(
        edges=edges, params=GenerationParams(prompt="x", num_inference_steps=1, num_images=2)
    )
    assert images.shape == (2, 64, 96, 3) and images.dtype == np.uint8


def test_front_never_imports_torch_or_diffusers() -> None:
    code = (
        "import sys, service; "
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules); "
        "print(heavy); sys.exit(bool(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
