"""Request validation: each rule rejects what it should, with a message naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sdxl_controlnet.schemas import MAX_SEED, GenerationParams, Params
from sdxl_controlnet.settings import settings


def test_defaults_match_the_published_contract() -> None:
    params = Params(prompt="a house")
    assert params.controlnet_conditioning_scale == 0.5
    assert params.num_inference_steps == 25
    assert (params.low_threshold, params.high_threshold) == (100, 200)
    assert params.negative_prompt == ""


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": ""}, "prompt"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": settings.max_steps + 1}, "num_inference_steps"),
        ({"controlnet_conditioning_scale": 2.5}, "controlnet_conditioning_scale"),
        ({"controlnet_conditioning_scale": float("nan")}, "controlnet_conditioning_scale"),
        ({"guidance_scale": float("inf")}, "guidance_scale"),
        ({"low_threshold": 0}, "low_threshold"),
        ({"high_threshold": 256}, "high_threshold"),
        ({"low_threshold": 150, "high_threshold": 100}, "low_threshold must not exceed"),
        ({"control_guidance_start": 0.6, "control_guidance_end": 0.5}, "control_guidance_start"),
        ({"num_images": settings.max_images + 1}, "num_images"),
        ({"seed": -1}, "seed"),
        ({"width": 100, "height": 96}, "multiple of 8"),
        ({"width": 512}, "both width and height"),
        ({"width": 2048, "height": 2048}, "width × height"),
        ({"scheduler": "magic"}, "scheduler"),
        ({"output_format": "gif"}, "output_format"),
        ({"prompt_text": "typo"}, "prompt_text"),
    ],
)
def test_invalid_params_are_rejected_naming_the_rule(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Params(**{"prompt": "a house", **fields})


def test_generation_params_keep_only_what_the_gpu_needs() -> None:
    params = Params(prompt="a house", low_threshold=50, output_format="webp", num_images=2, seed=7)
    generation = params.generation_params()
    assert type(generation) is GenerationParams
    assert generation.seed == 7 and generation.num_images == 2
    assert "low_threshold" not in generation.model_dump()


def test_a_missing_seed_is_drawn_at_random() -> None:
    seeds = {Params(prompt="a house").generation_params().seed for _ in range(5)}
    assert len(seeds) == 5 and all(0 <= seed <= MAX_SEED for seed in seeds)


def test_the_wire_contract_imports_nothing_only_the_front_runs() -> None:
    """schemas.py is read by both Services: nothing from front/, even through what it
    imports (the outbound policy it checks a webhook with is shared; only the front
    connects)."""
    import subprocess
    import sys

    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, sdxl_controlnet.schemas; print(*sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "sdxl_controlnet.outbound" in loaded
    assert not [name for name in loaded if name.startswith("sdxl_controlnet.front")]
