"""Several controls in one generation, in one process, on each configuration the GPU Service
loads: the one Canny ControlNet, Canny + depth, and a ControlNet Union. Every mode takes one
control or two, the same seed gives the same bytes, and each control steers the image."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers.models import MultiControlNetModel

from devtools.harness import TINY_MODEL, photo
from devtools.tiny_model import (
    BASE_SUBDIR,
    CONTROLNET_SUBDIR,
    DEPTH_SUBDIR,
    UNION_SUBDIR,
    VAE_SUBDIR,
)
from sdxl_controlnet.gpu import control_skip
from sdxl_controlnet.gpu.pipeline import ControlNetError, ControlNetPipeline
from sdxl_controlnet.schemas import ControlSettings, GenerationParams, GPURequest

HEIGHT, WIDTH = 64, 96
CONFIGURATIONS = {
    "canny": {"canny": CONTROLNET_SUBDIR},
    "canny+depth": {"canny": CONTROLNET_SUBDIR, "depth": DEPTH_SUBDIR},
    "union": {"union": UNION_SUBDIR},
}
MODES = ["text-to-image", "image-to-image", "inpainting"]


def load(configuration: str) -> ControlNetPipeline:
    controlnets = {
        name: str(TINY_MODEL / subdir) for name, subdir in CONFIGURATIONS[configuration].items()
    }
    return ControlNetPipeline(
        str(TINY_MODEL / BASE_SUBDIR), controlnets, str(TINY_MODEL / VAE_SUBDIR)
    )


@pytest.fixture(scope="module", params=list(CONFIGURATIONS))
def configured(request) -> tuple[str, ControlNetPipeline]:
    return request.param, load(request.param)


def control(kind: str, **settings: float) -> ControlSettings:
    # Constructed, not validated: this process's settings declare the Canny ControlNet
    # alone, and what a server offers is the front's check (tests/unit/test_controls.py).
    return ControlSettings.model_construct(
        **{"type": kind, "scale": 0.8, "start": 0.0, "end": 1.0, **settings}
    )


def kinds(configuration: str, count: int) -> list[str]:
    return ["canny", "canny" if configuration == "canny" else "depth"][:count]


def images(count: int) -> np.ndarray:
    rng = np.random.default_rng(count)
    return rng.integers(0, 256, (count, HEIGHT, WIDTH, 3), dtype=np.uint8)


def mode_inputs(mode: str) -> tuple[dict, dict]:
    """The pictures and params a mode adds."""
    if mode == "text-to-image":
        return {}, {}
    start = np.asarray(photo(WIDTH, HEIGHT).convert("RGB"))
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[:, WIDTH // 2 :] = 255
    pictures = {"init_image": start} | ({"mask": mask} if mode == "inpainting" else {})
    return pictures, {"strength": 0.75}


def params(controls: list[ControlSettings], **fields: object) -> GenerationParams:
    values = {"prompt": "a red ball", "num_inference_steps": 4, "seed": 7, **fields}
    return GenerationParams(**values).model_copy(update={"controls": controls})


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_takes_one_control_or_two_and_the_same_seed_gives_the_same_bytes(
    configured, mode: str
) -> None:
    configuration, pipeline = configured
    pictures, fields = mode_inputs(mode)
    made = {}
    for count in (1, 2):
        request = params([control(kind) for kind in kinds(configuration, count)], **fields)
        first = pipeline.generate(GPURequest.of(request, controls=images(2)[:count], **pictures))
        again = pipeline.generate(GPURequest.of(request, controls=images(2)[:count], **pictures))
        assert first.shape == (1, HEIGHT, WIDTH, 3) and first.dtype == np.uint8
        np.testing.assert_array_equal(first, again)
        made[count] = first
    assert not np.array_equal(made[1], made[2]), "the second control changed nothing"


def test_one_control_is_the_one_control_fields_request_to_the_byte(configured) -> None:
    """``controls=[canny]`` is the request without controls: the same edges, scale and
    window make the same image, on every configuration that serves Canny."""
    _, pipeline = configured
    edges = images(1)[0, :, :, 0]
    one = params([], controlnet_conditioning_scale=0.8, control_guidance_end=0.75)
    listed = params([control("canny", end=0.75)])
    as_rgb = np.repeat(edges[None, :, :, None], 3, axis=3)
    np.testing.assert_array_equal(
        pipeline.generate(GPURequest.of(one, edges)),
        pipeline.generate(GPURequest.of(listed, controls=as_rgb)),
    )


def test_each_control_steers_by_its_own_image_scale_and_window(configured) -> None:
    configuration, pipeline = configured
    two = kinds(configuration, 2)
    base = pipeline.generate(GPURequest.of(params([control(k) for k in two]), controls=images(2)))
    other = images(2)
    other[1] = 255 - other[1]
    variants = [
        (params([control(k) for k in two]), other),  # the second image changed
        (params([control(two[0]), control(two[1], scale=1.6)]), images(2)),
        (params([control(two[0]), control(two[1], start=0.5)]), images(2)),
    ]
    for request, controls in variants:
        assert not np.array_equal(
            base, pipeline.generate(GPURequest.of(request, controls=controls))
        )


def test_a_union_steers_by_the_type_it_is_told() -> None:
    pipeline = load("union")
    picture = images(1)
    canny, depth = (
        pipeline.generate(GPURequest.of(params([control(k)]), controls=picture))
        for k in ("canny", "depth")
    )
    assert not np.array_equal(canny, depth)
    # Types that share a mode of the Union's are the same control to it.
    lineart = pipeline.generate(GPURequest.of(params([control("lineart")]), controls=picture))
    np.testing.assert_array_equal(canny, lineart)


@pytest.mark.parametrize(
    "windows",
    [
        [(0.8, 0.0, 1.0), (0.8, 0.5, 1.0)],  # the second starts halfway
        [(0.8, 0.0, 0.5), (0.0, 0.0, 1.0)],  # the first stops, the second never steers
        [(0.0, 0.0, 1.0), (0.0, 0.0, 1.0)],  # neither steers: no ControlNet runs at all
    ],
)
def test_leaving_out_controls_that_add_nothing_changes_no_byte(windows, monkeypatch) -> None:
    """Combined, which skips a ControlNet at scale 0 or outside its window, against
    diffusers' MultiControlNetModel running every one at every step."""
    pipeline = load("canny+depth")
    request = params(
        [
            control(k, scale=s, start=a, end=b)
            for k, (s, a, b) in zip(("canny", "depth"), windows, strict=True)
        ]
    )
    skipping = pipeline.generate(GPURequest.of(request, controls=images(2)))
    for net in pipeline.controlnets.values():
        del net.forward  # the skip wrapper (control_skip.skip_when_unscaled)
    monkeypatch.setattr(control_skip, "Combined", MultiControlNetModel)
    np.testing.assert_array_equal(
        skipping, pipeline.generate(GPURequest.of(request, controls=images(2)))
    )


@pytest.mark.parametrize(
    ("name", "subdir", "said"),
    [
        ("depth", UNION_SUBDIR, "a ControlNet Union: name it union"),
        ("union", DEPTH_SUBDIR, "not a ControlNet Union"),
    ],
)
def test_a_controlnet_declared_as_what_it_is_not_stops_start_up(name, subdir, said) -> None:
    with pytest.raises(ControlNetError, match=said):
        ControlNetPipeline(
            str(TINY_MODEL / BASE_SUBDIR),
            {name: str(TINY_MODEL / subdir)},
            str(TINY_MODEL / VAE_SUBDIR),
        )
