"""What tests and benchmarks share: the tiny model's settings, sample images, HTTP
helpers and a real `bentoml serve` in a subprocess. Importing it changes nothing."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image, ImageDraw, ImageFilter
from prometheus_client.parser import text_string_to_metric_families

from devtools import tiny_layout
from sdxl_controlnet.gpu.model_refs import IP_ADAPTER_VARIANTS

ROOT = Path(__file__).resolve().parent.parent
# A fault for tests (devtools/slow_gpu/sitecustomize.py): on the PYTHONPATH of every server
# started here, so `Server.slow_steps` can make each denoising step slow.
SLOW_GPU = Path(__file__).resolve().parent / "slow_gpu"
TINY_MODEL = ROOT / "models" / "tiny"
# Random LoRA adapters for the tiny model, built once for the tests and benchmarks.
TINY_ADAPTERS = ROOT / "test-artifacts" / "tiny-adapters"


def model_env(model_dir: Path) -> dict[str, str]:
    """The model settings for a directory laid out as the model builders write it; previews
    off where it has no preview decoder."""
    model_dir = Path(model_dir).resolve()
    preview = model_dir / tiny_layout.PREVIEW_SUBDIR
    return {
        "SDXL_BASE_MODEL": str(model_dir / tiny_layout.BASE_SUBDIR),
        "SDXL_CONTROLNET_MODEL": str(model_dir / tiny_layout.CONTROLNET_SUBDIR),
        "SDXL_VAE_MODEL": str(model_dir / tiny_layout.VAE_SUBDIR),
        "SDXL_PREVIEW_MODEL": str(preview) if preview.is_dir() else "",
    }


def tiny_model_env() -> dict[str, str]:
    """The settings that serve the tiny model, on the CPU, as `make serve` does."""
    return {**model_env(TINY_MODEL), "ALLOW_CPU": "1"}


def tiny_controlnets(configuration: str) -> dict[str, str]:
    """``SDXL_CONTROLNETS`` for the tiny model's ControlNets: ``canny+depth`` or ``union``."""
    tiny = {
        "canny": tiny_layout.CONTROLNET_SUBDIR,
        "depth": tiny_layout.DEPTH_SUBDIR,
        "union": tiny_layout.UNION_SUBDIR,
    }
    names = configuration.split("+")
    return {"SDXL_CONTROLNETS": ",".join(f"{n}={TINY_MODEL.resolve() / tiny[n]}" for n in names)}


def tiny_ip_adapter_env() -> dict[str, str]:
    """``SDXL_IP_ADAPTER`` for the tiny model's IP-Adapter: image prompts on."""
    return {"SDXL_IP_ADAPTER": str(TINY_MODEL.resolve() / tiny_layout.IP_ADAPTER_SUBDIR)}


def ensure_tiny_model() -> Path:
    """The tiny model's directory, each missing part built first (only then are the builder,
    torch and diffusers imported)."""
    plus = IP_ADAPTER_VARIANTS["plus-vit-h"].weight
    parts = {  # a file of each part, and the builder that writes the part
        f"{tiny_layout.BASE_SUBDIR}/model_index.json": "build",
        f"{tiny_layout.PREVIEW_SUBDIR}/config.json": "build_preview",
        f"{tiny_layout.UNION_SUBDIR}/config.json": "build_controls",
        f"{tiny_layout.IP_ADAPTER_SUBDIR}/{plus}": "build_ip_adapter",
    }
    for path, builder in parts.items():
        if not (TINY_MODEL / path).exists():
            from devtools import tiny_model

            getattr(tiny_model, builder)(TINY_MODEL)
    return TINY_MODEL


def ensure_tiny_adapters() -> Path:
    """The tiny model's LoRA adapters (devtools.tiny_lora), built first if missing."""
    from devtools import tiny_lora

    if not all((TINY_ADAPTERS / name).is_dir() for name in tiny_lora.ADAPTERS):
        tiny_lora.build(ensure_tiny_model(), TINY_ADAPTERS)
    return TINY_ADAPTERS


def tiny_adapters_env() -> dict[str, str]:
    """LORA_ADAPTERS declaring the tiny adapters: `style`, `detail`, and `fast` with a
    4-step preset."""
    from devtools import tiny_lora

    return {"LORA_ADAPTERS": json.dumps(tiny_lora.declaration(ensure_tiny_adapters()))}


def shapes_image(width: int = 160, height: int = 120, mode: str = "RGB") -> Image.Image:
    """A white picture with a dark rectangle and a circle: clear edges, flat areas."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([width // 8, height // 4, width // 2, 3 * height // 4], fill=(20, 40, 160))
    draw.ellipse([width // 2, height // 8, 7 * width // 8, 5 * height // 8], fill=(200, 30, 30))
    return image.convert(mode)


def photo(width: int, height: int) -> Image.Image:
    """Shapes on a gradient with sensor-like noise: compresses like a photo, unlike flat art."""
    rng = np.random.default_rng(0)
    pixels = np.asarray(shapes_image(width, height)).astype(np.int16)
    ramp = np.add.outer(np.arange(height), np.arange(width)) * 60 // (width + height) - 30
    pixels += ramp[..., None] + rng.integers(-12, 12, pixels.shape, dtype=np.int16)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(0.8))


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(
    url: str, running: Callable[[], bool], details: Callable[[], str], timeout: float = 120
) -> float:
    """Seconds until ``url``/readyz answered 200; fails at once if the server stopped."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not running():
            raise RuntimeError(f"server exited early; {details()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"server not ready after {timeout}s; {details()}")


def post_generate(
    url: str,
    image: bytes,
    params: dict,
    content_type: str = "image/png",
    endpoint: str = "/generate",
    timeout: float = 120,
) -> httpx.Response:
    """A multipart request to ``endpoint``, as any HTTP client sends it."""
    return httpx.post(
        f"{url}{endpoint}",
        files={"image": ("input", image, content_type)},
        data={"params": json.dumps(params)},
        timeout=timeout,
    )


class Server:
    """A `python -m bentoml ARGS` subprocess (or another BentoML CLI ``module``). BentoML
    starts each worker in a session of its own, so stopping it means stopping the whole
    process tree. Each server gets a BentoML home of its own: a server clears the Prometheus
    files under its home when it starts, which would wipe another server's /metrics."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        port: int = 0,
        module: str = "bentoml",
        log_dir: Path = ROOT / "test-artifacts",
        fault_hooks: bool = True,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log_dir) / f"server-{self.port}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.step_file = self.log.with_name(f"slow-step-{self.port}")
        self.step_file.unlink(missing_ok=True)
        # The slow-GPU fault, for tests; a benchmark measures the servers users run.
        hooks = {
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(SLOW_GPU), os.environ.get("PYTHONPATH")])
            ),
            "SDXL_SLOW_STEP_FILE": str(self.step_file),
        }
        self.env = {
            **os.environ,
            **tiny_model_env(),
            "BENTOML_HOME": str(self.log.parent / f"bentoml-home-{self.port}"),
            **(hooks if fault_hooks else {}),
            **(env or {}),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args, "--port", str(self.port)],
            cwd=ROOT,
            env=self.env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 120) -> float:
        """Seconds until /readyz answered 200."""
        return wait_until_ready(
            self.url, lambda: self.process.poll() is None, lambda: f"see {self.log}", timeout
        )

    def stop(self) -> None:
        stop_process_tree(self.process)

    @contextlib.contextmanager
    def slow_steps(self, seconds: float) -> Iterator[None]:
        """Within this block every denoising step of this server takes at least ``seconds``:
        a generation stays in flight as long as a test needs, at any image size."""
        self.step_file.write_text(str(seconds))
        try:
            yield
        finally:
            self.step_file.unlink(missing_ok=True)

    def generations_started(self) -> float:
        """Generations the GPU Service has started (it times each one's wait in its queue)."""
        return metric(self, "sdxl_controlnet_queue_wait_seconds_count")

    def wait_generating(self, started_before: float, timeout: float = 60) -> None:
        """Returns once a generation past ``started_before`` started ones is under way."""
        deadline = time.monotonic() + timeout
        while self.generations_started() <= started_before:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no generation started within {timeout} s; see {self.log}")
            time.sleep(0.1)

    def process_info(self) -> psutil.Process:
        return psutil.Process(self.process.pid)

    def workers(self, service: str) -> list[psutil.Process]:
        """The worker processes of ``service`` (``ControlNet`` or ``SDXLControlNetService``)."""
        return [
            process
            for process in self.process_info().children(recursive=True)
            if service in process.cmdline()
        ]


def stop_process_tree(process: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM to ``process`` and all its descendants, SIGKILL to what is left after
    ``grace_s``: in-flight requests get a grace period, and BentoML's front workers
    can linger after SIGTERM."""
    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    process.wait()


def metric(server: Server, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` with ``labels`` on ``server``'s /metrics."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def generate_calls(server: Server, service: str) -> float:
    """Successful /generate calls that BentoML counted for ``service`` on ``server``."""
    return metric(
        server,
        "bentoml_service_request_total",
        service_name=service,
        endpoint="/generate",
        http_response_code="200",
    )


@contextlib.contextmanager
def serving(env: dict[str, str] | None = None) -> Iterator[Server]:
    """`bentoml serve` of both Services with ``env`` set, ready, stopped afterwards."""
    srv = Server(["serve", "."], env=env)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
