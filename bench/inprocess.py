"""Figures measured in this process: the front's CPU work, what crosses
``bentoml.depends``, response encoding, and batching in the pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import io
import statistics
import tempfile
import typing as t
from collections.abc import Iterator
from functools import partial

import cv2
import numpy as np
import torch
from _bentoml_impl.serde import Payload, PickleSerde
from _bentoml_sdk.io_models import IODescriptor
from diffusers import AutoencoderTiny
from PIL import Image
from starlette.datastructures import Headers, UploadFile

from bench.report import Row, cpu_ms, interleaved, p95, timed_ms
from devtools.harness import photo, tiny_controlnets, tiny_ip_adapter_env, tiny_model_env
from sdxl_controlnet.controls import parse_controlnets
from sdxl_controlnet.front import preprocessing
from sdxl_controlnet.front.encoding import encode_image
from sdxl_controlnet.gpu.pipeline import ControlNetPipeline
from sdxl_controlnet.gpu.previews import PreviewDecoder
from sdxl_controlnet.schemas import (
    ControlSettings,
    GenerationParams,
    GPURequest,
    LoraChoice,
    OutputFormat,
    Params,
)
from service import ControlNet, SDXLControlNetService

# In a `bentoml serve`, Services call each other with BentoML's pickle serde.
PICKLE = PickleSerde()
OURS = SDXLControlNetService.apis["generate"]
FRONT = ControlNet.apis["generate"].input_spec


def seed_generate(self, edges: np.ndarray, params: GenerationParams) -> Image.Image:
    """The seed design's GPU API: a three-channel edge map in, a PIL image out. Only its
    signature is used: BentoML derives the wire types below from it."""


SEED_INPUT = IODescriptor.from_input(seed_generate, skip_self=True)
SEED_OUTPUT = IODescriptor.from_output(seed_generate)


def file_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


def preprocessing_rows(runs: int) -> list[Row]:
    """Upload bytes to edge map through the front's code, against the bare library calls."""
    rows = []
    for (width, height), fmt in [
        ((512, 512), "JPEG"),
        ((512, 512), "PNG"),
        ((1024, 1024), "JPEG"),
        ((1024, 1024), "PNG"),
        ((4032, 3024), "JPEG"),  # a phone photo
    ]:
        data = file_bytes(photo(width, height), fmt)
        size = preprocessing.snapped_size(width, height)

        def ours(data: bytes = data, fmt: str = fmt) -> np.ndarray:
            # What BentoML's multipart parsing validates, then what the front does with it.
            headers = Headers({"content-type": f"image/{fmt.lower()}"})
            upload = UploadFile(io.BytesIO(data), headers=headers)
            request = FRONT.model_validate({"image": upload, "params": {"prompt": "bench"}})
            return preprocessing.edge_map(request.image, request.params)

        def raw(data: bytes = data, size: tuple[int, int] = size) -> np.ndarray:
            gray = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
            return cv2.Canny(cv2.resize(gray, size, interpolation=cv2.INTER_AREA), 100, 200)

        values, baseline = interleaved(runs, ours, raw)
        name = f"{width}×{height} {fmt} ({len(data) // 1024} KiB)"
        rows.append(Row("preprocess", name, "ms", values, baseline, target=1.3))
    return rows


def _ours_request(edges: np.ndarray, params: GenerationParams) -> int:
    # Client side (http.py _build_request), the wire, then the server's parse.
    payload = PICKLE.serialize_model(OURS.input_spec.from_inputs(edges=edges, params=params))
    body = b"".join(payload.data)
    PICKLE.deserialize_model(Payload((body,), payload.metadata), OURS.input_spec)
    return len(body)


def _seed_request(edges: np.ndarray, params: GenerationParams) -> int:
    three = np.repeat(edges[..., None], 3, axis=2)
    payload = PICKLE.serialize_model(SEED_INPUT.from_inputs(edges=three, params=params))
    body = b"".join(payload.data)
    PICKLE.deserialize_model(Payload((body,), payload.metadata), SEED_INPUT)
    return len(body)


def _ours_response(images: np.ndarray) -> int:
    response = asyncio.run(OURS.output_spec.to_http_response(images, PICKLE))
    body = b"".join(response.body_iterator)
    PICKLE.deserialize_model(Payload((body,), response.headers), OURS.output_spec)
    return len(body)


def _seed_response(images: np.ndarray) -> int:
    # BentoML answers a PIL image with PNG bytes whatever the serde; the front decodes them.
    response = asyncio.run(SEED_OUTPUT.to_http_response(Image.fromarray(images[0]), PICKLE))
    Image.open(io.BytesIO(response.body), formats=["PNG"]).load()
    return len(response.body)


def transfer_rows(runs: int) -> list[Row]:
    """What crosses `bentoml.depends` each way, against the seed design's representation."""
    rows = []
    params = GenerationParams(prompt="bench", seed=1)
    for side in (512, 1024):
        image = photo(side, side)
        edges = preprocessing.edge_map(image.copy(), Params(prompt="bench"))
        images = np.asarray(image)[None]  # a photo, not the tiny model's noise: PNG's best case
        ways = {
            "edge map → GPU": (
                partial(_ours_request, edges, params),
                partial(_seed_request, edges, params),
            ),
            "images ← GPU": (partial(_ours_response, images), partial(_seed_response, images)),
        }
        total_ms = np.zeros((2, runs))
        total_kib = np.zeros(2)
        for way, (ours, seed) in ways.items():
            ms = interleaved(runs, ours, seed)
            kib = [ours() / 1024], [seed() / 1024]
            rows.append(Row("transfer", f"{side}² {way}", "ms", *ms))
            rows.append(Row("transfer", f"{side}² {way}", "KiB", *kib))
            total_ms += ms
            total_kib += [kib[0][0], kib[1][0]]
        rows.append(Row("transfer", f"{side}² both ways", "ms", *total_ms.tolist(), target=1 / 2))
        # Information, not a target: raw pixels are more bytes than a PNG of a photo, on
        # purpose, since they cross in milliseconds where PNG takes hundreds.
        rows.append(
            Row(
                "transfer",
                f"{side}² both ways",
                "KiB",
                *([k] for k in total_kib),
                note="information: raw pixels, not PNG",
            )
        )
    return rows


def _pil_save(image: Image.Image, fmt: OutputFormat) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def encoding_rows(runs: int) -> list[Row]:
    """The 1024² reply in each format, against PIL's defaults (BentoML's way with a PIL return)."""
    image = photo(1024, 1024)
    pixels = np.asarray(image)
    rows = []
    for fmt in t.get_args(OutputFormat):
        values, baseline = interleaved(
            runs, lambda fmt=fmt: encode_image(pixels, fmt), lambda fmt=fmt: _pil_save(image, fmt)
        )
        ours, pil = len(encode_image(pixels, fmt)) // 1024, len(_pil_save(image, fmt)) // 1024
        rows.append(
            Row("encode", f"1024² {fmt}", "ms", values, baseline, note=f"{ours} vs {pil} KiB")
        )
    return rows


def batching_rows(pipeline: ControlNetPipeline, runs: int) -> list[Row]:
    """What adaptive batching could buy: four images in one pipeline call, against four calls."""
    edges = preprocessing.edge_map(photo(256, 256), Params(prompt="bench"))
    one = GenerationParams(prompt="bench", num_inference_steps=2, seed=1)
    four = one.model_copy(update={"num_images": 4})
    pipeline.generate(
        GPURequest.of(one, edges)
    )  # first call at a new size sets up kernels: not counted
    batched, single = interleaved(
        runs,
        lambda: pipeline.generate(GPURequest.of(four, edges)),
        lambda: [pipeline.generate(GPURequest.of(one, edges)) for _ in range(4)],
    )
    return [Row("batching", "4 images 256² steps=2, one call vs four", "ms", batched, single)]


def mode_rows(pipeline: ControlNetPipeline, runs: int) -> list[Row]:
    """Image-to-image at strength 0.5 and inpainting against text-to-image, per image: the
    steps strength skips, against the start picture's encoding by the VAE."""
    start = photo(256, 256)
    edges = preprocessing.edge_map(start, Params(prompt="bench"))
    picture = np.asarray(start.convert("RGB"))
    mask = np.zeros((256, 256), np.uint8)
    mask[:, 128:] = 255
    text = GenerationParams(prompt="bench", num_inference_steps=10, seed=1)
    half = text.model_copy(update={"strength": 0.5})
    whole = text.model_copy(update={"strength": 1.0})
    calls = (
        lambda: pipeline.generate(GPURequest.of(text, edges)),
        lambda: pipeline.generate(GPURequest.of(half, edges, init_image=picture)),
        lambda: pipeline.generate(GPURequest.of(whole, edges, init_image=picture, mask=mask)),
    )
    for call in calls:  # first calls set up kernels: not counted
        call()
    text_ms, image_ms, inpaint_ms = interleaved(runs, *calls)
    what = f"256² {text.num_inference_steps} steps, per image"
    return [
        Row("modes", f"image-to-image strength 0.5 vs text-to-image, {what}", "ms", image_ms,
            text_ms, note=f"{half.steps} of {text.num_inference_steps} steps run"),
        Row("modes", f"inpainting vs text-to-image, {what}", "ms", inpaint_ms, text_ms,
            note="half the picture masked"),
    ]  # fmt: skip


def adapter_rows(pipeline: ControlNetPipeline, runs: int) -> list[Row]:
    """Few-step presets and LoRA adapters on ``pipeline`` (loaded with the tiny adapters):
    seconds per image at the default steps against the 4-step preset; what one active,
    unfused adapter adds per step; and what fusing it would cost to switch to and from."""
    edges = preprocessing.edge_map(photo(256, 256), Params(prompt="bench"))
    default = GenerationParams(prompt="bench", seed=1)  # the default steps and sampler
    preset = GenerationParams(prompt="bench", seed=1, loras=[{"name": "fast"}])
    steps = 12
    plain = GenerationParams(prompt="bench", seed=1, num_inference_steps=steps)
    styled = plain.model_copy(update={"loras": [LoraChoice(name="style")]})
    for warm_up in (plain, styled, preset):  # first calls set up kernels: not counted
        pipeline.generate(GPURequest.of(warm_up, edges))
    full, few = interleaved(
        runs,
        lambda: pipeline.generate(GPURequest.of(default, edges)),
        lambda: pipeline.generate(GPURequest.of(preset, edges)),
    )
    rows = [
        Row(
            "adapters",
            f"256² {preset.num_inference_steps}-step preset vs {default.num_inference_steps} "
            "steps, per image",
            "ms",
            few,
            full,
            note=f"{preset.scheduler}, guidance {preset.guidance_scale:g}",
        )
    ]
    # Per step: the difference of two step counts cancels the per-call costs.
    with_lora: list[float] = []
    without: list[float] = []
    for _ in range(runs):  # alternating, so a noisy neighbour hits both alike
        with_lora.append(_per_step_ms(pipeline, edges, styled, steps))
        without.append(_per_step_ms(pipeline, edges, plain, steps))
    rows.append(
        Row("adapters", "256² per step, one adapter active vs none", "ms", with_lora, without)
    )
    pipe = pipeline.pipe

    def fuse_and_unfuse() -> None:
        pipe.enable_lora()
        pipe.set_adapters(["style"])
        pipe.fuse_lora(adapter_names=["style"])
        pipe.unfuse_lora()
        pipe.disable_lora()
        pipeline._active = ()

    fuse = [timed_ms(fuse_and_unfuse) for _ in range(runs)]
    rows.append(Row("adapters", "fuse + unfuse one adapter (a switch)", "ms", fuse))
    return rows


def preview_rows(pipeline: ControlNetPipeline, runs: int) -> list[Row]:
    """Live previews (``pipeline`` loaded with the tiny TAESD): per image, every 5 steps
    against none, on the tiny model; and one preview of 1024² latents by TAESD at its real
    size (random weights, built here: no download), the decoder's own cost on this CPU."""
    edges = preprocessing.edge_map(photo(256, 256), Params(prompt="bench"))
    none = GenerationParams(prompt="bench", num_inference_steps=20, seed=1)
    every_5 = none.model_copy(update={"preview_every": 5})
    sizes: list[int] = []

    def watched() -> None:
        pipeline.generate(
            GPURequest.of(every_5, edges), on_preview=lambda *preview: sizes.append(len(preview[2]))
        )

    watched()  # first calls set up kernels: not counted
    with_ms, without_ms = interleaved(
        runs, watched, lambda: pipeline.generate(GPURequest.of(none, edges))
    )
    # Where the overhead lives, apart from the noise of two whole generations.
    latents = torch.randn(1, 4, 32, 32)  # 256² in latents
    one_ms = [timed_ms(lambda: pipeline.previews.webp(latents)) for _ in range(runs)]
    rows = [
        Row("previews", "256² 20 steps, a preview every 5 vs none, per image (tiny model)", "ms",
            with_ms, without_ms,
            note=f"{every_5.steps // 5 - 1} previews of ~{statistics.median(sizes):.0f} B each"),
        Row("previews", "one preview of 256² latents, tiny TAESD", "ms", one_ms,
            note="decode + WebP, one after another"),
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as real_size:
        AutoencoderTiny().save_pretrained(real_size)  # taesdxl's architecture
        decoder = PreviewDecoder(real_size, "cpu", torch.float32)
    latents = torch.randn(1, 4, 128, 128)
    decoder.webp(latents)  # first call sets up kernels: not counted
    decode_ms = [timed_ms(lambda: decoder.webp(latents)) for _ in range(runs)]
    rows.append(Row("previews", "one preview of 1024² latents, TAESD at real size, CPU", "ms",
                    decode_ms, note="decoded at 512², sent at 256²"))  # fmt: skip
    return rows


def _per_step_ms(
    pipeline: ControlNetPipeline, edges: np.ndarray, params: GenerationParams, steps: int
) -> float:
    """Milliseconds per denoising step: (time at ``steps`` - time at 1) / (steps - 1)."""
    one = params.model_copy(update={"num_inference_steps": 1})
    long_ms = timed_ms(lambda: pipeline.generate(GPURequest.of(params, edges)))
    short_ms = timed_ms(lambda: pipeline.generate(GPURequest.of(one, edges)))
    return (long_ms - short_ms) / (steps - 1)


def lever_rows(pipeline: ControlNetPipeline, runs: int) -> list[Row]:
    """The GPU Service's two speed levers, each against the path without it, interleaved:
    the ControlNet skipped past a guidance window that ends half way, per image; and a
    prompt's text encoding taken from the cache against encoding it."""
    edges = preprocessing.edge_map(photo(256, 256), Params(prompt="bench"))
    whole = GenerationParams(prompt="bench", num_inference_steps=10, seed=1)
    half = whole.model_copy(update={"control_guidance_end": 0.5})
    calls = (
        lambda: pipeline.generate(GPURequest.of(half, edges)),
        lambda: pipeline.generate(GPURequest.of(whole, edges)),
    )
    for call in calls:  # first calls set up kernels: not counted
        call()
    skipped, plain = interleaved(runs, *calls, timer=cpu_ms)
    what = f"256² {whole.num_inference_steps} steps, CPU ms per image"
    rows = [
        Row("levers", f"skip: control_guidance_end=0.5 vs 1.0, {what}", "ms", skipped, plain,
            target=0.85, note="the ControlNet runs 5 of 10 steps"),
    ]  # fmt: skip
    cache = pipeline._prompts
    first: list[float] = []
    repeat: list[float] = []
    with torch.inference_mode():
        for i in range(runs):  # a prompt not seen yet, then the same again
            params = GenerationParams(prompt=f"bench {i}, a lighthouse at dusk")
            first.append(timed_ms(lambda p=params: cache.get(pipeline.pipe, p, ())))
            repeat.append(timed_ms(lambda p=params: cache.get(pipeline.pipe, p, ())))
    rows.append(
        Row("levers", "prompt cache: text encoding, repeat vs first", "ms", repeat, first,
            target=0.2, note=f"both text encoders, prompt and negative; {cache.size} kept")
    )  # fmt: skip
    return rows


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread inside: OpenMP's threads spin while they wait for a core, so on a
    shared machine a neighbour swings even the CPU time of a generation (tests/conftest.py);
    on one thread, CPU time is the work alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def control_rows(runs: int, side: int = 256, steps: int = 10) -> list[Row]:
    """The cost of a second control, per image: canny + depth against canny alone, interleaved,
    on each way the tiny model serves several: a ControlNet per type, and one ControlNet Union.
    Either way each control runs its own ControlNet forward per step. Torch on one thread:
    the ratio is the work's, and a busy neighbour swings it least so."""
    start = photo(side, side)
    edges = preprocessing.edge_map(start, Params(prompt="bench"))
    # The Canny edges, and the picture itself standing in for a depth map: the cost is the same.
    images = np.stack([np.repeat(edges[..., None], 3, axis=2), np.asarray(start.convert("RGB"))])
    # Built as a server declaring canny and depth takes them: this process's settings serve
    # the one Canny ControlNet, and a control's type is validated against them.
    canny, depth = (ControlSettings.model_construct(type=kind) for kind in ("canny", "depth"))
    one = GenerationParams(prompt="bench", num_inference_steps=steps, seed=1, controls=[canny])
    two = one.model_copy(update={"controls": [canny, depth]})
    model = tiny_model_env()
    rows = []
    ways = {"canny+depth": "a ControlNet each", "union": "one ControlNet Union"}
    for configuration, way in ways.items():
        declared = tiny_controlnets(configuration)["SDXL_CONTROLNETS"]
        pipeline = ControlNetPipeline(
            model["SDXL_BASE_MODEL"], parse_controlnets(declared, ""), model["SDXL_VAE_MODEL"]
        )
        calls = (
            partial(pipeline.generate, GPURequest.of(two, controls=images)),
            partial(pipeline.generate, GPURequest.of(one, controls=images[:1])),
        )
        with one_thread():
            for call in calls:  # first calls set up kernels: not counted
                call()
            both, alone = interleaved(runs, *calls, timer=cpu_ms)
        rows.append(
            Row("controls", f"canny + depth vs canny alone, {way}, {side}² {steps} steps, "
                "CPU ms per image on one thread", "ms", both, alone,
                note=f"canny alone p95 {p95(alone):,.0f}; a second ControlNet forward per step"),
        )  # fmt: skip
    return rows


def image_prompt_rows(runs: int, side: int = 256, steps: int = 10) -> list[Row]:
    """What an image prompt costs, per image on one thread: a Canny control with an image
    prompt against the Canny control alone, both on a pipeline with the tiny IP-Adapter;
    a request without one on that pipeline against one without an adapter loaded; and a
    repeated picture's embeddings, from the cache, against encoding a new one."""
    start = photo(side, side)
    edges = preprocessing.edge_map(start, Params(prompt="bench"))
    images = np.stack([np.repeat(edges[..., None], 3, axis=2), np.asarray(start.convert("RGB"))])
    # Built as a server with an IP-Adapter takes them: this process's settings load none.
    canny = ControlSettings.model_construct(type="canny")
    look = ControlSettings.model_construct(type="image_prompt", scale=0.6)
    alone = GenerationParams(prompt="bench", num_inference_steps=steps, seed=1, controls=[canny])
    prompted = alone.model_copy(update={"controls": [canny, look]})
    model = tiny_model_env()
    models = (model["SDXL_BASE_MODEL"], model["SDXL_CONTROLNET_MODEL"], model["SDXL_VAE_MODEL"])
    adapter = ControlNetPipeline(*models, ip_adapter=tiny_ip_adapter_env()["SDXL_IP_ADAPTER"])
    plain = ControlNetPipeline(*models)
    what = f"{side}² {steps} steps, CPU ms per image on one thread"
    rows = []
    with one_thread():
        for calls, name, note in (
            (
                (partial(adapter.generate, GPURequest.of(prompted, controls=images)),
                 partial(adapter.generate, GPURequest.of(alone, controls=images[:1]))),
                f"image prompt: canny + image prompt vs canny alone, {what}",
                "the adapter's key and value projections in each cross-attention",
            ),
            (
                (partial(adapter.generate, GPURequest.of(alone, controls=images[:1])),
                 partial(plain.generate, GPURequest.of(alone, controls=images[:1]))),
                f"image prompt: none, IP-Adapter loaded vs not, {what}",
                "zeros at scale 0: diffusers skips the adapter's layers",
            ),
        ):  # fmt: skip
            for call in calls:  # first calls set up kernels: not counted
                call()
            ours, baseline = interleaved(runs, *calls, timer=cpu_ms)
            rows.append(Row("image prompts", name, "ms", ours, baseline, note=note))
        first: list[float] = []
        repeat: list[float] = []
        with torch.inference_mode():
            for i in range(runs):  # a picture not seen yet, then the same again
                picture = np.full((side, side, 3), i, np.uint8)
                first.append(timed_ms(lambda p=picture: adapter.image_prompts.embeddings(p, True)))
                repeat.append(timed_ms(lambda p=picture: adapter.image_prompts.embeddings(p, True)))
    rows.append(
        Row("image prompts", "image prompt cache: embeddings, repeat vs first", "ms", repeat,
            first, target=0.2, note="the tiny image encoder; SDXL's ViT-bigG costs far more")
    )  # fmt: skip
    return rows
