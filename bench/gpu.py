"""GPU benchmark on a full-size SDXL + Canny ControlNet: `make bench-gpu`, or `python -m bench.gpu`.

Needs an NVIDIA GPU; without CUDA it says so and exits 0. The model is SDXL's
real architecture with random weights (``devtools.full_size_model``), built once
into ``--model-dir`` without the Hugging Face hub, so the figures are real
timings of real shapes.

Each variant (every speed-up flag off, each one on, all on) is measured two ways:
**bare**, diffusers' ``StableDiffusionXLControlNetPipeline`` called directly in a
process of its own, and **served**, a ``bentoml serve .`` of both Services sent
multipart ``/generate`` requests. Both stay loaded side by side on the GPU and
are measured in turns, as many variants at once as fit in GPU memory, so a
drifting clock weighs on all alike. Figures: seconds per image (1024², 30
steps, batch 1), images per second at concurrency 4, peak GPU memory, start-up.
Prints a table and writes every sample to bench/results/gpu-latest.json.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from PIL import Image, ImageDraw, ImageFilter

from devtools.harness import free_port, model_env, stop_process_tree

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "gpu-latest.json"
LOGS = ROOT / "bench" / "results" / "gpu-logs"
DEFAULT_MODEL = ROOT / "models" / "full-size"

FLAGS = ("CHANNELS_LAST", "FUSE_QKV", "TORCH_COMPILE")
VARIANTS: dict[str, tuple[str, ...]] = {
    "off": (),
    "CHANNELS_LAST": ("CHANNELS_LAST",),
    "FUSE_QKV": ("FUSE_QKV",),
    "TORCH_COMPILE": ("TORCH_COMPILE",),
    "all": FLAGS,
}
PROMPT = "a lighthouse on a rocky coast at dusk, photograph"
# The service's defaults that the bare call has to be told (diffusers' own differ).
CONTROLNET_SCALE = 0.5
CANNY_THRESHOLDS = (100, 200)

NO_CUDA = (
    "bench.gpu: no CUDA GPU here (torch.cuda.is_available() is False), so nothing was "
    "measured.\nThe GPU benchmark needs an NVIDIA GPU and a CUDA build of torch; "
    "`make bench` measures the CPU tier."
)
# Published figures to read ours against: SDXL base alone, fp16, 1024², 30 steps, batch 1.
ANCHORS_S = {"H100": 2.5, "A100": 3.7}
CONTROLNET_FACTOR = 4 / 3  # a Canny ControlNet adds about a third
ANCHOR_NOTE = (
    "published anchors (SDXL base, fp16, 1024², 30 steps, batch 1): 2.5 s on H100, "
    "3.7 s on A100; a Canny ControlNet adds about 1/3, so ≈ 3.3 s and ≈ 4.9 s with it"
)


@dataclass
class Config:
    model_dir: Path
    variants: list[str]
    size: int = 1024
    steps: int = 30
    runs: int = 5  # timed images per subject
    bursts: int = 2  # throughput bursts per subject
    concurrency: int = 4
    group: int | None = None  # variants measured side by side; None: as many as fit
    headroom_gib: float = 6.0  # GPU memory per subject beyond its weights
    ready_timeout_s: float = 1800.0  # TORCH_COMPILE start-up takes minutes
    log_dir: Path = LOGS  # each subject's output
    device: str = "cuda"  # "cpu" only to test the benchmark itself on the tiny model
    # Set on the served env last; only the CPU test of the benchmark itself uses it.
    server_env: dict[str, str] = field(default_factory=dict)

    @property
    def burst_requests(self) -> int:
        return 2 * self.concurrency


def served_env(config: Config, variant: str) -> dict[str, str]:
    """This process's environment with ALLOW_CPU unset, the model paths and the
    variant's flags: nothing else changes, so the Service runs as it would in production."""
    env = {k: v for k, v in os.environ.items() if k != "ALLOW_CPU"}
    env.update(model_env(config.model_dir))
    env.update({flag: "1" if flag in VARIANTS[variant] else "0" for flag in FLAGS})
    env.update(config.server_env)
    return env


def request_params(config: Config, seed: int) -> dict[str, Any]:
    return {
        "prompt": PROMPT,
        "num_inference_steps": config.steps,
        "width": config.size,
        "height": config.size,
        "seed": seed,
    }


def photo(size: int) -> Image.Image:
    """A synthetic photo: shapes on a gradient with sensor-like noise, so it has edges."""
    rng = np.random.default_rng(0)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([size // 8, size // 4, size // 2, 3 * size // 4], fill=(20, 40, 160))
    draw.ellipse([size // 2, size // 8, 7 * size // 8, 5 * size // 8], fill=(200, 30, 30))
    pixels = np.asarray(image).astype(np.int16)
    ramp = np.add.outer(np.arange(size), np.arange(size)) * 60 // (2 * size) - 30
    pixels += ramp[..., None] + rng.integers(-12, 12, pixels.shape, dtype=np.int16)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(0.8))


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def canny_image(size: int) -> Image.Image:
    """The edge map the front would send, as the RGB image a bare diffusers call takes."""
    import cv2

    edges = cv2.Canny(np.asarray(photo(size).convert("L")), *CANNY_THRESHOLDS)
    return Image.fromarray(edges).convert("RGB")


# --- the subjects: one bare pipeline process or one `bentoml serve` per (mode, variant) ---


class Subject(abc.ABC):
    mode = ""

    def __init__(self, config: Config, variant: str, group: int = 1) -> None:
        self.config = config
        self.variant = variant
        self.process: subprocess.Popen | None = None
        self.log = Path(config.log_dir) / f"group{group}-{self.mode}-{variant}.log"
        self.started = 0.0
        self.startup_s: float | None = None  # process start to ready, imports included
        self.seconds: list[float] = []  # per image
        self.rates: list[float] = []  # images per second
        self.failed_requests = 0
        self.peak_smi_mib: float | None = None  # nvidia-smi, the whole process tree
        self.max_allocated_mib: float | None = None  # torch, bare only
        self.error: str | None = None

    @property
    def name(self) -> str:
        return f"{self.mode} {self.variant}"

    def processes(self) -> list[psutil.Process]:
        """The subject's process tree (read from the memory sampler's thread too)."""
        process = self.process
        if process is None:
            return []
        try:
            root = psutil.Process(process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def pids(self) -> set[int]:
        return {proc.pid for proc in self.processes()}

    def stop(self) -> None:
        """Stop the whole process tree: BentoML starts its workers in sessions of their own."""
        if self.process is not None:
            stop_process_tree(self.process, grace_s=15)
            self.process = None

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def wait_ready(self) -> None: ...

    @abc.abstractmethod
    def generate(self, seed: int) -> float:
        """Seconds for one image."""

    @abc.abstractmethod
    def burst(self, seed: int) -> float:
        """Images per second."""

    def finish(self) -> None:  # noqa: B027 - a hook: only some subjects report anything
        """Collect what the subject reports about itself before it stops."""


class Bare(Subject):
    """diffusers' pipeline called directly, in a process of its own (``--bare-worker``),
    answering one JSON line per command."""

    mode = "bare"

    def start(self) -> None:
        spec = {
            **model_env(self.config.model_dir),
            "flags": VARIANTS[self.variant],
            "size": self.config.size,
            "steps": self.config.steps,
            "device": self.config.device,
        }
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.gpu", "--bare-worker", json.dumps(spec)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log.open("wb"),
            text=True,
            start_new_session=True,
        )

    def _reply(self) -> dict:
        assert self.process and self.process.stdout
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the bare pipeline process exited; see {self.log}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{reply['error']}; see {self.log}")
        return reply

    def _ask(self, **command: object) -> dict:
        assert self.process and self.process.stdin
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._reply()

    def wait_ready(self) -> None:
        self._reply()  # the worker's first line: loaded (and compiled), ready
        self.startup_s = time.monotonic() - self.started

    def generate(self, seed: int) -> float:
        return self._ask(cmd="generate", seed=seed)["seconds"]

    def burst(self, seed: int) -> float:
        # Bare diffusers serves no concurrent callers: its rate is images back to back.
        n = self.config.concurrency
        return n / self._ask(cmd="burst", seed=seed, n=n)["seconds"]

    def finish(self) -> None:
        self.max_allocated_mib = self._ask(cmd="memory")["max_allocated_mib"]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                self._ask(cmd="quit")
        super().stop()


class Served(Subject):
    """`bentoml serve .` of both Services on a free port, sent multipart /generate requests."""

    mode = "served"

    def start(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.upload = jpeg(photo(self.config.size))
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", ".", "--port", str(self.port)],
            cwd=ROOT,
            env=served_env(self.config, self.variant),
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self) -> None:
        while time.monotonic() - self.started < self.config.ready_timeout_s:
            assert self.process
            if self.process.poll() is not None:
                raise RuntimeError(f"`bentoml serve` exited; see {self.log}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    self.startup_s = time.monotonic() - self.started
                    return
            time.sleep(0.5)
        raise TimeoutError(f"not ready after {self.config.ready_timeout_s:.0f} s; see {self.log}")

    async def _post(self, client: httpx.AsyncClient, seed: int) -> httpx.Response:
        return await client.post(
            "/generate",
            files={"image": ("input.jpg", self.upload, "image/jpeg")},
            data={"params": json.dumps(request_params(self.config, seed))},
        )

    def _client(self, connections: int) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url,
            timeout=self.config.ready_timeout_s,
            limits=httpx.Limits(max_connections=connections),
        )

    def generate(self, seed: int) -> float:
        async def one() -> float:
            async with self._client(1) as client:
                start = time.perf_counter()
                response = await self._post(client, seed)
                elapsed = time.perf_counter() - start
                response.raise_for_status()
                return elapsed

        return asyncio.run(one())

    def burst(self, seed: int) -> float:
        """``burst_requests`` requests, ``concurrency`` in flight at a time."""
        concurrency = self.config.concurrency

        async def run() -> float:
            async with self._client(concurrency) as client:
                gate = asyncio.Semaphore(concurrency)

                async def one(i: int) -> bool:
                    async with gate:
                        return (await self._post(client, seed + i)).is_success

                start = time.perf_counter()
                ok = await asyncio.gather(*(one(i) for i in range(self.config.burst_requests)))
                elapsed = time.perf_counter() - start
            self.failed_requests += ok.count(False)
            return ok.count(True) / elapsed

        return asyncio.run(run())


# --- GPU memory per process, from nvidia-smi ---


def smi_process_memory() -> dict[int, float]:
    """MiB of GPU memory used by each process nvidia-smi lists (none without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return {}
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return {}
    usage: dict[int, float] = {}
    for line in out.splitlines():
        with contextlib.suppress(ValueError):
            pid, mib = (part.strip() for part in line.split(","))
            usage[int(pid)] = usage.get(int(pid), 0.0) + float(mib)
    return usage


class MemorySampler:
    """Keeps each subject's peak nvidia-smi memory, summed over its process tree, by
    polling while the subjects run (nvidia-smi has no peak of its own)."""

    def __init__(self, subjects: list[Subject], interval_s: float = 0.5) -> None:
        self.subjects = subjects
        self.interval_s = interval_s
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stopped.is_set():
            self.sample()
            self.stopped.wait(self.interval_s)

    def sample(self) -> None:
        usage = smi_process_memory()
        for subject in self.subjects:
            mine = [usage[pid] for pid in subject.pids() if pid in usage]
            if mine:
                subject.peak_smi_mib = max(subject.peak_smi_mib or 0.0, sum(mine))


# --- the run ---


def weights_gib(model_dir: Path) -> float:
    """GiB of weights a pipeline loads: the base's UNet and text encoders, ControlNet, VAE."""
    parts = ["base/unet", "base/text_encoder", "base/text_encoder_2", "controlnet", "vae"]
    files = (f for part in parts for f in (Path(model_dir) / part).glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) / 2**30


def plan_groups(
    variants: list[str], per_variant_gib: float, free_gib: float, group: int | None = None
) -> list[list[str]]:
    """Variants in groups measured side by side, each group's bare and served subjects
    fitting in 90 % of the free GPU memory (``group`` variants each, if given). When they
    take several groups, "off" is in each of them: every speed-up is then timed in turns
    with the baseline, and the baseline's samples span the whole run."""
    size = group or max(1, int(0.9 * free_gib // per_variant_gib))
    if len(variants) <= size:
        return [list(variants)]
    if size == 1 or "off" not in variants:
        return [variants[i : i + size] for i in range(0, len(variants), size)]
    rest = [v for v in variants if v != "off"]
    return [["off", *rest[i : i + size - 1]] for i in range(0, len(rest), size - 1)]


def rotated(items: list, shift: int) -> list:
    """``items`` starting at ``shift``: each subject takes each place in the order in turn."""
    shift %= max(1, len(items))
    return items[shift:] + items[:shift]


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure_group(config: Config, variants: list[str], group: int = 1) -> list[Subject]:
    """Start a bare and a served subject per variant, then time them in turns."""
    subjects: list[Subject] = [cls(config, v, group) for v in variants for cls in (Bare, Served)]
    live: list[Subject] = []

    def attempt(subject: Subject, what: str, fn: Any, *args: object) -> Any:
        """``fn(*args)``; if it fails, the subject is stopped and left out from then on."""
        try:
            return fn(*args)
        except Exception as exc:
            subject.error = f"{what}: {exc}"
            say(f"{subject.name} failed at {what}: {exc}")
            with contextlib.suppress(ValueError):
                live.remove(subject)
            subject.stop()
            return None

    try:
        with MemorySampler(subjects):
            # One at a time: a start-up (and a compile) has the machine to itself.
            for subject in subjects:
                say(f"starting {subject.name}")
                live.append(subject)
                attempt(subject, "start", lambda s: (s.start(), s.wait_ready()), subject)
                if subject.startup_s is not None:
                    say(f"{subject.name} ready in {subject.startup_s:.1f} s")
            for subject in list(live):  # untimed: first calls set up kernels and caches
                attempt(subject, "warm-up", subject.generate, 0)
            for run in range(config.runs):
                say(f"seconds per image, run {run + 1}/{config.runs}")
                for subject in rotated(list(live), run):
                    seconds = attempt(subject, "generate", subject.generate, 1 + run)
                    if seconds is not None:
                        subject.seconds.append(seconds)
            for burst in range(config.bursts):
                say(f"images per second at concurrency {config.concurrency}, burst {burst + 1}")
                for subject in rotated(list(live), burst):
                    rate = attempt(subject, "burst", subject.burst, 1000 * (burst + 1))
                    if rate is not None:
                        subject.rates.append(rate)
            for subject in list(live):
                attempt(subject, "memory", subject.finish)
    finally:
        for subject in subjects:
            subject.stop()
    return subjects


def run_benchmark(config: Config, free_gib: float | None = None) -> dict:
    """Measure every variant of ``config``; the results as a JSON-ready dict."""
    start = time.monotonic()
    per_variant = 2 * (weights_gib(config.model_dir) + config.headroom_gib)
    groups = plan_groups(config.variants, per_variant, free_gib or per_variant, config.group)
    say(f"variants in groups measured side by side: {groups}")
    subjects: list[Subject] = []
    for group, variants in enumerate(groups, 1):
        subjects += measure_group(config, variants, group)
    rows = figures(subjects, config)
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "groups": groups,
        "seconds": round(time.monotonic() - start),
        "anchors": ANCHOR_NOTE,
        "subjects": [
            {
                "mode": s.mode,
                "variant": s.variant,
                "flags": list(VARIANTS[s.variant]),
                "startup_s": s.startup_s,
                "seconds_per_image": s.seconds,
                "images_per_s": s.rates,
                "failed_requests": s.failed_requests,
                "peak_gpu_mib_nvidia_smi": s.peak_smi_mib,
                "max_allocated_mib": s.max_allocated_mib,
                "error": s.error,
                "log": str(s.log),
            }
            for s in subjects
        ],
        "rows": rows,
    }


# --- figures and the table ---


def stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
    }


def figures(subjects: list[Subject], config: Config) -> list[dict]:
    """One row per variant and figure: bare, served and served/bare. A variant measured
    in several groups (the baseline) has its samples pooled."""
    rows = []
    for variant in config.variants:
        mine = {
            mode: [s for s in subjects if s.mode == mode and s.variant == variant]
            for mode in ("bare", "served")
        }
        for figure, unit, get in [
            ("seconds per image", "s", lambda s: s.seconds),
            (
                f"images/s at concurrency {config.concurrency} (bare: back to back)",
                "img/s",
                lambda s: s.rates,
            ),
            ("peak GPU memory, nvidia-smi", "MiB", lambda s: _one(s.peak_smi_mib)),
            ("peak GPU memory, torch max allocated", "MiB", lambda s: _one(s.max_allocated_mib)),
            ("start-up to ready", "s", lambda s: _one(s.startup_s)),
        ]:
            b, s = (stats([v for subject in mine[m] for v in get(subject)]) for m in mine)
            ratio = s["median"] / b["median"] if b and s and b["median"] else None
            rows.append(
                {
                    "variant": variant,
                    "figure": figure,
                    "unit": unit,
                    "bare": b,
                    "served": s,
                    "served_over_bare": ratio,
                }
            )
    return rows


def _one(value: float | None) -> list[float]:
    return [] if value is None else [value]


def _cell(stat: dict | None) -> str:
    if stat is None:
        return "n/a"
    if stat["runs"] == 1:
        return f"{stat['median']:.3g}"
    return f"{stat['median']:.3g} [{stat['min']:.3g}–{stat['max']:.3g}] ×{stat['runs']}"


def table(results: dict) -> str:
    """Rows of figures, then each variant's speed against all flags off."""
    header = ("variant", "figure", "unit", "bare", "served", "served/bare")
    lines = [header]
    for row in results["rows"]:
        ratio = row["served_over_bare"]
        lines.append(
            (
                row["variant"],
                row["figure"],
                row["unit"],
                _cell(row["bare"]),
                _cell(row["served"]),
                "n/a" if ratio is None else f"{ratio:.3f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    text.append("cells: median [min–max] ×runs")

    per_image = {
        (row["variant"], mode): row[mode]["median"]
        for row in results["rows"]
        if row["figure"] == "seconds per image"
        for mode in ("bare", "served")
        if row[mode]
    }
    speedups = []
    for variant in results["config"]["variants"]:
        if variant == "off":
            continue
        cells = []
        for mode in ("bare", "served"):
            off, on = per_image.get(("off", mode)), per_image.get((variant, mode))
            cells.append(f"{mode} {off / on:.2f}×" if off and on else f"{mode} n/a")
        speedups.append(f"  {variant}: {', '.join(cells)}")
    if speedups:
        text += ["", "speed-up over all flags off (seconds per image, off / on):", *speedups]
    failures = [
        f"  {s['mode']} {s['variant']}: "
        + "; ".join(
            ([s["error"]] if s["error"] else [])
            + ([f"{s['failed_requests']} failed requests"] if s["failed_requests"] else [])
        )
        for s in results["subjects"]
        if s["error"] or s["failed_requests"]
    ]
    if failures:
        text += ["", "failures:", *failures]
    text += ["", ANCHOR_NOTE]
    gpu = results.get("gpu", "")
    for name, seconds in ANCHORS_S.items():
        if name in gpu:
            text.append(
                f"this GPU is an {name}: anchor ≈ {seconds * CONTROLNET_FACTOR:.1f} s per image "
                "with ControlNet"
            )
    return "\n".join(text)


# --- the bare pipeline process ---


def bare_worker(spec: dict) -> int:
    """Load the pipeline with ``spec``'s flags, then answer JSON-line commands on stdin:
    generate, burst, memory, quit. Replies go to the original stdout; everything else
    (library messages) goes to stderr, the log."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(**fields: object) -> None:
        replies.write(json.dumps(fields) + "\n")

    try:
        generate, memory = _load_bare(spec)
        reply(ready=True)
        for line in sys.stdin:
            command = json.loads(line)
            if command["cmd"] == "quit":
                break
            if command["cmd"] == "memory":
                reply(max_allocated_mib=memory())
                continue
            start = time.perf_counter()
            for i in range(command.get("n", 1)):
                generate(command["seed"] + i)
            reply(seconds=time.perf_counter() - start)
    except Exception as exc:
        reply(error=repr(exc))
        raise
    return 0


def _load_bare(spec: dict) -> tuple[Any, Any]:
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionXLControlNetPipeline

    device = spec["device"]
    cuda = device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        spec["SDXL_BASE_MODEL"],
        controlnet=ControlNetModel.from_pretrained(spec["SDXL_CONTROLNET_MODEL"], dtype=dtype),
        vae=AutoencoderKL.from_pretrained(spec["SDXL_VAE_MODEL"], dtype=dtype),
        dtype=dtype,
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    # The flags as the GPU Service applies them.
    if "CHANNELS_LAST" in spec["flags"]:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.controlnet.to(memory_format=torch.channels_last)
    if "FUSE_QKV" in spec["flags"]:
        pipe.fuse_qkv_projections()
    control = canny_image(spec["size"])

    def generate(seed: int, steps: int = spec["steps"]) -> None:
        pipe(
            prompt=PROMPT,
            image=control,
            height=spec["size"],
            width=spec["size"],
            num_inference_steps=steps,
            controlnet_conditioning_scale=CONTROLNET_SCALE,
            generator=torch.Generator(device).manual_seed(seed),
        )
        if cuda:
            torch.cuda.synchronize()

    if "TORCH_COMPILE" in spec["flags"]:
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune")
        pipe.controlnet = torch.compile(pipe.controlnet, mode="max-autotune")
        generate(0, steps=2)  # compiles, as the Service's warm-up does before it is ready

    def memory() -> float | None:
        return torch.cuda.max_memory_allocated() / 2**20 if cuda else None

    return generate, memory


# --- the command ---


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL, help="built if absent")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS)} (default: all)",
    )
    parser.add_argument("--runs", type=int, default=5, help="timed images per subject")
    parser.add_argument("--bursts", type=int, default=2, help="throughput bursts per subject")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024, help="output side, pixels")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--group", type=int, help="variants side by side (default: as many as fit)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write results")
    parser.add_argument("--quick", action="store_true", help="3 runs, 1 burst: a smoke test")
    parser.add_argument("--bare-worker", help=argparse.SUPPRESS)  # internal: a bare subject
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if "off" not in args.variants:
        args.variants.insert(0, "off")  # the baseline every speed-up is read against
    if args.quick:
        args.runs, args.bursts = 3, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bare_worker:
        return bare_worker(json.loads(args.bare_worker))

    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0

    from devtools.full_size_model import build, is_built

    if not is_built(args.model_dir):
        say(f"building the full-size random-weight model in {args.model_dir} (about 9.5 GB)")
        build(args.model_dir)
    config = Config(
        model_dir=args.model_dir,
        variants=args.variants,
        size=args.size,
        steps=args.steps,
        runs=args.runs,
        bursts=args.bursts,
        concurrency=args.concurrency,
        group=args.group,
    )
    free_bytes, total_bytes = torch.cuda.mem_get_info()
    gpu = torch.cuda.get_device_name()
    results = {
        "gpu": gpu,
        "gpu_memory_gib": round(total_bytes / 2**30, 1),
        "machine": f"{platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {len(os.sched_getaffinity(0))} CPUs",
        **run_benchmark(config, free_gib=free_bytes / 2**30),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\n{gpu}; {results['machine']}; {results['seconds']} s; results in {args.output}")
    return 1 if any(s["error"] for s in results["subjects"]) else 0


if __name__ == "__main__":
    sys.exit(main())
