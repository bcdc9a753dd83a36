"""Live previews in one process: the tiny TAESD (devtools.tiny_model) loaded through the
real path decodes the latents between steps, at the steps asked, within the size bound,
without changing a byte of the images; the front relays them as ``preview`` events."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

import service
from devtools.harness import photo, shapes_image
from sdxl_controlnet import schemas, streaming
from sdxl_controlnet.gpu.pipeline import ControlNetPipeline
from sdxl_controlnet.schemas import GenerationParams, GPURequest, Params
from sdxl_controlnet.settings import settings

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def front():
    return service.ControlNet()


@pytest.fixture(scope="module")
def gpu(front):
    return front.controlnet_service


def webp(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    assert image.format == "WEBP"
    return image


async def test_previews_arrive_every_n_steps_before_the_last_within_the_size_bound(gpu) -> None:
    edges = np.zeros((384, 512), np.uint8)  # larger than a preview: it is scaled down
    edges[100:300, 200] = 255
    params = GenerationParams(prompt="x", num_inference_steps=7, preview_every=3, seed=1)
    lines = [json.loads(line) async for line in gpu.generate_stream(edges, params)]

    kinds = ["images" if "images" in e else "preview" if "image" in e else "step" for e in lines]
    assert kinds == ["step"] * 4 + ["preview"] + ["step"] * 3 + ["preview"] + ["step", "images"]
    previews = [event for event in lines if "image" in event]
    assert [(p["step"], p["total"]) for p in previews] == [(3, 7), (6, 7)]
    for preview in previews:
        image = webp(preview["image"])
        assert image.size == (streaming.PREVIEW_MAX_SIDE, 192)  # 512×384, long side 256
        assert np.asarray(image.convert("RGB")).std() > 0


async def test_a_small_image_is_previewed_at_its_own_size(gpu) -> None:
    params = GenerationParams(prompt="x", num_inference_steps=2, preview_every=1, seed=1)
    lines = gpu.generate_stream(np.zeros((64, 96), np.uint8), params)
    (preview,) = [event async for line in lines if "image" in (event := json.loads(line))]
    assert preview["step"] == 1 and webp(preview["image"]).size == (96, 64)


@pytest.mark.parametrize("mode", ["text-to-image", "inpainting"])
def test_previews_leave_the_images_the_same_bytes(gpu, mode: str) -> None:
    pipeline = gpu.worker.pipeline
    edges = np.zeros((64, 96), np.uint8)
    edges[16:48, 24] = 255
    pictures = {}
    if mode == "inpainting":
        mask = np.zeros((64, 96), np.uint8)
        mask[:, 48:] = 255
        pictures = {"init_image": np.asarray(photo(96, 64).convert("RGB")), "mask": mask}
    strength = {"strength": 1.0} if pictures else {}
    plain = GenerationParams(prompt="a red ball", num_inference_steps=4, seed=3, **strength)
    watched = plain.model_copy(update={"preview_every": 1})
    previews: list[int] = []

    without = pipeline.generate(GPURequest.of(plain, edges, **pictures))
    with_previews = pipeline.generate(
        GPURequest.of(watched, edges, **pictures),
        on_preview=lambda step, total, data: previews.append(step),
    )
    assert previews == [1, 2, 3]
    assert with_previews.tobytes() == without.tobytes()


async def test_the_front_relays_previews_as_events_with_their_step(front) -> None:
    params = Params(prompt="x", num_inference_steps=4, preview_every=2, seed=2)
    events = []
    async for chunk in front.generate_stream(image=shapes_image(96, 64), params=params):
        kind, data = (line.split(": ", 1)[1] for line in chunk.strip().split("\n"))
        events.append((kind, json.loads(data)))
    kinds = [kind for kind, _ in events]
    assert kinds == ["progress"] * 3 + ["preview"] + ["progress"] * 2 + ["result"]
    preview = events[3][1]
    assert (preview["step"], preview["total"]) == (2, 4) and preview["elapsed_s"] >= 0
    assert webp(preview["image"]).size == (96, 64)


def test_a_pipeline_without_a_preview_decoder_generates_as_before(gpu) -> None:
    pipeline = ControlNetPipeline(
        settings.sdxl_base_model, settings.sdxl_controlnet_model, settings.sdxl_vae_model
    )
    assert pipeline.previews is None
    params = GenerationParams(prompt="x", num_inference_steps=2, seed=4, preview_every=1)
    previews: list[int] = []
    edges = np.zeros((64, 96), np.uint8)
    images = pipeline.generate(
        GPURequest.of(params, edges), on_preview=lambda *preview: previews.append(1)
    )
    assert previews == []
    reference = gpu.worker.pipeline.generate(GPURequest.of(params, edges))
    assert images.tobytes() == reference.tobytes()


def test_without_a_preview_model_preview_every_is_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    off = settings.model_copy(update={"sdxl_preview_model": ""})
    monkeypatch.setattr(schemas, "settings", off)
    assert Params(prompt="x").preview_every == 0  # the default stays valid
    with pytest.raises(ValueError, match="preview_every: this server makes no previews"):
        Params(prompt="x", preview_every=5)
