"""Image prompts through the real diffusers path: the tiny IP-Adapter (devtools.tiny_model)
loaded with ``load_ip_adapter``, steering the image beside the ControlNets, in every mode,
within its window, with its embeddings cached, and leaving requests without one unchanged
to the byte."""

from __future__ import annotations

import numpy as np
import pytest

from devtools.harness import TINY_MODEL
from devtools.tiny_model import IP_ADAPTER_SUBDIR
from sdxl_controlnet.gpu.pipeline import ControlNetPipeline
from sdxl_controlnet.schemas import ControlSettings, GenerationParams, GPURequest, LoraChoice
from tests.service.pipelines import ADAPTERS, tiny_pipeline

FAST = {"prompt": "a red ball", "num_inference_steps": 4, "seed": 3}
HEIGHT, WIDTH = 64, 96


@pytest.fixture(scope="module")
def plain() -> ControlNetPipeline:
    return tiny_pipeline(adapters=ADAPTERS)


@pytest.fixture(scope="module")
def prompted() -> ControlNetPipeline:
    return tiny_pipeline(adapters=ADAPTERS, ip_adapter=str(TINY_MODEL / IP_ADAPTER_SUBDIR))


def edges() -> np.ndarray:
    edge_map = np.zeros((HEIGHT, WIDTH), np.uint8)
    edge_map[16:48, 24] = 255
    return edge_map


def picture(colour: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (HEIGHT, WIDTH, 3)).copy()


def with_prompt(
    colour: tuple[int, int, int], **prompt: float
) -> tuple[np.ndarray, GenerationParams]:
    """A Canny control and an image prompt of one colour, as the front sends them."""
    # Constructed as the GPU Service's own validation receives it from a front whose
    # settings serve image prompts (this process's do not: SDXL_IP_ADAPTER is empty).
    image_prompt = ControlSettings.model_construct(type="image_prompt", **prompt)
    controls = [ControlSettings(type="canny"), image_prompt]
    stack = np.stack([np.repeat(edges()[..., None], 3, axis=2), picture(colour)])
    return stack, GenerationParams(**FAST, controls=controls)


def generate(pipeline: ControlNetPipeline, colour=(200, 30, 30), **prompt: float) -> np.ndarray:
    stack, params = with_prompt(colour, **prompt)
    return pipeline.submit(GPURequest.of(params, controls=stack)).result()


@pytest.mark.parametrize(
    "fields", [{}, {"guidance_scale": 1.0}, {"num_images": 2}, {"scheduler": "dpmpp_2m"}]
)
def test_without_an_image_prompt_the_image_is_the_same_bytes_as_without_an_adapter(
    plain, prompted, fields
) -> None:
    params = GenerationParams(**FAST, **fields)
    assert np.array_equal(
        prompted.submit(GPURequest.of(params, edges())).result(),
        plain.submit(GPURequest.of(params, edges())).result(),
    )


def test_an_image_prompt_steers_and_a_different_one_steers_elsewhere(plain, prompted) -> None:
    red, blue = generate(prompted, (200, 30, 30)), generate(prompted, (30, 30, 200))
    canny_alone = plain.submit(GPURequest.of(GenerationParams(**FAST), edges())).result()
    assert np.abs(red.astype(int) - blue).mean() > 1
    assert np.abs(red.astype(int) - canny_alone).mean() > 1
    # The same request again: the same bytes, the embeddings taken from the cache.
    assert np.array_equal(generate(prompted, (200, 30, 30)), red)
    # At scale 0 the picture counts for nothing.
    assert np.array_equal(generate(prompted, scale=0.0), canny_alone)


def test_the_adapter_scale_follows_the_window_step_by_step(prompted, monkeypatch) -> None:
    scales: list[float] = []
    real = prompted.pipe.set_ip_adapter_scale
    monkeypatch.setattr(
        prompted.pipe, "set_ip_adapter_scale", lambda s: (scales.append(s), real(s))
    )
    generate(prompted, scale=0.7, start=0.5, end=1.0)
    # Before each of the 4 steps (and once more after the last, for a step that never comes).
    assert scales[:4] == [0.0, 0.0, 0.7, 0.7]
    scales.clear()
    generate(prompted, scale=0.7, start=0.0, end=0.5)
    assert scales[:4] == [0.7, 0.7, 0.0, 0.0]


def test_a_repeated_picture_is_encoded_once(prompted, monkeypatch) -> None:
    encoded: list[object] = []
    encoder = prompted.pipe.image_encoder
    monkeypatch.setattr(
        encoder,
        "forward",
        lambda *a, **k: (encoded.append(1), type(encoder).forward(encoder, *a, **k))[1],
    )
    generate(prompted, (10, 200, 10))
    generate(prompted, (10, 200, 10))
    assert len(encoded) == 1


@pytest.mark.parametrize("mode", ["image-to-image", "inpainting"])
def test_every_mode_takes_an_image_prompt(prompted, mode) -> None:
    stack, params = with_prompt((200, 30, 30))
    params = params.model_copy(update={"strength": 0.75})
    start = picture((120, 120, 120))
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[:, WIDTH // 2 :] = 255
    kept = mask if mode == "inpainting" else None
    images = prompted.submit(
        GPURequest.of(params, init_image=start, mask=kept, controls=stack)
    ).result()
    assert images.shape == (1, HEIGHT, WIDTH, 3)


def test_lora_adapters_and_an_image_prompt_together(prompted) -> None:
    stack, params = with_prompt((200, 30, 30))
    styled = params.model_copy(update={"loras": [LoraChoice(name="style", scale=0.8)]})
    with_style = prompted.submit(GPURequest.of(styled, controls=stack)).result()
    assert np.abs(with_style.astype(int) - generate(prompted)).mean() > 1


def test_the_plus_variant_loads_its_resampler_and_encoder_and_steers(plain) -> None:
    """SDXL_IP_ADAPTER_VARIANT=plus-vit-h: the Resampler over the ViT-H encoder's patch
    features, from the same folder; unchanged without an image prompt, as "sdxl" is."""
    plus = tiny_pipeline(
        ip_adapter=str(TINY_MODEL / IP_ADAPTER_SUBDIR), ip_adapter_variant="plus-vit-h"
    )
    assert type(plus.pipe.unet.encoder_hid_proj.image_projection_layers[0]).__name__ == (
        "IPAdapterPlusImageProjection"
    )
    params = GenerationParams(**FAST)
    canny_alone = plain.submit(GPURequest.of(params, edges())).result()
    assert np.array_equal(plus.submit(GPURequest.of(params, edges())).result(), canny_alone)
    red, blue = generate(plus, (200, 30, 30)), generate(plus, (30, 30, 200))
    assert np.abs(red.astype(int) - blue).mean() > 1
    assert np.abs(red.astype(int) - canny_alone).mean() > 1
