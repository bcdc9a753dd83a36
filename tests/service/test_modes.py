"""Image-to-image and inpainting under the same ControlNet, in one process: the pipelines
share the loaded weights, run the steps strength leaves, keep what the mask keeps, and the
front resolves the mode and sizes the pictures like the control image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import service
from devtools.harness import as_array, decode, photo, shapes_image
from sdxl_controlnet.errors import GenerationCanceled, GPUOutOfMemory, InvalidRequest
from sdxl_controlnet.front import preprocessing
from sdxl_controlnet.schemas import GenerationParams, GPURequest, LoraChoice, Params

pytestmark = pytest.mark.anyio

FAST = {"prompt": "a red ball", "num_inference_steps": 4, "seed": 7}
HEIGHT, WIDTH = 64, 96


@pytest.fixture(scope="module")
def front():
    return service.ControlNet()


@pytest.fixture(scope="module")
def pipeline(front):
    return front.controlnet_service.worker.pipeline


def pictures() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    edges = np.zeros((HEIGHT, WIDTH), np.uint8)
    edges[16:48, 24] = 255
    start = np.asarray(photo(WIDTH, HEIGHT).convert("RGB"))
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[:, WIDTH // 2 :] = 255  # repaint the right half
    return edges, start, mask


def test_the_three_pipelines_share_every_weight(pipeline) -> None:
    def storage(pipe) -> dict[str, set[int]]:
        return {
            name: {p.data_ptr() for p in module.parameters()}
            for name, module in pipe.components.items()
            if hasattr(module, "parameters")
        }

    base = storage(pipeline.pipe)
    assert base["unet"] and base["controlnet"] and base["vae"]
    assert storage(pipeline.img2img) == base
    assert {k: v for k, v in storage(pipeline.inpaint).items() if k in base} == base
    assert pipeline.img2img.dtype == pipeline.inpaint.dtype == pipeline.pipe.dtype


@pytest.mark.parametrize(("strength", "steps"), [(0.5, 2), (0.25, 1), (1.0, 4)])
@pytest.mark.parametrize("inpaint", [False, True])
def test_strength_runs_its_share_of_the_steps(pipeline, strength, steps, inpaint) -> None:
    edges, start, mask = pictures()
    params = GenerationParams(**FAST, strength=strength)
    assert params.steps == steps
    progress: list[tuple[int, int]] = []
    images = pipeline.generate(
        GPURequest.of(params, edges, init_image=start, mask=mask if inpaint else None),
        lambda done, total: progress.append((done, total)),
    )
    assert images.shape == (1, HEIGHT, WIDTH, 3)
    assert progress == [(i, steps) for i in range(1, steps + 1)]


@pytest.mark.parametrize("mode", ["image-to-image", "inpainting"])
def test_same_inputs_and_seed_give_the_same_bytes(pipeline, mode) -> None:
    edges, start, mask = pictures()
    params = GenerationParams(**FAST, strength=0.75)
    kept = mask if mode == "inpainting" else None
    first, again = (
        pipeline.generate(GPURequest.of(params, edges, init_image=start, mask=kept))
        for _ in range(2)
    )
    assert np.array_equal(first, again)
    other_seed = pipeline.generate(
        GPURequest.of(params.model_copy(update={"seed": 8}), edges, init_image=start, mask=kept)
    )
    assert not np.array_equal(first, other_seed)


def test_inpainting_keeps_what_the_mask_keeps(pipeline) -> None:
    """Two seeds repaint the white half differently and leave the black half as the start
    picture's (the decoder's reach across the border aside)."""
    edges, start, mask = pictures()
    a, b = (
        pipeline.generate(
            GPURequest.of(
                GenerationParams(**{**FAST, "seed": s}, strength=1.0),
                edges,
                init_image=start,
                mask=mask,
            )
        )[0].astype(int)
        for s in (1, 2)
    )
    kept = np.abs(a - b)[:, : WIDTH // 2 - 8].mean()
    repainted = np.abs(a - b)[:, WIDTH // 2 + 8 :].mean()
    assert kept * 4 < repainted, (kept, repainted)


def test_the_gpu_service_holds_pictures_to_the_edge_map(pipeline) -> None:
    edges, start, mask = pictures()
    params = GenerationParams(**FAST, strength=0.5)
    with pytest.raises(InvalidRequest, match=r"init_image must be a uint8 array of shape"):
        GPURequest.of(params, edges, init_image=start[:32]).checked()
    with pytest.raises(InvalidRequest, match="mask needs init_image"):
        GPURequest.of(GenerationParams(**FAST), edges, mask=mask).checked()
    with pytest.raises(InvalidRequest, match="strength and init_image go together"):
        GPURequest.of(params, edges).checked()
    # The one Canny control or the controls of params.controls, one of the two.
    stack = np.repeat(edges[None, :, :, None], 3, axis=3)
    for neither_or_both in (GPURequest.of(params), GPURequest.of(params, edges, stack)):
        with pytest.raises(InvalidRequest, match=r"send edges .* or controls .*: one of the two"):
            neither_or_both.checked()


async def generate(front, **uploads) -> tuple[np.ndarray, dict]:
    params = uploads.pop("params")
    response = await front.generate(image=uploads.pop("image", shapes_image(96, 64)),
                                    params=Params(**params), **uploads)  # fmt: skip
    assert response.status_code == 200, response.body
    return as_array(decode(response.body)), json.loads(response.headers["X-Params"])


@pytest.mark.parametrize("blur", [0, 4])
async def test_inpainting_gives_back_every_unmasked_pixel_to_the_byte(front, blur) -> None:
    """Outside the mask and its fade, the start picture's pixels (PNG: lossless); inside,
    a repaint; without keep_unmasked, the VAE's round trip shifts the kept half too."""
    start = photo(WIDTH, HEIGHT)
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    mask.paste(255, (WIDTH // 2, 0, WIDTH, HEIGHT))
    expected = preprocessing.start_picture(start, (WIDTH, HEIGHT), "crop_and_resize")
    kept_side = slice(0, WIDTH // 2 - blur)
    params = {**FAST, "mask_blur": blur}
    image, used = await generate(front, params=params, init_image=start, mask=mask)
    assert (used["mode"], used["keep_unmasked"], used["mask_blur"]) == ("inpainting", True, blur)
    assert np.array_equal(image[:, kept_side], expected[:, kept_side])
    repainted = np.abs(image.astype(int) - expected)[:, WIDTH // 2 + blur :].mean()
    assert repainted > 10, repainted
    decoded, _ = await generate(
        front, params={**params, "keep_unmasked": False}, init_image=start, mask=mask
    )
    assert not np.array_equal(decoded[:, kept_side], expected[:, kept_side])
    # The repaint itself is the same: only what is put back differs.
    assert np.array_equal(decoded[:, WIDTH // 2 + blur :], image[:, WIDTH // 2 + blur :])


@pytest.mark.parametrize(
    ("uploads", "strength", "mode", "strength_used"),
    [
        ({}, None, "text-to-image", None),
        ({}, 0.6, "image-to-image", 0.6),  # restyle the upload itself
        ({"init_image": True}, None, "image-to-image", 0.8),
        ({"mask": True}, None, "inpainting", 1.0),  # inpaint the upload itself
        ({"init_image": True, "mask": True}, 0.9, "inpainting", 0.9),
    ],
)
async def test_the_front_resolves_the_mode_and_its_strength(
    front, uploads, strength, mode, strength_used
) -> None:
    files = {
        "init_image": photo(120, 80) if "init_image" in uploads else None,
        "mask": Image.new("L", (96, 64), 255) if "mask" in uploads else None,
    }
    params = {**FAST, **({"strength": strength} if strength else {})}
    image, used = await generate(front, params=params, **files)
    assert image.shape == (64, 96, 3)
    assert (used["mode"], used["strength"]) == (mode, strength_used)


async def test_batch_results_say_which_mode_ran(front) -> None:
    result = await front.generate_batch(
        image=shapes_image(96, 64),
        params=Params(**FAST, num_images=2),
        init_image=photo(96, 64),
        mask=Image.new("L", (96, 64), 255),
    )
    assert (result.params.mode, result.params.strength) == ("inpainting", 1.0)
    assert len(result.images) == 2


@pytest.mark.parametrize(
    ("params", "mask", "message"),
    [
        ({"mode": "inpainting"}, None, "the files sent make text-to-image, not inpainting"),
        ({}, Image.new("L", (96, 64), 0), "mask: it is all black"),
        ({}, Image.new("RGBA", (96, 64), (255, 255, 255, 0)), "mask: it is all black"),
    ],
)
async def test_what_cannot_run_is_a_400_naming_the_field(front, params, mask, message) -> None:
    request = Params(**FAST, **params)
    response = await front.generate(image=shapes_image(96, 64), params=request, mask=mask)
    assert response.status_code == 400
    assert message in json.loads(response.body)["error"]


def test_a_default_strength_that_leaves_no_step_is_a_400() -> None:
    with pytest.raises(InvalidRequest, match=r"0.8 × 1 makes none"):
        preprocessing.prepare(
            shapes_image(96, 64), Params(prompt="x", num_inference_steps=1), photo(96, 64)
        )


@pytest.mark.parametrize(
    "mask",
    [
        Image.new("L", (48, 32), 255),  # smaller: fitted
        Image.new("1", (96, 64), 1),
        Image.new("RGB", (192, 128), "white"),
        Image.new("RGBA", (96, 64), (255, 255, 255, 255)),  # opaque: read by its white
        Image.new("LA", (96, 64), (0, 200)),  # transparent somewhat: the alpha says repaint
    ],
)
def test_masks_of_any_mode_and_size_are_fitted(mask) -> None:
    fitted = preprocessing.repaint_mask(mask, (96, 64), "crop_and_resize")
    assert fitted.shape == (64, 96) and fitted.dtype == np.uint8
    assert (fitted >= 128).all()


def test_an_opaque_rgba_mask_is_read_by_its_white_as_a_canvas_exports_it() -> None:
    """A browser canvas exports RGBA with every pixel opaque: its alpha says nothing."""
    mask = Image.new("RGBA", (96, 64), (0, 0, 0, 255))
    mask.paste((255, 255, 255, 255), (48, 0, 96, 64))
    fitted = preprocessing.repaint_mask(mask, (96, 64), "crop_and_resize")
    assert (fitted[:, 48:] == 255).all() and (fitted[:, :48] == 0).all()


@pytest.mark.parametrize(
    ("resize_mode", "columns"),
    [
        ("resize", (0, 255, 255, 255)),
        ("crop_and_resize", (0, 255, 255, 255)),
        ("resize_and_fill", (0, 0, 255, 0)),
    ],
)
def test_a_mask_meets_the_output_like_the_control_image(resize_mode, columns) -> None:
    """A square mask, white but for its left quarter, on an output twice as wide: stretched,
    covering (cropped top and bottom), or fitted between black bands, which keep."""
    mask = np.full((64, 64), 255, np.uint8)
    mask[:, :16] = 0
    fitted = preprocessing.repaint_mask(Image.fromarray(mask), (128, 64), resize_mode)
    assert fitted.shape == (64, 128)
    assert tuple(fitted[32, [16, 40, 64, 120]]) == columns


def test_a_start_picture_is_sized_like_the_control_image() -> None:
    picture = photo(300, 200)
    params = Params(prompt="x", width=96, height=64, resize_mode="crop_and_resize")
    request, resolved = preprocessing.prepare(shapes_image(300, 200), params, picture)
    assert request.controls.shape == (1, 64, 96, 1)
    assert request.init_image.shape == (64, 96, 3) and request.mask is None
    assert (resolved.width, resolved.height, resolved.mode) == (96, 64, "image-to-image")


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m", "lcm"])
@pytest.mark.parametrize("inpaint", [False, True])
def test_samplers_adapters_and_the_guidance_window_work_from_a_picture(
    pipeline, scheduler, inpaint
) -> None:
    edges, start, mask = pictures()
    kept = mask if inpaint else None
    base = GenerationParams(
        **FAST, strength=0.75, scheduler=scheduler, control_guidance_end=0.5, guess_mode=True
    )
    styled = base.model_copy(update={"loras": [LoraChoice(name="style")]})
    plain, with_style, plain_again = (
        pipeline.generate(GPURequest.of(p, edges, init_image=start, mask=kept))
        for p in (base, styled, base)
    )
    assert plain.shape == with_style.shape == (1, HEIGHT, WIDTH, 3)
    assert not np.array_equal(plain, with_style)  # the adapter took effect
    assert np.array_equal(plain, plain_again)  # and is off again


def test_a_few_step_preset_runs_its_share_of_steps_from_a_picture(pipeline) -> None:
    edges, start, _ = pictures()
    params = GenerationParams(prompt="x", seed=1, strength=0.5, loras=[{"name": "fast"}])
    assert (params.num_inference_steps, params.steps) == (4, 2)
    progress: list[int] = []
    pipeline.generate(
        GPURequest.of(params, edges, init_image=start), lambda done, _: progress.append(done)
    )
    assert progress == [1, 2]


def test_a_canceled_inpainting_stops_at_its_next_step(pipeline) -> None:
    edges, start, mask = pictures()
    progress: list[int] = []
    with pytest.raises(GenerationCanceled):
        pipeline.generate(
            GPURequest.of(
                GenerationParams(**FAST, strength=1.0), edges, init_image=start, mask=mask
            ),
            lambda done, _: progress.append(done),
            lambda: bool(progress),
        )
    assert progress == [1]


def test_out_of_memory_from_a_picture_is_the_507_it_is_elsewhere(pipeline, monkeypatch) -> None:
    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(type(pipeline.img2img), "__call__", out_of_memory)
    edges, start, _ = pictures()
    with pytest.raises(GPUOutOfMemory) as error:
        pipeline.generate(
            GPURequest.of(GenerationParams(**FAST, strength=0.5), edges, init_image=start)
        )
    assert error.value.error_code == 507
