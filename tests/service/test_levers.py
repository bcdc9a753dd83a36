"""The GPU Service's two speed levers, proved on the tiny pipeline across the parameters the
API allows: the ControlNet skipped at steps where its scale is 0, and a repeated prompt's
text encoding taken from a bounded cache. Both give the same bytes as the plain path."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest

from sdxl_controlnet.gpu import control_skip
from sdxl_controlnet.gpu.pipeline import SCHEDULERS, ControlNetPipeline
from sdxl_controlnet.schemas import GenerationParams, GPURequest, LoraChoice
from tests.service.pipelines import ADAPTERS, tiny_pipeline

STYLE = [LoraChoice(name="style", scale=0.8)]
BASE = {"prompt": "a red ball", "num_inference_steps": 4, "seed": 3}
EDGES = np.zeros((64, 64), np.uint8)
EDGES[16:48, 24] = 255
START = np.full((64, 64, 3), 120, np.uint8)
MASK = np.zeros((64, 64), np.uint8)
MASK[:, 32:] = 255


def load(**options: object) -> ControlNetPipeline:
    return tiny_pipeline(adapters=ADAPTERS, **options)


@pytest.fixture(scope="module")
def pipeline() -> ControlNetPipeline:
    return load()


class Calls:
    """Forwards that really ran in a submodule (its hooks fire only then)."""

    def __init__(self, module) -> None:
        self.count = 0
        module.register_forward_hook(lambda *_: setattr(self, "count", self.count + 1))


@contextlib.contextmanager
def controlnet_always_runs(pipeline: ControlNetPipeline) -> Iterator[None]:
    """The plain path: diffusers' own ControlNet call at every step."""
    del pipeline.pipe.controlnet.forward
    try:
        yield
    finally:
        control_skip.skip_when_unscaled(pipeline.pipe.controlnet)


def generate(pipeline: ControlNetPipeline, params: GenerationParams, mode: str) -> tuple:
    """The images, and the number of steps the run took."""
    steps: list[int] = []
    pictures = {
        "text": {},
        "image": {"init_image": START},
        "inpaint": {"init_image": START, "mask": MASK},
    }[mode]
    images = pipeline.generate(
        GPURequest.of(params, EDGES, **pictures), on_step=lambda done, total: steps.append(total)
    )
    return images, steps[-1]


def steps_with_control(params: GenerationParams, steps: int) -> int:
    """diffusers' rule: step i is controlled unless i/n < start or (i+1)/n > end."""
    if params.guess_mode:
        return steps
    if params.controlnet_conditioning_scale == 0:
        return 0
    start, end = params.control_guidance_start, params.control_guidance_end
    return sum(not (i / steps < start or (i + 1) / steps > end) for i in range(steps))


SKIP_CASES = [
    *({"scheduler": s, "control_guidance_end": 0.5} for s in SCHEDULERS),
    {"control_guidance_start": 0.5},
    {"control_guidance_start": 0.25, "control_guidance_end": 0.75},
    {"controlnet_conditioning_scale": 0.0},
    {"controlnet_conditioning_scale": 0.0, "guess_mode": True},
    {"control_guidance_end": 0.5, "guess_mode": True},
    {"control_guidance_end": 0.5, "guidance_scale": 0.0, "num_images": 2},
    {"control_guidance_end": 0.5, "loras": STYLE},
    {"control_guidance_end": 0.5, "mode": "image", "strength": 0.75},
    {"control_guidance_end": 0.5, "mode": "inpaint", "strength": 1.0},
    {"control_guidance_start": 0.5, "mode": "inpaint", "strength": 0.5},
    {},  # the default window: every step controlled, nothing skipped
]


@pytest.mark.parametrize("case", SKIP_CASES, ids=lambda case: ",".join(map(str, case.items())))
def test_the_controlnet_is_skipped_where_its_scale_is_0_with_the_same_bytes(pipeline, case) -> None:
    case = dict(case)
    mode = case.pop("mode", "text")
    params = GenerationParams(**{**BASE, **case})
    forwards = Calls(pipeline.pipe.controlnet.conv_in)
    skipped, steps = generate(pipeline, params, mode)
    ran = forwards.count
    with controlnet_always_runs(pipeline):
        plain, _ = generate(pipeline, params, mode)
    assert forwards.count - ran == steps  # the plain path: one ControlNet call a step
    assert ran == steps_with_control(params, steps)
    assert np.array_equal(skipped, plain), case


def test_the_skip_saves_the_controlnet_at_half_the_steps_of_a_half_window(pipeline) -> None:
    forwards = Calls(pipeline.pipe.controlnet.conv_in)
    generate(pipeline, GenerationParams(**BASE, control_guidance_end=0.5), "text")
    assert forwards.count == 2  # of 4 steps


PROMPT_CASES = [
    {},
    {"prompt_2": "in the style of a woodcut"},
    {"negative_prompt": "blurry", "negative_prompt_2": "dark"},
    {"negative_prompt": ""},
    {"guidance_scale": 0.0, "num_images": 2},
    {"loras": STYLE},
    {"loras": [LoraChoice(name="style", scale=0.3)]},
    {"mode": "inpaint", "strength": 1.0},
]


@pytest.fixture(scope="module")
def uncached() -> ControlNetPipeline:
    return load(prompt_cache_size=0)


@pytest.mark.parametrize("case", PROMPT_CASES, ids=lambda case: ",".join(map(str, case.items())))
def test_a_repeated_prompt_skips_the_text_encoders_with_the_same_bytes(
    pipeline, uncached, case
) -> None:
    case = dict(case)
    mode = case.pop("mode", "text")
    params = GenerationParams(**{**BASE, "num_inference_steps": 2, **case})
    encodes = Calls(pipeline.pipe.text_encoder)
    first, _ = generate(pipeline, params, mode)
    after_first = encodes.count
    again, _ = generate(pipeline, params.model_copy(update={"seed": 4}), mode)
    assert encodes.count == after_first  # no text encoder ran for the repeat
    plain, _ = generate(uncached, params, mode)
    assert np.array_equal(first, plain), case
    assert np.array_equal(again, generate(uncached, params.model_copy(update={"seed": 4}), mode)[0])


def test_the_cache_tells_apart_what_changes_the_embeddings_and_stays_bounded() -> None:
    small = load(prompt_cache_size=2)
    encodes = Calls(small.pipe.text_encoder)
    params = GenerationParams(**{**BASE, "num_inference_steps": 1})
    variants = [
        params,
        params.model_copy(update={"negative_prompt": "other"}),
        params.model_copy(update={"loras": STYLE}),  # adapters in force change the key
    ]
    for variant in variants:
        before = encodes.count
        small.generate(GPURequest.of(variant, EDGES))
        assert encodes.count > before, variant  # each one a miss
    assert len(small.prompt_cache) == 2  # the oldest went
    before = encodes.count
    small.generate(GPURequest.of(variants[2], EDGES))
    assert encodes.count == before  # the newest is kept
    small.generate(GPURequest.of(variants[0], EDGES))
    assert encodes.count > before  # the oldest was evicted
