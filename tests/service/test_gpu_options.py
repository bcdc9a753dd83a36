"""The GPU speed-ups and safety nets a deployment turns on by configuration, run
for real on the tiny pipeline: torch.compile with inductor (it compiles on the CPU
too) across every request the API allows, channels-last, fused QKV, the device choice
and out-of-memory handling."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from diffusers.models.attention import BasicTransformerBlock
from prometheus_client import REGISTRY
from torch._dynamo.utils import counters

from devtools.harness import ROOT
from sdxl_controlnet.errors import GPUOutOfMemory
from sdxl_controlnet.gpu import pipeline as pipeline_module
from sdxl_controlnet.gpu.compilation import (
    REPEATED_BLOCKS,
    SPEED_GUIDE,
    compile_options,
    graph_key,
)
from sdxl_controlnet.gpu.pipeline import SCHEDULERS, ControlNetPipeline, NoGPUError, select_device
from sdxl_controlnet.schemas import GenerationParams, GPURequest, LoraChoice
from tests.service.pipelines import ADAPTERS, tiny_pipeline

pytestmark = pytest.mark.compile

PARAMS = GenerationParams(prompt="a red ball", num_inference_steps=2, seed=5)


def edges(height: int = 64, width: int = 96) -> np.ndarray:
    edge_map = np.zeros((height, width), np.uint8)
    edge_map[16:48, 24] = 255
    return edge_map


def test_sdpa_is_the_attention_diffusers_picks() -> None:
    processors = tiny_pipeline().pipe.unet.attn_processors.values()
    assert {type(p).__name__ for p in processors} == {"AttnProcessor2_0"}


def test_channels_last_and_fused_qkv_give_the_same_image() -> None:
    plain = tiny_pipeline().generate(GPURequest.of(PARAMS, edges()))
    fast = tiny_pipeline(channels_last=True, fuse_qkv=True)
    assert fast.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert {type(p).__name__ for p in fast.pipe.unet.attn_processors.values()} == {
        "FusedAttnProcessor2_0"
    }
    images = fast.generate(GPURequest.of(PARAMS, edges()))
    assert images.shape == plain.shape == (1, 64, 96, 3)
    # Same maths, other kernels: the pixels agree to rounding.
    assert np.abs(images.astype(int) - plain).max() <= 2


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def uncompiled(reason: str) -> float:
    """Generations counted as run uncompiled for ``reason``."""
    name = "sdxl_controlnet_uncompiled_generations_total"
    return REGISTRY.get_sample_value(name, {"reason": reason}) or 0.0


STYLE = [LoraChoice(name="style", scale=0.8)]


@pytest.fixture(scope="module")
def eager() -> ControlNetPipeline:
    return tiny_pipeline(adapters=ADAPTERS)


# The default scope in make test; the whole networks too in make test-tooling (their cold
# compile is minutes on two cores).
SCOPES = ["blocks", pytest.param("whole", marks=pytest.mark.thorough)]


@pytest.fixture(scope="module", params=SCOPES)
def compiled(request) -> ControlNetPipeline:
    """Compiled for real with inductor (it compiles on the CPU too), warmed at 64×64: its
    transformer blocks (regional compilation), or each network whole. Every test that takes
    it holds for both."""
    torch._dynamo.reset()
    pipeline = tiny_pipeline(
        compile_sizes=[(64, 64)], compile_scope=request.param, adapters=ADAPTERS
    )
    assert compiled_graphs() > 0, "the warm-up compiled nothing"
    return pipeline


def test_the_speed_guide_adds_its_inductor_settings_to_the_mode_s() -> None:
    options = compile_options("reduce-overhead", speed_guide=True)["options"]
    assert options == {"triton.cudagraphs": True, **SPEED_GUIDE}
    assert compile_options("reduce-overhead", speed_guide=False)["mode"] == "reduce-overhead"


# A cold compile of its own (half a minute) for a benchmark variant, not a default.
@pytest.mark.thorough
def test_the_speed_guide_s_settings_and_channels_last_give_the_same_image(eager) -> None:
    """Compiled with diffusers' speed-guide inductor settings, the networks and the VAE
    channels-last: the warmed graphs run (nothing compiles, nothing falls back) and the
    image is the eager one's to rounding."""
    tuned = tiny_pipeline(compile_sizes=[(64, 64)], inductor_speed_guide=True, channels_last=True)
    assert tuned.pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    after_warm_up, fallbacks = compiled_graphs(), uncompiled("recompile")
    images = tuned.submit(GPURequest.of(PARAMS, edges(64, 64))).result()
    assert (compiled_graphs(), uncompiled("recompile")) == (after_warm_up, fallbacks)
    reference = eager.submit(GPURequest.of(PARAMS, edges(64, 64))).result()
    assert np.abs(images.astype(int) - reference).max() <= 3


def transformer_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if type(m).__name__ in REPEATED_BLOCKS]


def test_the_scope_decides_what_is_compiled(compiled) -> None:
    """blocks: the UNet's and the ControlNet's transformer blocks, in place, while the
    networks around them stay Python; whole: each network. The decoder is whole in both."""
    unet, controlnet = compiled._eager
    blocks = transformer_blocks(unet) + transformer_blocks(controlnet)
    assert transformer_blocks(controlnet) and transformer_blocks(unet)
    whole = [
        isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in compiled._compiled.modules
    ]
    if compiled._compiled.scope == "blocks":
        assert all(block._compiled_call_impl is not None for block in blocks)
        assert whole == [False, False]
    else:
        assert all(block._compiled_call_impl is None for block in blocks)
        assert whole == [True, True]
    assert isinstance(compiled.pipe.vae.decoder, torch._dynamo.eval_frame.OptimizedModule)


def test_a_warmed_request_runs_the_compiled_graphs_and_matches_eager(eager, compiled) -> None:
    after_warm_up = compiled_graphs()
    seen = []
    hook = compiled._compiled.modules[0].register_forward_hook(lambda *_: seen.append(True))
    try:
        images = compiled.submit(GPURequest.of(PARAMS, edges(64, 64))).result()
    finally:
        hook.remove()
    assert seen, "the compiled UNet did not run"
    assert compiled_graphs() == after_warm_up
    assert (
        np.abs(
            images.astype(int) - eager.submit(GPURequest.of(PARAMS, edges(64, 64))).result()
        ).max()
        <= 3
    )

    # Another size, or another batch, runs uncompiled rather than compiling in a request.
    other = compiled.submit(
        GPURequest.of(PARAMS.model_copy(update={"num_images": 2}), edges(64, 96))
    ).result()
    assert other.shape == (2, 64, 96, 3)
    assert compiled_graphs() == after_warm_up
    # Between calls the pipeline holds the eager modules, where diffusers finds the adapters.
    assert compiled.pipe.unet is compiled._eager[0]


MATRIX = list(
    itertools.product(SCHEDULERS, (0.0, 0.5, 0.8), (1.0, 0.5), (False, True), (False, True))
)


def test_no_request_compiles_again_whatever_it_asks(eager, compiled) -> None:
    """Every scheduler (int64 or float32 timesteps), ControlNet scale, guidance window
    (the scale drops to 0 within the request), guess mode and adapter, at the warmed size:
    dynamo's graph count stays where the warm-up left it, no request fails, and what ran
    eagerly is counted for its reason: guess mode's ControlNet, adapters; nothing else."""
    after_warm_up = compiled_graphs()
    reasons = ("recompile", "guess_mode", "adapters")
    for scheduler, scale, end, guess_mode, adapter in MATRIX:
        counted = {reason: uncompiled(reason) for reason in reasons}
        params = PARAMS.model_copy(
            update={
                "scheduler": scheduler,
                "controlnet_conditioning_scale": scale,
                "control_guidance_end": end,
                "guess_mode": guess_mode,
                "loras": STYLE if adapter else [],
            }
        )
        images = compiled.submit(GPURequest.of(params, edges(64, 64))).result()
        assert compiled_graphs() == after_warm_up, f"compiled again for {params}"
        # Guess mode's ControlNet (batch of one, not warmed) runs at every scale, eagerly.
        expected = "adapters" if adapter else "guess_mode" if guess_mode else None
        assert {r: uncompiled(r) - counted[r] for r in reasons} == {
            r: float(r == expected) for r in reasons
        }, params
        if scale == 0.8 and end == 0.5 and not guess_mode:
            reference = eager.submit(GPURequest.of(params, edges(64, 64))).result()
            assert np.abs(images.astype(int) - reference).max() <= 3, params


@pytest.mark.parametrize("inpaint", [False, True])
def test_image_to_image_and_inpainting_run_the_warmed_graphs(eager, compiled, inpaint) -> None:
    """The same UNet and ControlNet shapes from a start picture: the same graphs, no fallback."""
    start = np.full((64, 64, 3), 120, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255 if inpaint else 0
    pictures = {"init_image": start, "mask": mask if inpaint else None}
    params = PARAMS.model_copy(update={"strength": 1.0})
    after_warm_up, fallbacks = compiled_graphs(), uncompiled("recompile")
    images = compiled.submit(GPURequest.of(params, edges(64, 64), **pictures)).result()
    assert compiled_graphs() == after_warm_up
    assert uncompiled("recompile") == fallbacks
    reference = eager.submit(GPURequest.of(params, edges(64, 64), **pictures)).result()
    assert np.abs(images.astype(int) - reference).max() <= 3


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_and_scale_runs_the_warmed_graphs(compiled, scheduler) -> None:
    """Not only no compilation, but no fallback: none is counted."""
    fallbacks = uncompiled("recompile")
    for scale, end in itertools.product((0.0, 0.5, 0.8), (1.0, 0.5)):
        params = PARAMS.model_copy(
            update={
                "scheduler": scheduler,
                "controlnet_conditioning_scale": scale,
                "control_guidance_end": end,
                "seed": 9,
            }
        )
        assert compiled.runs_compiled(64, 64, params)
        compiled.submit(GPURequest.of(params, edges(64, 64))).result()
        assert uncompiled("recompile") == fallbacks, params


def test_the_vae_decoder_is_compiled_and_runs_its_graph(compiled) -> None:
    decoder = compiled.pipe.vae.decoder
    assert isinstance(decoder, torch._dynamo.eval_frame.OptimizedModule)
    fallbacks, after_warm_up = uncompiled("recompile"), compiled_graphs()
    compiled.submit(GPURequest.of(PARAMS, edges(64, 64))).result()
    assert (uncompiled("recompile"), compiled_graphs()) == (fallbacks, after_warm_up)


def test_a_call_the_graphs_do_not_fit_runs_eagerly_and_is_counted(eager, compiled, caplog) -> None:
    """Were a shape taken for warmed that is not, dynamo's guards would fail: the call runs
    the eager modules, the metric counts it, and the log names the failed guard."""
    after_warm_up, fallbacks = compiled_graphs(), uncompiled("recompile")
    key = graph_key(64, 96, PARAMS)
    compiled._compiled.warmed.add(key)
    try:
        images = compiled.submit(GPURequest.of(PARAMS, edges(64, 96))).result()
    finally:
        compiled._compiled.warmed.discard(key)
    assert compiled_graphs() == after_warm_up  # nothing compiled
    assert uncompiled("recompile") == fallbacks + 1
    assert "the warmed graphs did not fit" in caplog.text
    assert (
        np.abs(
            images.astype(int) - eager.submit(GPURequest.of(PARAMS, edges(64, 96))).result()
        ).max()
        <= 3
    )


# A GPU Service's start with TORCH_COMPILE_CACHE, in a process of its own: what inductor
# found in its cache and what it compiled afresh, and the log.
START = """
import json, logging, os, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from sdxl_controlnet.gpu.compilation import cache_counts
from tests.service.pipelines import tiny_pipeline
tiny_pipeline(compile_sizes=[(64, 64)], compile_cache=Path(sys.argv[1]))
print(json.dumps(cache_counts()), flush=True)
# Done: leave without the interpreter's teardown, where one such start in several aborted
# after its work ("terminate called without an active exception", torch 2.13 on the CPU).
os._exit(0)
"""


def start_with_cache(cache: Path, inductor_dir: Path) -> tuple[dict[str, int], str]:
    """Each start, in a process of its own, has an inductor cache of its own, empty: only
    the file can warm it."""
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir),
        "TORCHINDUCTOR_COMPILE_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", START, str(cache)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


@pytest.mark.thorough  # two cold starts: a minute and a half on two cores
def test_a_saved_compile_cache_lets_the_next_start_find_its_graphs(tmp_path) -> None:
    """A damaged file is logged and ignored, and the start compiles cold and replaces it;
    the next start, on an empty inductor cache, loads it and compiles nothing afresh."""
    cache = tmp_path / "compile-cache.bin"
    cache.write_bytes(b"not torch's artifacts")
    cold, log = start_with_cache(cache, tmp_path / "inductor-1")
    assert "ignored" in log and "compiling cold" in log
    assert cold["misses"] > 0 and cold["hits"] == 0
    assert "entries saved" in log

    warm, log = start_with_cache(cache, tmp_path / "inductor-2")
    assert "entries loaded" in log
    assert warm == {"hits": cold["misses"], "misses": 0}


def compile_events(kind: str) -> float | None:
    return REGISTRY.get_sample_value("sdxl_controlnet_compile_events", {"kind": kind})


def test_the_warm_up_reports_what_torch_counted_on_metrics(compiled) -> None:
    """fullgraph=True: every module compiled whole, so no graph break; and the CPU records
    no CUDA graph, so none was skipped."""
    assert compile_events("graph_breaks") == 0
    assert compile_events("cudagraph_skips") == 0


@pytest.mark.parametrize(
    ("scope", "broken"),
    [
        ("blocks", BasicTransformerBlock),
        pytest.param("whole", ControlNetModel, marks=pytest.mark.thorough),
    ],
)
def test_a_graph_break_fails_its_sizes_compile_and_the_size_runs_eagerly(
    eager, monkeypatch, caplog, scope, broken
) -> None:
    """A compiled module that breaks its graph (a library update could bring one): fullgraph
    refuses to compile it at the warm-up, which says so; the Service starts, and the size
    runs the eager models, counted as such."""
    forward = broken.forward

    def breaking(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(broken, "forward", breaking)
    pipeline = tiny_pipeline(compile_sizes=[(64, 64)], compile_scope=scope)
    assert not pipeline.runs_compiled(64, 64, PARAMS)
    assert "compiling for 64×64 failed; requests of that size run uncompiled" in caplog.text
    shapes = uncompiled("shape")
    images = pipeline.submit(GPURequest.of(PARAMS, edges(64, 64))).result()
    assert uncompiled("shape") == shapes + 1
    assert np.array_equal(images, eager.submit(GPURequest.of(PARAMS, edges(64, 64))).result())


@pytest.mark.parametrize("inpaint", [False, True])
def test_each_step_is_marked_for_cuda_graphs(compiled, inpaint, monkeypatch) -> None:
    """diffusers marks CUDA graph steps only in text-to-image: image-to-image and inpainting
    get one mark a step from the compiled models, also where the ControlNet is skipped."""
    marks: list[int] = []
    real = torch.compiler.cudagraph_mark_step_begin
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(real()))
    start = np.full((64, 64, 3), 120, np.uint8)
    mask = np.full((64, 64), 255, np.uint8) if inpaint else None
    params = PARAMS.model_copy(
        update={"strength": 1.0, "num_inference_steps": 4, "control_guidance_end": 0.5}
    )
    compiled.submit(GPURequest.of(params, edges(64, 64), init_image=start, mask=mask)).result()
    assert len(marks) == 4 + 1  # and one for the VAE's decoder, after the last step


def test_a_failed_adapter_switch_leaves_no_adapter_on(compiled, monkeypatch) -> None:
    styled = PARAMS.model_copy(update={"loras": STYLE})
    detail = PARAMS.model_copy(update={"loras": [LoraChoice(name="detail", scale=1.0)]})
    base, with_style = (
        compiled.submit(GPURequest.of(p, edges(64, 64))).result() for p in (PARAMS, styled)
    )
    assert not np.array_equal(base, with_style)
    real_set_adapters = type(compiled.pipe).set_adapters

    def fail_halfway(self, names, adapter_weights=None):
        real_set_adapters(self, names, adapter_weights)  # on, and then it breaks
        raise RuntimeError("injected: failed while switching adapters")

    # From the base model and from an adapter: after a failed switch to another one, the
    # same request as before gives the same image, bit for bit.
    for before, image in ((PARAMS, base), (styled, with_style)):
        compiled.submit(GPURequest.of(before, edges(64, 64))).result()
        with monkeypatch.context() as patch:
            patch.setattr(type(compiled.pipe), "set_adapters", fail_halfway)
            with pytest.raises(RuntimeError, match="injected"):
                compiled.submit(GPURequest.of(detail, edges(64, 64))).result()
        assert np.array_equal(compiled.submit(GPURequest.of(before, edges(64, 64))).result(), image)


def test_out_of_memory_frees_the_cache_and_the_pipeline_keeps_serving(monkeypatch) -> None:
    pipeline = tiny_pipeline()
    real_call = type(pipeline.pipe).__call__
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(type(pipeline.pipe), "__call__", out_of_memory)
    with pytest.raises(GPUOutOfMemory, match="ran out of memory generating 1 image"):
        pipeline.submit(GPURequest.of(PARAMS, edges())).result()
    assert emptied == [True]

    monkeypatch.setattr(type(pipeline.pipe), "__call__", real_call)
    assert pipeline.submit(GPURequest.of(PARAMS, edges())).result().shape == (1, 64, 96, 3)


def test_the_pipeline_thread_makes_the_worker_s_gpu_its_current_device(monkeypatch) -> None:
    """A CUDA device is current per thread: the thread that generates sets its own."""
    current: list[torch.device] = []
    monkeypatch.setattr(pipeline_module.torch.cuda, "set_device", current.append)
    pipeline_module.pipeline_thread("cuda:1").submit(lambda: None).result()
    assert current == [torch.device("cuda:1")]
    pipeline_module.pipeline_thread("cpu").submit(lambda: None).result()
    assert current == [torch.device("cuda:1")]  # the CPU has nothing to set


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
    current: list[int] = []
    monkeypatch.setattr(pipeline_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pipeline_module.torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(pipeline_module.torch.cuda, "set_device", current.append)
    assert select_device(allow_cpu=False, worker_index=worker_index) == device
    assert current == [int(device.removeprefix("cuda:"))]  # its current device, not GPU 0
