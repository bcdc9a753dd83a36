"""What TORCH_COMPILE compiles, as torch._dynamo.explain sees it on the tiny model: the UNet
(with the ControlNet's residuals and without), the ControlNet (behind the skip of
control_skip.py) and the VAE's decoder each trace as one graph with no break, given the
inputs a real request gives them, made graph inputs as compilation.py makes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdxl_controlnet.gpu import compilation
from sdxl_controlnet.schemas import GenerationParams, GPURequest
from tests.service.pipelines import tiny_pipeline

pytestmark = pytest.mark.compile


@pytest.fixture(scope="module")
def calls() -> dict[str, tuple[torch.nn.Module, list[tuple[tuple, dict]]]]:
    """Each compiled module and the (args, kwargs) of its calls in one request: two steps,
    the guidance window ending after the first, so the UNet's second call has no residuals."""
    pipeline = tiny_pipeline()
    pipe = pipeline.pipe
    modules = {"unet": pipe.unet, "controlnet": pipe.controlnet, "vae decoder": pipe.vae.decoder}
    seen: dict[str, list[tuple[tuple, dict]]] = {name: [] for name in modules}
    hooks = [
        module.register_forward_pre_hook(
            lambda _, args, kwargs, name=name: seen[name].append((args, dict(kwargs))),
            with_kwargs=True,
        )
        for name, module in modules.items()
    ]
    params = GenerationParams(prompt="x", num_inference_steps=2, control_guidance_end=0.5, seed=0)
    try:
        pipeline.generate(GPURequest.of(params, np.zeros((64, 64), np.uint8)))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: (modules[name], seen[name]) for name in modules}


def explained(module: torch.nn.Module, args: tuple, kwargs: dict) -> object:
    with torch.inference_mode():  # as the pipeline runs them: its tensors are inference ones
        return torch._dynamo.explain(module)(*args, **kwargs)


@pytest.mark.parametrize(("call", "residuals"), [(0, True), (1, False)])
def test_the_unet_is_one_graph_with_and_without_residuals(calls, call, residuals) -> None:
    unet, seen = calls["unet"]
    args, kwargs = compilation._as_graph_inputs(*seen[call])
    assert ("down_block_additional_residuals" in kwargs) == residuals
    explanation = explained(unet, args, kwargs)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation


def test_the_controlnet_is_one_graph(calls) -> None:
    controlnet, seen = calls["controlnet"]
    args, kwargs = compilation._as_graph_inputs(*seen[0])
    kwargs["conditioning_scale"] = torch.tensor(float(kwargs["conditioning_scale"]))
    explanation = explained(controlnet, args, kwargs)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation


def test_the_vae_decoder_is_one_graph(calls) -> None:
    decoder, seen = calls["vae decoder"]
    (latents, *rest), kwargs = seen[0]
    explanation = explained(decoder, (latents.contiguous(), *rest), kwargs)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation


# The full-size models, on the meta device (no memory, no arithmetic), traced whole by
# dynamo as a GPU would compile them: what reached the graph is inspected, not run.
SIDE = 1024
META = torch.device("meta")


def inspected(module: torch.nn.Module, *args: object, **kwargs: object) -> list[str]:
    """What in ``module``'s one graph (fullgraph) would stall or break a GPU's: a value read
    back to the host (item, cpu, tolist, numpy) or a tensor on the CPU."""
    problems: list[str] = []

    def inspecting(graph: torch.fx.GraphModule, inputs: list) -> object:
        for node in graph.graph.nodes:
            name = getattr(node.target, "__name__", node.target)
            if node.op in ("call_method", "call_function") and name in HOST_READS:
                problems.append(f"{node.op} {name}")
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                problems.append(f"a CPU tensor: {node.format_node()}")
        return graph.forward

    with torch.inference_mode():
        torch.compile(module, backend=inspecting, fullgraph=True, dynamic=False)(*args, **kwargs)
    return problems


HOST_READS = ("item", "cpu", "tolist", "numpy")


@pytest.fixture(scope="module")
def full_size() -> dict[str, object]:
    from devtools.full_size_model import build_components

    modules = {name: module.half() for name, module in build_components(META).items()}
    half = {"device": META, "dtype": torch.float16}
    latents = torch.empty(2, 4, SIDE // 8, SIDE // 8, **half)
    unet_inputs = {
        "sample": latents,
        "timestep": torch.tensor(999.0, device=META),
        "encoder_hidden_states": torch.empty(2, 77, 2048, **half),
        "added_cond_kwargs": {
            "text_embeds": torch.empty(2, 1280, **half),
            "time_ids": torch.empty(2, 6, **half),
        },
    }
    control = {
        "controlnet_cond": torch.empty(2, 3, SIDE, SIDE, **half),
        "conditioning_scale": torch.tensor(0.5, device=META),
        "return_dict": False,
    }
    with torch.inference_mode():
        down, mid = modules["controlnet"](**unet_inputs, **control)  # shapes only, on meta
    return {**modules, "unet_inputs": unet_inputs, "control": control, "down": down, "mid": mid}


@pytest.mark.parametrize("residuals", [True, False], ids=["with residuals", "without"])
def test_the_full_size_unet_traces_whole_with_nothing_read_back(full_size, residuals) -> None:
    extra = {}
    if residuals:
        extra = {
            "down_block_additional_residuals": full_size["down"],
            "mid_block_additional_residual": full_size["mid"],
        }
    unet_inputs = full_size["unet_inputs"]
    assert inspected(full_size["unet"], **unet_inputs, **extra, return_dict=False) == []


def test_the_full_size_controlnet_traces_whole_with_nothing_read_back(full_size) -> None:
    unet_inputs, control = full_size["unet_inputs"], full_size["control"]
    assert inspected(full_size["controlnet"], **unet_inputs, **control) == []


def test_the_full_size_vae_decoder_traces_whole_with_nothing_read_back(full_size) -> None:
    latents = torch.empty(1, 4, SIDE // 8, SIDE // 8, device=META, dtype=torch.float16)
    assert inspected(full_size["vae"].decoder, latents) == []


def test_the_inspection_finds_a_cpu_tensor_in_the_graph() -> None:
    """The check above can fail: a 0-dim CPU tensor mixed into the work (each call would
    copy it to the GPU) is named."""

    class Scaled(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.tensor(2.0)

    problems = inspected(Scaled(), torch.empty(4, device=META))
    assert problems and all(problem.startswith("a CPU tensor") for problem in problems)
