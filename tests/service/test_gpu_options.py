"""The GPU speed-ups and safety nets a deployment turns on by configuration, run
for real on the tiny pipeline: torch.compile with inductor (it compiles on the CPU
too), channels-last, fused QKV, the device choice and out-of-memory handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from sdxl_controlnet import pipeline as pipeline_module
from sdxl_controlnet.errors import GPUOutOfMemory
from sdxl_controlnet.pipeline import ControlNetPipeline, NoGPUError, select_device
from sdxl_controlnet.schemas import GenerationParams
from sdxl_controlnet.settings import settings

PARAMS = GenerationParams(prompt="a red ball", num_inference_steps=2, seed=5)


def edges(height: int = 64, width: int = 96) -> np.ndarray:
    edge_map = np.zeros((height, width), np.uint8)
    edge_map[16:48, 24] = 255
    return edge_map


def load(**options) -> ControlNetPipeline:
    return ControlNetPipeline(
        settings.sdxl_base_model, settings.sdxl_controlnet_model, settings.sdxl_vae_model, **options
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


def compiled_graphs() -> int:
    return sum(counters["stats"].values()) and counters["stats"]["unique_graphs"]


def test_compiled_pipeline_compiles_at_warm_up_only_and_matches_eager() -> None:
    torch._dynamo.reset()
    eager = load().submit(edges(64, 64), PARAMS).result()
    compiled = load(compile_sizes=[(64, 64)])  # inductor, for real
    after_warm_up = compiled_graphs()
    assert after_warm_up > 0, "the warm-up compiled nothing"

    # A warmed size runs the compiled graphs and compiles nothing more.
    images = compiled.submit(edges(64, 64), PARAMS).result()
    assert compiled.pipe.unet is compiled._compiled[0]
    assert compiled_graphs() == after_warm_up
    assert np.abs(images.astype(int) - eager).max() <= 3

    # Another size, or another batch, runs uncompiled rather than compiling in a request.
    other = compiled.submit(edges(64, 96), PARAMS.model_copy(update={"num_images": 2})).result()
    assert other.shape == (2, 64, 96, 3)
    assert compiled.pipe.unet is compiled._eager[0]
    assert compiled_graphs() == after_warm_up


def test_out_of_memory_frees_the_cache_and_the_pipeline_keeps_serving(monkeypatch) -> None:
    pipeline = load()
    real_call = type(pipeline.pipe).__call__
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(type(pipeline.pipe), "__call__", out_of_memory)
    with pytest.raises(GPUOutOfMemory, match="ran out of memory generating 1 image"):
        pipeline.submit(edges(), PARAMS).result()
    assert emptied == [True]

    monkeypatch.setattr(type(pipeline.pipe), "__call__", real_call)
    assert pipeline.submit(edges(), PARAMS).result().shape == (1, 64, 96, 3)


def test_without_cuda_the_gpu_service_refuses_to_start_unless_cpu_is_allowed() -> None:
    assert not torch.cuda.is_available()
    with pytest.raises(NoGPUError, match="set ALLOW_CPU=1"):
        select_device(allow_cpu=False, worker_index=1)
    assert select_device(allow_cpu=True, worker_index=1) == "cpu"


@pytest.mark.parametrize(
    ("worker_index", "gpus", "device"),
    [(None, 1, "cuda:0"), (1, 1, "cuda:0"), (1, 4, "cuda:0"), (2, 4, "cuda:1"), (4, 4, "cuda:3")],
)
def test_each_worker_takes_its_own_gpu(monkeypatch, worker_index, gpus, device) -> None:
    monkeypatch.setattr(pipeline_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pipeline_module.torch.cuda, "device_count", lambda: gpus)
    assert select_device(allow_cpu=False, worker_index=worker_index) == device
