"""GPU benchmark on a full-size SDXL + Canny ControlNet, in one time budget: `make bench-gpu`.

Needs an NVIDIA GPU; without CUDA it says so and exits 0 (``--cpu`` rehearses the whole run on
the CPU with a small model; its CUDA rows then say there is no CUDA). The model is SDXL's real
architecture with random weights (``devtools.full_size_model``), built into ``--model-dir`` if
absent, so the figures are real timings of real shapes.

One request is measured two ways: **bare**, diffusers' pipeline called in this process with the
values the GPU Service uses (its negative prompt, guidance, ControlNet scale and scheduler, both
text encoders), and **served**, ``bentoml serve .`` sent multipart /generate requests; with
TORCH_COMPILE and eager. Figures: start-up to ready, the first request, seconds per image (1024²,
30 steps, batch 1), the same with the 4-step preset, peak GPU memory.

Everything fits in BENCH_GPU_BUDGET_S (default 540 s; the model build and every start-up count):
a plan estimates each item, runs them in the order users need their figures (served compiled,
bare compiled, then eager, timed in turns with the compiled subjects still running), skips with
its reason what would overrun, and abandons an item still running at the deadline. Estimates
follow what the run has measured so far. ``--full`` adds CHANNELS_LAST, FUSE_QKV, all flags
together and bursts at concurrency 4, for a longer window. After every image, rewrites the table
(``--output`` with .txt) and its JSON (``--output``), so a run cut short keeps each image it
measured; prints the table at the end. The compiled subjects share one compile cache file
(``--compile-cache``, by default beside ``--output``): loaded where it exists, written by the
GPU Service after a warm-up that compiled afresh, so the next window on the same torch and GPU
starts warm.
"""

from __future__ import annotations

import abc
import argparse
import concurrent.futures
import contextlib
import gc
import importlib
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.budget import Item, Plan, say
from devtools.harness import Server, metric, model_env, photo, post_generate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "gpu-latest.json"
LOGS = ROOT / "bench" / "results" / "gpu-logs"
DEFAULT_MODEL = ROOT / "models" / "full-size"
# What one 10-minute GPU window leaves after starting the machine and copying the kit.
BUDGET_S = 540.0
# Kept back from the budget for stopping the servers and writing the results.
RESERVE_S = 15.0

FLAGS = ("CHANNELS_LAST", "FUSE_QKV", "TORCH_COMPILE", "INDUCTOR_SPEED_GUIDE")
VARIANTS: dict[str, tuple[str, ...]] = {
    "off": (),
    "CHANNELS_LAST": ("CHANNELS_LAST",),
    "FUSE_QKV": ("FUSE_QKV",),
    "TORCH_COMPILE": ("TORCH_COMPILE",),
    # diffusers' speed guide for SDXL: compiled, channels-last, its inductor settings.
    "SPEED_GUIDE": ("TORCH_COMPILE", "CHANNELS_LAST", "INDUCTOR_SPEED_GUIDE"),
    "all": FLAGS,
}
DEFAULT_VARIANTS = ["off", "TORCH_COMPILE"]
PROMPT = "a lighthouse on a rocky coast at dusk, photograph"

# What each item costs on an H100-class GPU at 1024², 30 steps, before this run has measured
# it, each with its source. Images scale with pixels × steps. Each run's JSON records estimate
# and time side by side: the first GPU run replaces these.
ESTIMATE_S = {
    "build": 60.0,  # 9.5 GB of weights drawn on the GPU in fp16 and written (a guess)
    "start bare": 20.0,  # the same 9.5 GB from the page cache onto the GPU (a guess)
    # `bentoml serve`: 7 s to ready on the tiny model here (docs/performance.md, cold
    # start), then the same load as the bare start, and both Services' imports (a guess).
    "start served": 45.0,
    # A compile is tried when this much fits (two thirds of the blocks' estimate below);
    # the deadline stops it.
    "compile at least": 30.0,
    # 1024², 30 steps: SDXL base alone takes 2.5 s on an H100 (Stability AI's published
    # baseline, docs/performance.md); the ControlNet, half the UNet's size, adds to it.
    "image": 3.5,
    "first extra": 3.0,  # a first request picks its kernels (cuDNN, cuBLAS; a guess)
}
# The UNet's and the ControlNet's transformer blocks (TORCH_COMPILE_SCOPE=blocks) and the VAE
# decoder compiled at one size, with the warm-up generations, by mode. reduce-overhead: Flux's
# transformer blocks compile in 9.6 s on an H100 (regional, against 67.4 s whole: PyTorch's
# "torch.compile and Diffusers" guide, 2026-05-11); SDXL has two block shapes like Flux's two
# block kinds, plus the decoder whole and two warm-up generations to record the CUDA graphs.
# default: the same without the recording. max-autotune: no published figure for SDXL; the
# whole networks' kernel search was estimated at 6 to 15 minutes cold, and blocks have fewer
# kernels to search: a guess until a GPU measures it.
COMPILE_S = {"reduce-overhead": 45.0, "default": 38.0, "max-autotune": 300.0}
# Compiling each network whole (TORCH_COMPILE_SCOPE=whole) over compiling its blocks: CPU time,
# medians of 3 cold compiles each, measured here on the CPU inductor with the tiny model
# (docs/performance.md, "Compile scope, measured on the CPU").
WHOLE_OVER_BLOCKS = 2.8
NO_CUDA_REASON = "no CUDA"
NO_CUDA = (
    "bench.gpu: no CUDA GPU here (torch.cuda.is_available() is False), so nothing was "
    "measured.\nThe GPU benchmark needs an NVIDIA GPU and a CUDA build of torch; "
    "`make bench` measures the CPU tier (`--cpu` rehearses this one on the CPU)."
)


@dataclass
class Config:
    model_dir: Path
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    size: int = 1024
    steps: int = 30
    runs: int = 3  # timed images per subject and request kind
    bursts: int = 0  # throughput bursts per subject (--full)
    concurrency: int = 4
    budget_s: float = BUDGET_S
    device: str = "cuda"  # "cpu": the rehearsal, on a small model
    # reduce-overhead compiles within a window's share; max-autotune takes many minutes.
    compile_mode: str = "reduce-overhead"
    compile_scope: str = "blocks"  # TORCH_COMPILE_SCOPE of the compiled subjects
    # TORCH_COMPILE_CACHE of the compiled subjects: loaded where it exists, written after a
    # warm-up that compiled afresh. None: none.
    compile_cache: Path | None = None
    log_dir: Path = LOGS

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def compile_s(self) -> float:
        """The estimated compile of one size, warm-ups included, in this mode and scope."""
        whole = WHOLE_OVER_BLOCKS if self.compile_scope == "whole" else 1.0
        return COMPILE_S[self.compile_mode] * whole


def preset() -> dict[str, Any]:
    """The few-step preset the tiny adapter declares, SDXL-Lightning's: 4 steps, no guidance."""
    from devtools.tiny_lora import FAST_PRESET

    return dict(FAST_PRESET)


def request_params(config: Config, kind: str, seed: int) -> dict[str, Any]:
    """What a served request sends; the bare call fills the rest with the same defaults."""
    params = {"prompt": PROMPT, "num_inference_steps": config.steps, "seed": seed}
    if kind == "preset":
        params.update(preset())
    return {**params, "width": config.size, "height": config.size}


def served_env(config: Config, variant: str) -> dict[str, str]:
    """This process's environment with the model paths, the variant's flags and, on a GPU,
    ALLOW_CPU off: the Service runs as in production."""
    env = {k: v for k, v in os.environ.items() if k != "BENTOML_HOME"}  # each server its own
    env.update(model_env(config.model_dir))
    env.update({flag: "1" if flag in VARIANTS[variant] else "0" for flag in FLAGS})
    env["TORCH_COMPILE_SIZES"] = f"{config.size}x{config.size}"
    env["TORCH_COMPILE_MODE"] = config.compile_mode
    env["TORCH_COMPILE_SCOPE"] = config.compile_scope
    env["TORCH_COMPILE_CACHE"] = str(config.compile_cache or "")
    env["ALLOW_CPU"] = "0" if config.cuda else "1"
    return env


# --- the subjects: diffusers called here, or a `bentoml serve` ---


class Subject(abc.ABC):
    mode = ""

    def __init__(self, config: Config, variant: str) -> None:
        self.config = config
        self.variant = variant
        self.live = False
        self.startup_s: float | None = None
        self.first_s: float | None = None
        self.seconds: dict[str, list[float]] = {"image": [], "preset": []}
        self.rates: list[float] = []
        self.memory_gib: float | None = None
        self.missing: dict[str, str] = {}  # figure: why it has no value
        # A compiled subject's proof that its graphs ran: compiles, recompiles, fallbacks.
        self.counters: dict[str, int] = {}
        self.error: str | None = None

    @property
    def name(self) -> str:
        return f"{self.mode} {label(self.variant)}"

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def generate(self, kind: str, seed: int) -> float:
        """Seconds for one image."""

    @abc.abstractmethod
    def burst(self, seed: int) -> float:
        """Images per second."""

    @abc.abstractmethod
    def read_memory(self) -> None:
        """Peak GPU memory so far, in GiB."""

    @abc.abstractmethod
    def read_counters(self) -> None:
        """With TORCH_COMPILE: what shows whether the compiled graphs ran."""

    def stop(self) -> None:
        self.live = False

    def fail(self, reason: str) -> None:
        self.error = self.error or reason
        with contextlib.suppress(Exception):
            self.stop()


class Bare(Subject):
    """diffusers' StableDiffusionXLControlNetPipeline, called directly in this process."""

    mode = "bare"

    def start(self) -> None:
        import torch
        from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionXLControlNetPipeline
        from PIL import Image

        from sdxl_controlnet.front import preprocessing
        from sdxl_controlnet.schemas import Params

        began = time.perf_counter()
        self.live = True
        # What the caching allocator holds for this subject alone: the other bare subject
        # may hold memory in this process already.
        self.reserved_before = torch.cuda.memory_reserved() if self.config.cuda else 0
        self.peak_reserved = 0
        env, device = model_env(self.config.model_dir), self.config.device
        dtype = torch.float16 if self.config.cuda else torch.float32
        self.pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
            env["SDXL_BASE_MODEL"],
            controlnet=ControlNetModel.from_pretrained(env["SDXL_CONTROLNET_MODEL"], dtype=dtype),
            vae=AutoencoderKL.from_pretrained(env["SDXL_VAE_MODEL"], dtype=dtype),
            dtype=dtype,
        ).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        flags = VARIANTS[self.variant]
        if "CHANNELS_LAST" in flags:
            for model in (self.pipe.unet, self.pipe.controlnet, self.pipe.vae):
                model.to(memory_format=torch.channels_last)
        if "FUSE_QKV" in flags:
            self.pipe.fuse_qkv_projections()
        # The edge map the front makes of the same upload.
        size = self.config.size
        edges = preprocessing.edge_map(photo(size, size), Params(prompt=PROMPT))
        self.control = Image.fromarray(edges).convert("RGB")
        if "TORCH_COMPILE" in flags:  # as the Service compiles, warm-ups before it is ready
            self._compile()
        self.startup_s = time.perf_counter() - began

    def _compile(self) -> None:
        import torch

        from sdxl_controlnet.gpu.compilation import (
            compile_module,
            compile_options,
            load_cache,
            warm_ups,
        )

        if self.config.compile_cache is not None:
            load_cache(self.config.compile_cache)
        mode = self.config.compile_mode if self.config.cuda else "default"
        options = compile_options(mode, "INDUCTOR_SPEED_GUIDE" in VARIANTS[self.variant])
        scope = self.config.compile_scope
        self.pipe.unet = compile_module(self.pipe.unet, scope, **options)
        self.pipe.controlnet = compile_module(self.pipe.controlnet, scope, **options)
        self.pipe.vae.decoder = torch.compile(self.pipe.vae.decoder, **options)
        for _ in range(warm_ups(mode)):  # no timed image records a CUDA graph
            self._call({"prompt": "warm-up", "num_inference_steps": 2, "seed": 0})

    def _call(self, request: dict[str, Any]) -> float:
        import torch

        from sdxl_controlnet.gpu.pipeline import SCHEDULERS
        from sdxl_controlnet.schemas import GenerationParams

        # The Service's defaults for everything the request leaves out.
        p = GenerationParams(**{k: v for k, v in request.items() if k not in ("width", "height")})
        scheduler, options = SCHEDULERS[p.scheduler]
        self.pipe.scheduler = scheduler.from_config(self.pipe.scheduler.config, **options)
        cuda = self.config.cuda
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        self.pipe(
            prompt=p.prompt,
            prompt_2=p.prompt_2,
            negative_prompt=p.negative_prompt,
            negative_prompt_2=p.negative_prompt_2,
            image=self.control,
            height=self.config.size,
            width=self.config.size,
            num_inference_steps=p.num_inference_steps,
            guidance_scale=p.guidance_scale,
            controlnet_conditioning_scale=p.controlnet_conditioning_scale,
            control_guidance_start=p.control_guidance_start,
            control_guidance_end=p.control_guidance_end,
            guess_mode=p.guess_mode,
            generator=torch.Generator(self.config.device).manual_seed(p.seed),
            output_type="np",
        )
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_reserved() - self.reserved_before
            self.peak_reserved = max(self.peak_reserved, peak)
        return time.perf_counter() - began

    def generate(self, kind: str, seed: int) -> float:
        return self._call(request_params(self.config, kind, seed))

    def burst(self, seed: int) -> float:
        # Bare diffusers serves no concurrent callers: its rate is images back to back.
        n = self.config.concurrency
        return n / sum(self.generate("image", seed + i) for i in range(n))

    def read_memory(self) -> None:
        """The largest ``max_memory_reserved`` of its calls, each after
        ``reset_peak_memory_stats``, less what was reserved before it started."""
        if self.config.cuda:
            self.memory_gib = self.peak_reserved / 2**30

    def read_counters(self) -> None:
        from torch._dynamo.utils import counters

        # This process's: all bare subjects together.
        self.counters = {
            "graphs": counters["stats"]["unique_graphs"],
            "recompiles": sum(counters["recompiles"].values()),
            "graph breaks": sum(counters["graph_break"].values()),
            "CUDA graph skips": counters["inductor"]["cudagraph_skips"],
        }

    def stop(self) -> None:
        super().stop()
        self.pipe = self.control = None
        gc.collect()
        if self.config.cuda:
            import torch

            torch.cuda.empty_cache()


class Served(Subject):
    """`bentoml serve .` of both Services on a free port, sent multipart /generate requests."""

    mode = "served"
    server: Server | None = None

    def start(self) -> None:
        size = self.config.size
        buffer = io.BytesIO()
        photo(size, size).save(buffer, format="JPEG", quality=90)
        self.upload = buffer.getvalue()
        began = time.perf_counter()
        self.live = True
        self.server = Server(
            ["serve", "."],
            env=served_env(self.config, self.variant),
            log_dir=self.config.log_dir,
            fault_hooks=False,
        )
        self.server.wait_ready(timeout=self.config.budget_s)  # the plan's deadline stops it first
        self.startup_s = time.perf_counter() - began

    def generate(self, kind: str, seed: int) -> float:
        assert self.server
        began = time.perf_counter()
        response = post_generate(
            self.server.url,
            self.upload,
            request_params(self.config, kind, seed),
            "image/jpeg",
            timeout=self.config.budget_s,
        )
        elapsed = time.perf_counter() - began
        if response.status_code != 200:
            raise RuntimeError(f"/generate answered {response.status_code}: {response.text[:200]}")
        return elapsed

    def burst(self, seed: int) -> float:
        """Twice ``concurrency`` requests, ``concurrency`` in flight at a time."""
        n = self.config.concurrency
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            began = time.perf_counter()
            list(pool.map(lambda i: self.generate("image", seed + i), range(2 * n)))
            return 2 * n / (time.perf_counter() - began)

    def read_memory(self) -> None:
        """torch.cuda's ``max_memory_reserved`` in the GPU Service's worker since it started
        (its /metrics), the CUDA-graph pool included: the bare subjects' measure, in a
        process of its own (nvidia-smi's process ids fail in containers)."""
        if not self.config.cuda or self.server is None:
            return
        peak = metric(self.server, "sdxl_controlnet_gpu_memory_peak_bytes", kind="reserved")
        self.memory_gib = peak / 2**30 if peak else None

    def read_counters(self) -> None:
        uncompiled = metric(self.server, "sdxl_controlnet_uncompiled_generations_total")
        self.counters = {"uncompiled generations": int(uncompiled)}

    def stop(self) -> None:
        super().stop()
        if self.server is not None:
            self.server.stop()
            self.server = None


def label(variant: str) -> str:
    return "eager" if variant == "off" else variant


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def build_plan(
    config: Config, deadline: float, saved: Callable[[], None] = lambda: None
) -> tuple[Plan, list[Subject]]:
    """The items in the order users need their figures: served TORCH_COMPILE (start, first
    request, images), then bare TORCH_COMPILE; then eager, bare and served, its images in
    turns with the compiled subjects of each mode still running, so that every ratio is
    measured side by side; then each other variant, served first, its images in turns with
    the eager subject of the same mode. ``saved`` is called after every image."""
    plan = Plan(deadline)
    subjects = {(cls.mode, v): cls(config, v) for v in config.variants for cls in (Bare, Served)}
    scale = (config.size / 1024) ** 2 * config.steps / 30
    preset_share = preset()["num_inference_steps"] / config.steps / 2  # no guidance: half

    def compiling(subject: Subject) -> bool:
        return "TORCH_COMPILE" in VARIANTS[subject.variant]

    def startup_estimate(subject: Subject) -> float:
        eager = subjects[(subject.mode, "off")].startup_s
        base = eager if eager is not None else ESTIMATE_S[f"start {subject.mode}"]
        return base + config.compile_s * compiling(subject)

    def image_estimate(subject: Subject, kind: str) -> float:
        eager = subjects[(subject.mode, "off")]
        measured = median_or_none(subject.seconds["image"]) or subject.first_s
        measured = measured or median_or_none(eager.seconds["image"]) or eager.first_s
        image = measured or ESTIMATE_S["image"] * scale
        return image * preset_share if kind == "preset" else image

    def missed(group: list[Subject], figure: str) -> Callable[[str], None]:
        """What an item that did not run to its end leaves: each subject's reason for the
        figure; a start-up that did not finish stops the subject."""

        def note(reason: str) -> None:
            for subject in group:
                subject.missing.setdefault(figure, reason)
                if figure == "startup":
                    subject.fail(reason)

        return note

    def images(group: list[Subject], kind: str) -> float:
        """One image of ``kind`` from each subject still expected to run."""
        return sum(image_estimate(s, kind) for s in group if s.error is None)

    def live(group: list[Subject]) -> list[Subject]:
        return [s for s in group if s.live]

    def none_live(group: list[Subject]) -> Callable[[], str | None]:
        return lambda: (
            None if live(group) else "; ".join({s.error or "not started": 0 for s in group})
        )

    def each(group: list[Subject], action: Callable[[Subject], None]) -> None:
        for subject in live(group):
            try:
                action(subject)
            except Exception as exc:
                say(f"{subject.name} failed: {exc}")
                subject.fail(f"{type(exc).__name__}: {exc}"[:300])

    def start_item(subject: Subject) -> None:
        plan.add(
            Item(
                f"start {subject.name}" + (" (compiles)" if compiling(subject) else ""),
                lambda: startup_estimate(subject),
                subject.start,
                missed=missed([subject], "startup"),
                minimum=(
                    (
                        lambda: (
                            startup_estimate(subject)
                            - config.compile_s
                            + ESTIMATE_S["compile at least"]
                        )
                    )
                    if compiling(subject)
                    else None
                ),
            )
        )

    def first_item(group: list[Subject]) -> None:
        def run() -> None:
            def first(s: Subject) -> None:
                s.first_s = s.generate("image", 0)
                saved()

            each(group, first)

        plan.add(
            Item(
                f"first request: {', '.join(s.name for s in group)}",
                lambda: images(group, "image") + ESTIMATE_S["first extra"] * len(group),
                run,
                blocked=none_live(group),
                missed=missed(group, "first"),
            )
        )

    def timed_item(group: list[Subject], kind: str, extra: list[Subject] = ()) -> None:
        """``config.runs`` rounds over ``group`` and ``extra`` (the baseline), each subject
        taking each place in the order in turn; the results saved after every image."""
        everyone = [*group, *extra]

        def run() -> None:
            for round_ in range(config.runs):
                order = live(everyone)
                order = order[round_ % max(len(order), 1) :] + order[: round_ % max(len(order), 1)]

                def once(s: Subject, seed: int = 1 + round_) -> None:
                    s.seconds[kind].append(s.generate(kind, seed))
                    s.read_memory()
                    saved()

                each(order, once)
            each([s for s in everyone if compiling(s)], lambda s: s.read_counters())

        what = "4-step preset" if kind == "preset" else f"{config.size}², {config.steps} steps"
        plan.add(
            Item(
                f"{what}, {config.runs} each: {', '.join(s.name for s in everyone)}",
                lambda: config.runs * images(everyone, kind),
                run,
                blocked=none_live(group),
                missed=missed(group, kind),
            )
        )

    def burst_item(group: list[Subject]) -> None:
        def run() -> None:
            for burst in range(config.bursts):
                each(group, lambda s, b=burst: s.rates.append(s.burst(1000 * (b + 1))))

        plan.add(
            Item(
                f"bursts at concurrency {config.concurrency}: {', '.join(s.name for s in group)}",
                lambda: 2 * config.concurrency * config.bursts * images(group, "image"),
                run,
                blocked=none_live(group),
                missed=missed(group, "burst"),
            )
        )

    def stop_item(variant: str) -> None:
        """The next variant needs the memory: only the eager baseline stays loaded."""
        pair = [subjects[("served", variant)], subjects[("bare", variant)]]
        plan.add(
            Item(f"stop {variant}", lambda: 0.0, lambda: each(pair, Subject.stop), listed=False)
        )

    if not _model_built(config.model_dir):
        plan.add(
            Item(
                f"build the full-size model in {config.model_dir}",
                lambda: ESTIMATE_S["build"],
                lambda: _build_model(config),
                missed=missed(list(subjects.values()), "startup"),
            )
        )
    # What users need most: the compiled Service's seconds per image, then the compiled
    # pipeline's, each subject alone until eager runs beside it.
    leading = "TORCH_COMPILE" if "TORCH_COMPILE" in config.variants else None
    compiled = [subjects[(mode, leading)] for mode in ("served", "bare")] if leading else []
    for subject in compiled:
        start_item(subject)
        first_item([subject])
        timed_item([subject], "image")
    eager = [subjects[("bare", "off")], subjects[("served", "off")]]
    for subject in eager:
        start_item(subject)
    first_item(eager)
    timed_item(eager, "image", extra=compiled)
    timed_item(eager, "preset")
    if config.bursts:
        burst_item([*compiled, *eager])
    if leading:
        stop_item(leading)
    for variant in config.variants:
        if variant in ("off", leading):
            continue
        pair = [subjects[("served", variant)], subjects[("bare", variant)]]
        for subject in pair:
            start_item(subject)
            first_item([subject])
            timed_item([subject], "image", extra=[subjects[(subject.mode, "off")]])
        if config.bursts:
            burst_item(pair)
        stop_item(variant)
    return plan, list(subjects.values())


def _model_built(model_dir: Path) -> bool:
    from devtools.full_size_model import is_built

    return is_built(model_dir)


def _build_model(config: Config) -> None:
    from devtools.full_size_model import build

    if not config.cuda:
        raise RuntimeError(f"no model in {config.model_dir}; the rehearsal takes a built one")
    build(config.model_dir)


# --- the run, its figures and the table ---


def run_benchmark(
    config: Config,
    started: float | None = None,
    save: Callable[[dict[str, Any]], None] = lambda results: None,
) -> dict[str, Any]:
    """Every item that fits in ``config.budget_s`` counted from ``started`` (time.time();
    default now), as a JSON-ready dict, handed to ``save`` after every image and every item
    too: a run cut short keeps each image it measured."""
    started = time.time() if started is None else started
    deadline = time.monotonic() + config.budget_s - (time.time() - started) - RESERVE_S

    def saved() -> None:
        save(results_so_far(config, started, plan, subjects))

    plan, subjects = build_plan(config, deadline, saved)
    try:
        plan.run(after=saved)
    finally:
        for subject in subjects:  # one that fails to stop leaves the others to stop
            with contextlib.suppress(Exception):
                subject.stop()
    return results_so_far(config, started, plan, subjects)


def results_so_far(
    config: Config, started: float, plan: Plan, subjects: list[Subject]
) -> dict[str, Any]:
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "seconds": round(time.time() - started, 1),
        "plan": [item.as_dict() for item in plan.items if item.listed],
        "subjects": [
            {
                "mode": s.mode,
                "variant": s.variant,
                "startup_s": s.startup_s,
                "first_request_s": s.first_s,
                "seconds_per_image": s.seconds["image"],
                "seconds_per_preset_image": s.seconds["preset"],
                "images_per_s": s.rates,
                "peak_gpu_gib": s.memory_gib,
                "counters": s.counters,
                "missing": s.missing,
                "error": s.error,
            }
            for s in subjects
        ],
        "rows": figures(subjects, config),
    }


def stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
    }


def figures(subjects: list[Subject], config: Config) -> list[dict[str, Any]]:
    """One row per variant and figure: bare, served (each its figures or why there are none),
    and served/bare."""
    by = {(s.mode, s.variant): s for s in subjects}
    what = f"{config.size}², {config.steps} steps"
    kinds: list[tuple[str, str, str, Callable[[Subject], list[float]]]] = [
        ("startup", "start-up to ready", "s", lambda s: _one(s.startup_s)),
        ("first", "first request", "s", lambda s: _one(s.first_s)),
        ("image", f"seconds per image ({what})", "s", lambda s: s.seconds["image"]),
        ("preset", "4-step preset, seconds per image", "s", lambda s: s.seconds["preset"]),
        ("burst", f"images/s at concurrency {config.concurrency}", "img/s", lambda s: s.rates),
        ("memory", "peak GPU memory", "GiB", lambda s: _one(s.memory_gib)),
    ]
    rows = []
    for variant in config.variants:
        for kind, name, unit, get in kinds:
            if (kind == "preset" and variant != "off") or (kind == "burst" and not config.bursts):
                continue
            cells = {}
            for mode in ("bare", "served"):
                subject = by[(mode, variant)]
                values = get(subject)
                if kind == "memory" and not config.cuda:
                    cells[mode] = NO_CUDA_REASON
                elif values:
                    cells[mode] = stats(values)
                else:
                    cells[mode] = subject.missing.get(kind) or subject.error or "not measured"
            bare, served = cells["bare"], cells["served"]
            ratio = None
            if isinstance(bare, dict) and isinstance(served, dict) and bare["median"]:
                ratio = served["median"] / bare["median"]
            rows.append(
                {
                    "variant": variant,
                    "figure": f"{name}, {label(variant)}",
                    "unit": unit,
                    "bare": bare,
                    "served": served,
                    "served_over_bare": ratio,
                }
            )
    return rows


def _one(value: float | None) -> list[float]:
    return [] if value is None else [value]


def _cell(cell: dict | str) -> str:
    if isinstance(cell, str):
        return f"({cell})"
    if cell["runs"] == 1:
        return f"{cell['median']:.3g}"
    return f"{cell['median']:.3g} [{cell['min']:.3g}–{cell['max']:.3g}] ×{cell['runs']}"


def _columns(lines: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    ]


def table(results: dict[str, Any]) -> str:
    """The figures, each variant's speed-up over eager, and the plan: estimate against time."""
    lines = [("figure", "unit", "bare", "served", "served/bare")]
    for row in results["rows"]:
        ratio = row["served_over_bare"]
        lines.append(
            (
                row["figure"],
                row["unit"],
                _cell(row["bare"]),
                _cell(row["served"]),
                "-" if ratio is None else f"{ratio:.3f}",
            )
        )
    text = _columns(lines)
    text.append("cells: median [min–max] ×runs, or (why there is no figure)")

    per_image = {
        (row["variant"], mode): row[mode]["median"]
        for row in results["rows"]
        if row["figure"].startswith("seconds per image")
        for mode in ("bare", "served")
        if isinstance(row[mode], dict)
    }
    speedups = []
    for variant in results["config"]["variants"]:
        cells = [
            f"{mode} {per_image[('off', mode)] / per_image[(variant, mode)]:.2f}×"
            for mode in ("bare", "served")
            if (variant, mode) in per_image and ("off", mode) in per_image
        ]
        if variant != "off" and cells:
            speedups.append(f"  {variant}: {', '.join(cells)}")
    if speedups:
        text += ["", "speed-up over eager (seconds per image, eager / variant):", *speedups]
    # A compiled row counts only where these show that its graphs ran.
    counted = [
        f"  {s['mode']} {s['variant']}: "
        + ", ".join(f"{name} {value}" for name, value in s["counters"].items())
        for s in results.get("subjects", [])
        if s.get("counters")
    ]
    if counted:
        text += ["", "compiled, after its timed images (dynamo, CUDA graphs, fallbacks):", *counted]

    budget = results["config"]["budget_s"]
    plan = [("plan", "estimate", "took", "")]
    for item in results["plan"]:
        estimate, took = item["estimate_s"], item["seconds"]
        plan.append(
            (
                item["name"],
                "-" if estimate is None else f"{estimate:.0f} s",
                "-" if took is None else f"{took:.0f} s",
                f"{item['status']}: {item['note']}" if item["note"] else item["status"],
            )
        )
    text += ["", f"budget {budget:.0f} s, used {results['seconds']:.0f} s:", *_columns(plan)]
    return "\n".join(text)


# --- the command ---


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL, help="built if absent")
    parser.add_argument(
        "--budget",
        type=float,
        default=float(os.environ.get("BENCH_GPU_BUDGET_S", BUDGET_S)),
        help="seconds for the whole run, the model build included (BENCH_GPU_BUDGET_S)",
    )
    parser.add_argument("--variants", help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--full", action="store_true", help="every variant, 5 runs, 2 bursts")
    parser.add_argument("--runs", type=int, help="timed images per subject (default 3; --full 5)")
    parser.add_argument("--size", type=int, default=1024, help="output side, pixels")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cpu", action="store_true", help="rehearse on the CPU, small model")
    parser.add_argument(
        "--compile-mode",
        choices=list(COMPILE_S),
        default="reduce-overhead",
        help="TORCH_COMPILE_MODE of the compiled variant (max-autotune: a longer window)",
    )
    parser.add_argument(
        "--compile-scope",
        choices=["blocks", "whole"],
        default="blocks",
        help="TORCH_COMPILE_SCOPE of the compiled variant (whole: a longer window)",
    )
    parser.add_argument(
        "--compile-cache",
        type=Path,
        help="TORCH_COMPILE_CACHE of the compiled subjects: loaded where it exists, written "
        "after a warm-up that compiled afresh (default: compile-cache.bin beside --output)",
    )
    parser.add_argument(
        "--plan", action="store_true", help="print the planned items and their times; run none"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write results")
    parser.add_argument("--log-dir", type=Path, default=LOGS, help="the servers' logs")
    args = parser.parse_args(argv)
    variants = args.variants or ",".join(VARIANTS if args.full else DEFAULT_VARIANTS)
    args.variants = [v.strip() for v in variants.split(",") if v.strip()]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if "off" not in args.variants:
        args.variants.insert(0, "off")  # the baseline every speed-up is read against
    args.runs = args.runs or (5 if args.full else 3)
    args.bursts = 2 if args.full else 0
    return args


def timeline(config: Config, model_built: bool = False) -> str:
    """The plan as it stands before anything is measured: each item, its estimate, and when
    it would start and end; what would not fit is marked so. No item runs."""
    plan, _ = build_plan(config, deadline=0.0)
    items = [i for i in plan.items if i.listed and (not model_built or "build" not in i.name)]
    room = config.budget_s - RESERVE_S
    lines, at = [("item", "estimate", "from", "to")], 0.0
    for item in items:
        estimate = item.estimate()
        need = item.minimum() if item.minimum else estimate
        if at + need > room:
            lines.append((item.name, f"{estimate:.0f} s", "-", f"skipped: {room - at:.0f} s left"))
            continue
        end = min(at + estimate, room)
        lines.append((item.name, f"{estimate:.0f} s", f"{at:.0f} s", f"{end:.0f} s"))
        at = end
    head = f"planned, budget {config.budget_s:.0f} s ({RESERVE_S:.0f} s kept to stop and write):"
    return "\n".join([head, *_columns(lines)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # scripts/gpu-bench.sh sets when the run began, so that installing the kit counts too.
    started = float(os.environ.get("BENCH_GPU_STARTED") or time.time())
    config = Config(
        model_dir=args.model_dir,
        variants=args.variants,
        size=args.size,
        steps=args.steps,
        runs=args.runs,
        bursts=args.bursts,
        budget_s=args.budget,
        device="cpu" if args.cpu else "cuda",
        log_dir=args.log_dir,
        compile_mode=args.compile_mode,
        compile_scope=args.compile_scope,
        compile_cache=args.compile_cache or args.output.with_name("compile-cache.bin"),
    )
    if args.plan:
        print(timeline(config, _model_built(config.model_dir)))
        return 0
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    cuda = torch.cuda.is_available() and not args.cpu
    header = {
        "gpu": torch.cuda.get_device_name() if cuda else NO_CUDA_REASON,
        "machine": f"{platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {len(os.sched_getaffinity(0))} CPUs",
        # Where the libraries came from: on a GPU machine, the kit's folder.
        "packages": {name: _package(name) for name in ("torch", "diffusers", "bentoml")},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    text = args.output.with_suffix(".txt")

    def save(results: dict[str, Any]) -> str:
        """The JSON and the table, each replaced whole: a run killed at any moment leaves
        the last complete pair."""
        results = {**header, **results}
        shown = table(results) + f"\n\n{results['gpu']}; {results['machine']}; "
        shown += f"results in {args.output}, table in {text}"
        for path, content in ((args.output, json.dumps(results, indent=1)), (text, shown)):
            partial = path.with_name(f".{path.name}.partial")
            partial.write_text(content + "\n")
            partial.replace(path)
        return shown

    print(save(run_benchmark(config, started, save)))
    return 0  # figures, never a failure: failures are in the table


def _package(name: str) -> str:
    module = importlib.import_module(name)
    return f"{module.__version__} in {Path(module.__file__).parent.parent}"


if __name__ == "__main__":
    sys.exit(main())
