"""Both Services in one process: the front's dependency resolves to a real
SDXLControlNetService instance running the tiny pipeline."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys

import aiohttp
import numpy as np
import pytest
import torch

import service
from devtools.harness import ROOT, as_array, decode, shapes_image
from sdxl_controlnet import streaming
from sdxl_controlnet.errors import GPUOutOfMemory
from sdxl_controlnet.front import gpu_call
from sdxl_controlnet.front.encoding import encode_image
from sdxl_controlnet.schemas import BatchResult, EdgeParams, GenerationParams, GPURequest, Params

pytestmark = pytest.mark.anyio

FAST = {"prompt": "a red ball", "num_inference_steps": 2}


def encode_png(pixels: np.ndarray) -> bytes:
    return encode_image(pixels, "png")


@pytest.fixture(scope="module")
def front():
    return service.ControlNet()


@pytest.fixture
def gpu(front):
    return front.controlnet_service


@pytest.fixture
def pipeline_calls(gpu, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Records the arguments of each diffusers pipeline call, then makes the real call."""
    calls: list[dict] = []
    pipe = gpu.worker.pipeline.pipe
    real_call = type(pipe).__call__

    def recording_call(self, *args, **kwargs):
        calls.append({**kwargs, "scheduler": type(self.scheduler).__name__})
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", recording_call)
    return calls


async def test_generate_returns_the_image_and_its_settings(front) -> None:
    response = await front.generate(image=shapes_image(160, 120), params=Params(**FAST, seed=3))
    assert response.status_code == 200 and response.media_type == "image/png"
    image = decode(response.body)
    assert image.size == (160, 120) and as_array(image).std() > 0
    assert response.headers["x-seed"] == "3"
    settings_used = json.loads(response.headers["x-params"])
    assert settings_used["width"] == 160 and settings_used["num_inference_steps"] == 2
    assert "prompt" not in settings_used
    assert "generate;dur=" in response.headers["server-timing"]


async def test_same_seed_same_bytes_different_seed_different_image(front) -> None:
    image = shapes_image(128, 128)
    first, again, other = [
        (await front.generate(image=image, params=Params(**FAST, seed=seed))).body
        for seed in (1, 1, 2)
    ]
    assert first == again
    assert not np.array_equal(as_array(decode(first)), as_array(decode(other)))


async def test_a_random_seed_is_reported_and_reproduces_the_image(front) -> None:
    image = shapes_image(96, 96)
    first = await front.generate(image=image, params=Params(**FAST))
    seed = int(first.headers["x-seed"])
    again = await front.generate(image=image, params=Params(**FAST, seed=seed))
    assert first.body == again.body


@pytest.mark.parametrize(
    ("fmt", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")]
)
async def test_output_formats(front, fmt: str, pil_format: str) -> None:
    params = Params(**FAST, seed=0, output_format=fmt)
    response = await front.generate(image=shapes_image(96, 64), params=params)
    assert response.media_type == f"image/{fmt}"
    image = decode(response.body)
    assert image.format == pil_format and image.size == (96, 64)


@pytest.mark.parametrize("mode", ["resize", "crop_and_resize", "resize_and_fill"])
async def test_explicit_output_size(front, mode: str) -> None:
    params = Params(**FAST, width=128, height=64, resize_mode=mode)
    response = await front.generate(image=shapes_image(100, 100), params=params)
    assert decode(response.body).size == (128, 64)


async def test_every_parameter_reaches_the_pipeline(front, gpu, pipeline_calls: list[dict]) -> None:
    params = Params(
        prompt="a castle",
        prompt_2="oil painting",
        negative_prompt="blurry",
        negative_prompt_2="text",
        controlnet_conditioning_scale=1.5,
        control_guidance_start=0.1,
        control_guidance_end=0.8,
        guess_mode=True,
        num_inference_steps=3,
        guidance_scale=7.5,
        seed=11,
        scheduler="dpmpp_2m_karras",
        num_images=2,
        width=96,
        height=64,
    )
    await front.generate_batch(image=shapes_image(), params=params)
    (call,) = pipeline_calls
    # The four prompts reach diffusers encoded, through the prompt cache's entry for them.
    prompts = GenerationParams(
        prompt="a castle",
        prompt_2="oil painting",
        negative_prompt="blurry",
        negative_prompt_2="text",
    )
    pipeline = gpu.worker.pipeline
    cached = pipeline.prompt_cache.get(pipeline.pipe, prompts, ())
    for name, embeddings in cached.items():
        assert call[name] is embeddings, name
    assert call["controlnet_conditioning_scale"] == 1.5
    assert (call["control_guidance_start"], call["control_guidance_end"]) == (0.1, 0.8)
    assert call["guess_mode"] is True
    assert call["num_inference_steps"] == 3 and call["guidance_scale"] == 7.5
    assert call["num_images_per_prompt"] == 2
    assert (call["width"], call["height"]) == (96, 64)
    assert call["scheduler"] == "DPMSolverMultistepScheduler"
    assert [g.initial_seed() for g in call["generator"]] == [11, 12]


async def test_batch_returns_every_image_the_edge_map_and_metadata(front) -> None:
    params = Params(**FAST, seed=5, num_images=3, output_format="jpeg")
    result = await front.generate_batch(image=shapes_image(128, 96), params=params)
    assert isinstance(result, BatchResult)
    assert [image.seed for image in result.images] == [5, 6, 7]
    pictures = [decode(base64.b64decode(image.image)) for image in result.images]
    assert all(p.format == "JPEG" and p.size == (128, 96) for p in pictures)
    assert result.params.width == 128 and result.params.seed == 5
    assert set(result.timings_ms) == {"preprocess", "generate", "encode"}

    canny = await front.canny(image=shapes_image(128, 96), params=EdgeParams())
    assert base64.b64decode(result.edge_map) == canny.body


async def test_canny_matches_the_preprocessing_of_generate(front, pipeline_calls) -> None:
    edge_params = EdgeParams(low_threshold=50, high_threshold=150, width=96, height=96)
    response = await front.canny(image=shapes_image(), params=edge_params)
    edges = np.asarray(decode(response.body))
    assert edges.shape == (96, 96) and set(np.unique(edges)) == {0, 255}
    assert pipeline_calls == []  # no GPU work for an edge preview

    params = Params(**FAST, **edge_params.model_dump())
    await front.generate(image=shapes_image(), params=params)
    control = pipeline_calls[0]["image"]  # 1×3×H×W in [0, 1], from the one-channel map
    assert np.array_equal((control[0, 0].numpy() * 255).astype(np.uint8), edges)


@pytest.mark.parametrize(
    ("edges", "num_images", "message"),
    [
        (np.zeros((64, 64, 3), np.uint8), 1, "one-channel"),
        (np.zeros((66, 64), np.uint8), 1, "multiples of 8"),
        (np.zeros((2048, 2048), np.uint8), 1, "at most"),
        (np.zeros((1024, 1024), np.uint8), 5, "GPU memory budget"),
    ],
)
async def test_gpu_service_validates_direct_calls(gpu, edges, num_images, message) -> None:
    params = GenerationParams.model_construct(**GenerationParams(prompt="x").model_dump())
    params.num_images = num_images  # past MAX_IMAGES too: the budget holds on its own
    response = await gpu.generate(edges=edges, params=params)
    assert response.status_code == 400 and message in json.loads(response.body)["error"]


async def test_gpu_service_returns_uint8_rgb_batches(gpu) -> None:
    edges = np.zeros((64, 96), np.uint8)
    edges[20:40, 30:60] = 255
    params = GenerationParams(prompt="x", num_inference_steps=1, num_images=2)
    images = await gpu.generate(edges=edges, params=params)
    assert images.shape == (2, 64, 96, 3) and images.dtype == np.uint8


async def test_a_canceled_generation_stops_early_and_frees_the_gpu(gpu) -> None:
    steps: list[int] = []
    edges = np.zeros((64, 64), np.uint8)
    long_run = GenerationParams(prompt="x", num_inference_steps=80, seed=0)
    task = asyncio.create_task(
        gpu.worker.run(GPURequest.of(long_run, edges), on_step=lambda done, _: steps.append(done))
    )
    while not steps:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(steps) < 80
    assert gpu.worker.queue.idle
    quick = GenerationParams(prompt="x", num_inference_steps=1, seed=0)
    assert (await gpu.worker.run(GPURequest.of(quick, edges))).shape == (1, 64, 64, 3)


async def test_a_slow_gpu_service_gives_a_504(front, gpu, monkeypatch) -> None:
    async def too_slow(**_: object) -> None:
        await asyncio.sleep(10)

    monkeypatch.setattr(
        gpu_call, "settings", gpu_call.settings.model_copy(update={"generation_timeout_s": 0.2})
    )
    monkeypatch.setattr(gpu, "generate", too_slow)
    response = await front.generate(image=shapes_image(64, 64), params=Params(**FAST))
    assert response.status_code == 504
    assert "longer than 0.2 s" in json.loads(response.body)["error"]


async def test_a_failing_gpu_service_gives_a_503(front, gpu, monkeypatch) -> None:
    async def died(**_: object) -> None:
        raise aiohttp.ServerDisconnectedError  # what BentoML's client raises when a replica dies

    monkeypatch.setattr(gpu, "generate", died)
    response = await front.generate(image=shapes_image(64, 64), params=Params(**FAST))
    assert response.status_code == 503
    assert "GPU Service is unavailable" in json.loads(response.body)["error"]


def test_front_never_imports_torch_or_diffusers() -> None:
    code = (
        "import sys, service; "
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules); "
        "print(heavy); sys.exit(bool(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_generate_stream_reports_each_step_then_the_images(gpu) -> None:
    edges = np.zeros((64, 96), np.uint8)
    lines = gpu.generate_stream(edges, GenerationParams(**FAST, seed=1))
    events = [json.loads(line) async for line in lines]
    assert [event["step"] for event in events[:-1]] == [0, 1, 2]
    assert streaming.decode_images(events[-1]).shape == (1, 64, 96, 3)


async def test_closing_the_gpu_stream_stops_the_pipeline(gpu, monkeypatch) -> None:
    steps_run: list[int] = []
    generate = gpu.worker.pipeline.generate

    def counting_generate(request, on_step, canceled, on_preview):
        def count(done: int, total: int) -> None:
            steps_run.append(done)
            on_step(done, total)

        return generate(request, count, canceled, on_preview)

    monkeypatch.setattr(gpu.worker.pipeline, "generate", counting_generate)
    params = GenerationParams(prompt="x", num_inference_steps=50, seed=1)
    lines = gpu.generate_stream(np.zeros((64, 64), np.uint8), params)
    async for line in lines:
        if json.loads(line)["step"] == 1:
            break
    await lines.aclose()

    async with asyncio.timeout(30):
        while not gpu.worker.queue.idle:  # idle once the pipeline has stopped
            await asyncio.sleep(0.05)
    assert steps_run[-1] < 50


async def test_generate_returns_one_image_and_points_at_generate_batch(front) -> None:
    response = await front.generate(image=shapes_image(64, 64), params=Params(**FAST, num_images=2))
    assert response.status_code == 400
    assert json.loads(response.body)["error"] == (
        "params.num_images: /generate returns one image; ask /generate_batch for 2"
    )


async def test_a_ready_made_control_image_reaches_the_gpu_as_sent(front, pipeline_calls) -> None:
    control = np.zeros((64, 96), np.uint8)
    control[10:50, 20] = 255
    picture = decode(encode_png(control))
    preview = await front.canny(image=picture, params=EdgeParams(preprocessor="none"))
    assert np.array_equal(np.asarray(decode(preview.body)), control)

    await front.generate(image=picture, params=Params(**FAST, preprocessor="none"))
    sent = pipeline_calls[0]["image"]  # 1×3×H×W in [0, 1]
    assert np.array_equal((sent[0, 0].numpy() * 255).round().astype(np.uint8), control)


async def stream_events(front, params: Params) -> list[tuple[str, dict]]:
    events = []
    async for chunk in front.generate_stream(image=shapes_image(64, 64), params=params):
        kind, data = (line.split(": ", 1)[1] for line in chunk.strip().split("\n"))
        events.append((kind, json.loads(data)))
    return events


async def test_a_stream_that_times_out_ends_with_an_error_event(front, gpu, monkeypatch) -> None:
    async def stalls(**_: object):
        yield streaming.progress_line(0, 2)
        await asyncio.sleep(10)

    monkeypatch.setattr(
        gpu_call, "settings", gpu_call.settings.model_copy(update={"generation_timeout_s": 0.5})
    )
    monkeypatch.setattr(gpu, "generate_stream", stalls)
    events = await stream_events(front, Params(**FAST))
    assert [kind for kind, _ in events] == ["progress", "error"]
    assert events[-1][1]["status"] == 504 and "longer than 0.5 s" in events[-1][1]["error"]


@pytest.mark.parametrize(
    ("failure", "status", "message"),
    [
        (aiohttp.ServerDisconnectedError(), 503, "GPU Service is unavailable"),
        (RuntimeError("CUDA error: an illegal memory access"), 503, "GPU Service is unavailable"),
        (None, 507, "out of GPU memory"),  # the GPU Service's own error line
    ],
)
async def test_a_gpu_failure_mid_stream_is_an_error_event(
    front, gpu, monkeypatch, failure, status: int, message: str
) -> None:
    async def fails_after_a_step(**_: object):
        yield streaming.progress_line(0, 2)
        yield streaming.progress_line(1, 2)
        if failure is None:
            yield streaming.error_line(GPUOutOfMemory("out of GPU memory at 1024×1024"))
        else:
            raise failure

    monkeypatch.setattr(gpu, "generate_stream", fails_after_a_step)
    events = await stream_events(front, Params(**FAST))
    assert [kind for kind, _ in events] == ["progress", "progress", "error"]
    assert events[-1][1]["status"] == status and message in events[-1][1]["error"]


async def test_out_of_memory_reaches_the_client_as_a_507_and_the_service_keeps_serving(
    front, gpu, monkeypatch
) -> None:
    pipe_class = type(gpu.worker.pipeline.pipe)
    real_call = pipe_class.__call__

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pipe_class, "__call__", out_of_memory)
    response = await front.generate_batch(image=shapes_image(64, 64), params=Params(**FAST))
    assert response.status_code == 507
    assert "ran out of memory generating 1 image(s) at 64×64" in json.loads(response.body)["error"]
    assert "retry-after" not in response.headers  # the same request would fail again

    monkeypatch.setattr(pipe_class, "__call__", real_call)
    assert isinstance(
        await front.generate_batch(image=shapes_image(64, 64), params=Params(**FAST)), BatchResult
    )


async def test_a_batch_over_the_gpu_memory_budget_is_a_400_before_generating(
    front, pipeline_calls, monkeypatch
) -> None:
    import sdxl_controlnet.schemas

    budget = sdxl_controlnet.schemas.settings.model_copy(update={"max_batch_pixels": 64 * 64})
    monkeypatch.setattr(sdxl_controlnet.schemas, "settings", budget)
    params = Params(**FAST, num_images=2)
    response = await front.generate_batch(image=shapes_image(64, 64), params=params)
    assert response.status_code == 400
    assert "exceed this server's GPU memory budget" in json.loads(response.body)["error"]
    assert pipeline_calls == []
