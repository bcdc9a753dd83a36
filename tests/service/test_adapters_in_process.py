"""LoRA adapters on the tiny pipeline, in one process: chosen per request, combined,
switched without a reload, presets for few-step adapters, and a base model that stays
the base model bit for bit. The adapters are random (devtools.tiny_lora), declared for
the whole test process by tests/conftest.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

import service
from devtools.harness import TINY_ADAPTERS, as_array, decode, shapes_image
from sdxl_controlnet.gpu.pipeline import AdapterError, ControlNetPipeline
from sdxl_controlnet.schemas import GenerationParams, GPURequest, Params
from sdxl_controlnet.settings import settings

pytestmark = pytest.mark.anyio

FAST = {"prompt": "a red ball", "num_inference_steps": 2, "seed": 7}
WEIGHTS = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def front():
    return service.ControlNet()


@pytest.fixture
def pipeline_calls(front, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The arguments of each diffusers call, with the scheduler and its spacing."""
    calls: list[dict] = []
    pipe = front.controlnet_service.worker.pipeline.pipe
    real_call = type(pipe).__call__

    def recording_call(self, *args, **kwargs):
        config = self.scheduler.config
        calls.append(
            {**kwargs, "scheduler": (type(self.scheduler).__name__, config.timestep_spacing)}
        )
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", recording_call)
    return calls


async def pixels(front, **params) -> np.ndarray:
    response = await front.generate(image=shapes_image(96, 64), params=Params(**FAST, **params))
    assert response.status_code == 200, response.body
    return as_array(decode(response.body))


def test_the_declared_adapters_are_loaded_once_and_left_unfused(front) -> None:
    pipe = front.controlnet_service.worker.pipeline.pipe
    assert set(settings.lora_adapters) == {"style", "detail", "fast"}
    assert sorted(pipe.get_list_adapters()["unet"]) == ["detail", "fast", "style"]
    assert not any(getattr(m, "merged", False) for m in pipe.unet.modules())


async def test_an_adapter_changes_the_image_and_scale_0_is_the_base_bit_for_bit(front) -> None:
    base = await pixels(front)
    styled = await pixels(front, loras=[{"name": "style"}])
    assert not np.array_equal(styled, base)
    assert np.array_equal(await pixels(front, loras=[{"name": "style", "scale": 0}]), base)
    half = await pixels(front, loras=[{"name": "style", "scale": 0.5}])
    assert not np.array_equal(half, base) and not np.array_equal(half, styled)


async def test_two_adapters_combine_and_switching_back_restores_each_image(front) -> None:
    base = await pixels(front)
    style = await pixels(front, loras=[{"name": "style"}])
    detail = await pixels(front, loras=[{"name": "detail"}])
    both = await pixels(front, loras=[{"name": "style"}, {"name": "detail", "scale": 0.8}])
    assert len({a.tobytes() for a in (base, style, detail, both)}) == 4
    # Switching costs no reload, and leaves nothing behind: the same images again.
    assert np.array_equal(await pixels(front), base)
    assert np.array_equal(await pixels(front, loras=[{"name": "style"}]), style)
    assert np.array_equal(await pixels(front, loras=[{"name": "detail"}]), detail)
    assert np.array_equal(await pixels(front), base)


async def test_the_base_model_ignores_declared_adapters_bit_for_bit(front) -> None:
    """A pipeline without any adapter gives the same bytes as one with three, unused."""
    plain = ControlNetPipeline(
        settings.sdxl_base_model, settings.sdxl_controlnet_model, settings.sdxl_vae_model
    )
    edges = np.zeros((64, 96), np.uint8)
    edges[16:48, 24] = 255
    params = GenerationParams(**FAST)
    served = front.controlnet_service.worker.pipeline.submit(GPURequest.of(params, edges)).result()
    assert np.array_equal(plain.generate(GPURequest.of(params, edges)), served)


async def test_a_preset_applies_unless_the_request_sets_the_value(front, pipeline_calls) -> None:
    request = {"prompt": "x", "seed": 1}
    response = await front.generate(
        image=shapes_image(64, 64), params=Params(**request, loras=[{"name": "fast"}])
    )
    used = json.loads(response.headers["x-params"])
    assert (used["scheduler"], used["num_inference_steps"], used["guidance_scale"]) == (
        "euler_trailing",
        4,
        0,
    )
    assert used["loras"] == [{"name": "fast", "scale": 1.0}]
    assert pipeline_calls[-1]["num_inference_steps"] == 4
    assert pipeline_calls[-1]["guidance_scale"] == 0
    assert pipeline_calls[-1]["scheduler"] == ("EulerDiscreteScheduler", "trailing")

    own = Params(**request, loras=[{"name": "fast"}], num_inference_steps=2, scheduler="lcm")
    response = await front.generate(image=shapes_image(64, 64), params=own)
    used = json.loads(response.headers["x-params"])
    assert (used["scheduler"], used["num_inference_steps"], used["guidance_scale"]) == (
        "lcm",
        2,
        0,  # still the preset's: the request did not set it
    )
    assert pipeline_calls[-1]["scheduler"][0] == "LCMScheduler"

    response = await front.generate(image=shapes_image(64, 64), params=Params(**request))
    used = json.loads(response.headers["x-params"])
    assert (used["scheduler"], used["num_inference_steps"]) == ("euler", 25)  # no preset


def test_the_preset_reaches_the_gpu_service_resolved() -> None:
    params = Params(prompt="x", loras=[{"name": "fast", "scale": 0.5}], seed=1)
    sent = params.generation_params()
    assert (sent.num_inference_steps, sent.scheduler, sent.guidance_scale) == (
        4,
        "euler_trailing",
        0,
    )


@pytest.mark.parametrize(
    ("loras", "message"),
    [
        (
            [{"name": "nope"}],
            "loras.0.name: unknown adapter 'nope'; this server has: detail, fast, style",
        ),
        (
            [{"name": "style", "scale": 2.5}],
            "loras.0.scale: Input should be less than or equal to 2",
        ),
        (
            [{"name": "style", "scale": float("nan")}],
            "loras.0.scale: Input should be a finite number",
        ),
        ([{"name": "style"}, {"name": "style"}], "loras: name each adapter at most once"),
        ([{"name": "style", "weight": 1}], "loras.0.weight: Extra inputs are not permitted"),
    ],
)
def test_bad_adapter_choices_are_refused_naming_the_field(loras, message) -> None:
    from sdxl_controlnet.errors import validation_body

    with pytest.raises(ValidationError) as error:
        Params(prompt="x", loras=loras)
    assert message in validation_body(error.value)["error"]


def test_the_schema_lists_the_adapters_and_their_presets() -> None:
    schema = Params.model_json_schema()
    loras = schema["properties"]["loras"]
    choice = schema["$defs"]["LoraChoice"]["properties"]
    assert choice["name"]["enum"] == ["detail", "fast", "style"]
    assert (choice["scale"]["minimum"], choice["scale"]["maximum"]) == (-2, 2)
    assert loras["x-presets"]["fast"] == {
        "scheduler": "euler_trailing",
        "num_inference_steps": 4,
        "guidance_scale": 0,
    }


def load_with(adapters: dict[str, tuple[str, str]]) -> ControlNetPipeline:
    return ControlNetPipeline(
        settings.sdxl_base_model,
        settings.sdxl_controlnet_model,
        settings.sdxl_vae_model,
        adapters=adapters,
    )


def test_a_missing_adapter_stops_start_up_naming_it(tmp_path) -> None:
    with pytest.raises(AdapterError, match=r"LoRA adapter 'gone' \(.*\): no such file"):
        load_with({"gone": (str(tmp_path / "nowhere"), WEIGHTS)})


@pytest.mark.parametrize("misfit", ["shapes", "layers"])
def test_an_adapter_for_another_model_stops_start_up_naming_it(tmp_path, misfit) -> None:
    weights = load_file(TINY_ADAPTERS / "style" / WEIGHTS)
    if misfit == "shapes":  # a LoRA for wider layers
        weights = {k: v.repeat(1, 2) if "lora_A" in k else v for k, v in weights.items()}
    else:  # a LoRA for layers this UNet does not have
        weights = {k.replace("unet.", "unet.other_"): v for k, v in weights.items()}
    save_file(weights, tmp_path / WEIGHTS)
    with pytest.raises(AdapterError, match=r"LoRA adapter 'misfit' .* does not fit the base model"):
        load_with({"misfit": (str(tmp_path), WEIGHTS)})
