"""Every operator-tunable setting, in one validated object read once from the environment.

Each field is named after its environment variable in lower case (``MAX_STEPS`` →
``max_steps``). A value that breaks a rule stops start-up with a message naming the
variable and the rule. Model ids default to the production SDXL models; point them
at local directories (``make tiny-model``) to run offline. Limits default to what
one NVIDIA L4 (24 GB) serves comfortably.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import json
import os
import re
import typing as t
from collections.abc import Mapping
from pathlib import Path

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from . import controls

# The front waits this much longer than the GPU Service's own timeout, so that a
# generation that times out reaches the client as a 504 with a message, not a cut connection.
FRONT_TIMEOUT_MARGIN_S = 30
# One front worker decodes, edge-maps and encodes in tens of milliseconds what a GPU takes
# seconds to generate: four keep a GPU replica fed with room to spare.
FRONT_WORKERS_CAP = 4


# The samplers a request can choose, declared here because an adapter's preset names one.
# "euler_trailing" is Euler with the trailing timestep spacing that few-step distilled
# models (SDXL-Lightning) are trained with; "lcm" is the sampler LCM-LoRA needs.
Scheduler = t.Literal[
    "euler",
    "euler_trailing",
    "euler_ancestral",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "ddim",
    "unipc",
    "lcm",
]
# How much of the UNet and the ControlNet TORCH_COMPILE compiles (gpu/compilation.py).
CompileScope = t.Literal["blocks", "whole"]
# LoRA weights as diffusers' save_lora_weights names them.
DEFAULT_LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class AllowEntry(t.NamedTuple):
    """One entry of an outbound allow-list: a host (a name or an address) or a network,
    and the one port it is allowed on, or any."""

    host: str | None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    port: int | None


def parse_allow_list(value: str) -> list[AllowEntry]:
    """``host``, ``host:port``, ``[v6]:port``, ``10.0.0.0/8``, ``10.0.0.0/8:8080`` or
    ``[fd00::/8]:443``, comma-separated; ValueError names the entry that is none of them."""
    entries = []
    for entry in filter(None, (part.strip() for part in value.split(","))):
        if entry.startswith("["):
            inside, _, rest = entry[1:].partition("]")
            port = rest.removeprefix(":") if rest.startswith(":") else None
            if rest and port is None:
                raise ValueError(f"{entry!r}: only :port may follow ]")
        elif entry.count(":") > 1:  # a bare IPv6 address or network, no port
            inside, port = entry, None
        else:
            inside, _, port = entry.partition(":")
            port = port if ":" in entry else None
        if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
        number = None if port is None else int(port)
        if "/" in inside:
            try:
                network = ipaddress.ip_network(inside, strict=False)
            except ValueError as exc:
                raise ValueError(f"{entry!r} is not a network: {exc}") from None
            entries.append(AllowEntry(None, network, number))
        elif re.fullmatch(r"[A-Za-z0-9.:_-]+", inside):
            entries.append(AllowEntry(inside.lower().rstrip("."), None, number))
        else:
            raise ValueError(f"{entry!r} is not a host name, an address or a CIDR network")
    return entries


def check_webhook_secret(value: str) -> str:
    """``value`` if it is a Standard Webhooks secret: ``whsec_`` and a base64 key of 24 to
    64 bytes; ValueError otherwise, without the value."""
    try:
        key = base64.b64decode(value.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        key = b""
    if not value.startswith("whsec_") or not 24 <= len(key) <= 64:
        raise ValueError(
            "must be whsec_ followed by a base64 key of 24 to 64 bytes, e.g. "
            "whsec_$(openssl rand -base64 32)"
        )
    return value


class SettingsError(Exception):
    """An environment variable holds a value the application cannot start with."""


class Preset(BaseModel):
    """The settings an adapter needs (a few-step distilled LoRA: its sampler, step count
    and guidance), used by a request that names the adapter and does not set them itself.
    Each is checked against the request's own bounds at start-up (schemas.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheduler: Scheduler | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None

    def values(self) -> dict[str, t.Any]:
        return self.model_dump(exclude_none=True)


class LoraAdapter(BaseModel):
    """One LoRA adapter a request can choose by name."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # A local directory, or org/name@revision on the Hugging Face hub (model_refs.py).
    model: str = Field(min_length=1)
    # The file in it; a hub reference downloads only this file.
    weight_name: str = Field(default=DEFAULT_LORA_WEIGHT_NAME, pattern=r"^[^/\\]+\.safetensors$")
    preset: Preset = Preset()


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Each model: a local directory, or a Hugging Face repository as org/name@revision.
    # The revisions are pinned commits, so that a seed gives the same image until the
    # operator moves them (docs/deployment.md, "Models"); each was the repository's main
    # branch as of 2023-10 (SDXL base, 1.0 release with the fp16 files), 2023-08 and 2023-07.
    sdxl_base_model: str = Field(
        default="stabilityai/stable-diffusion-xl-base-1.0@462165984030d82259a11f4367a4eed129e94a7b",
        min_length=1,
    )
    sdxl_controlnet_model: str = Field(
        default="diffusers/controlnet-canny-sdxl-1.0@eb115a19a10d14909256db740ed109532ab1483c",
        min_length=1,
    )
    # Several ControlNets, or one ControlNet Union, as name=reference pairs (controls.py):
    # canny=…,depth=… or union=xinsir/controlnet-union-sdxl-1.0@<commit>. Empty: the one
    # Canny ControlNet above. docs/configuration.md gives each choice's download and memory.
    sdxl_controlnets: str = ""
    # Controls one request may combine (params.controls); each adds a ControlNet pass per step.
    max_controls: int = Field(default=3, ge=1)
    # The SDXL VAE rescaled to stay finite in fp16.
    sdxl_vae_model: str = Field(
        default="madebyollin/sdxl-vae-fp16-fix@207b116dae70ace3637169f1ddd2434b91b3a8cd",
        min_length=1,
    )
    # TAESD for SDXL, the tiny distilled VAE that decodes the live previews of a generation
    # (params.preview_every) in milliseconds; empty turns previews off. ~10 MB.
    sdxl_preview_model: str = "madebyollin/taesdxl@b20258aaef75ef61e659c1e0f14f251cf0ad153e"
    # An IP-Adapter, for image prompts (params.controls of type image_prompt): a folder in
    # h94/IP-Adapter's layout (the variant's adapter and image encoder, below), or that
    # repository pinned, h94/IP-Adapter@018e402774aeeddd60609b4ecdb7e298259dc729 (4.4 GB).
    # Empty (the default) loads none.
    sdxl_ip_adapter: str = ""
    # Which of its SDXL adapters, with the image encoder it was trained with
    # (model_refs.IP_ADAPTER_VARIANTS): "sdxl" (ViT-bigG) or "plus-vit-h".
    sdxl_ip_adapter_variant: t.Literal["sdxl", "plus-vit-h"] = "sdxl"

    # Uploads: the body size is checked from Content-Length before it is read,
    # the pixel count from the image header before any pixel is decoded.
    max_upload_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    max_input_pixels: int = Field(default=4096 * 4096, ge=64 * 64)
    # Generated images: the input is scaled down to fit this area (SDXL's native 1024²).
    max_output_pixels: int = Field(default=1024 * 1024, ge=64 * 64)
    min_output_side: int = Field(default=64, ge=8, multiple_of=8)
    max_steps: int = Field(default=100, ge=1)
    max_images: int = Field(default=4, ge=1)
    max_prompt_chars: int = Field(default=2000, ge=1)
    # GPU memory: width × height × images of one request. Four 1024² images fit a 24 GB L4
    # because the VAE decodes them one at a time; lower it for smaller GPUs.
    max_batch_pixels: int = Field(default=4 * 1024 * 1024, ge=64 * 64)

    # How long one generation may take, queue included, before the caller gets a 504.
    generation_timeout_s: int = Field(default=300, ge=1)
    # Requests one GPU replica holds at once, one generating and the rest queued;
    # past that BentoML answers at once, and the front passes that on as a 503.
    max_queue: int = Field(default=32, ge=1)

    # GPUs on one host: the GPU Service runs one worker per GPU, each pinned to its own.
    gpus: int = Field(default=1, ge=1)
    # The GPU the GPU Service asks for (its `resources`); BentoCloud picks the instance by it.
    gpu_type: str = Field(default="nvidia-l4", pattern=r"^[a-z0-9][a-z0-9-]*$")
    # Without a visible CUDA GPU the GPU Service refuses to start unless this is set:
    # `make serve`, the tests and the CPU image set it; a GPU pod must not.
    allow_cpu: bool = False
    # Start on a BentoML other than the one bentoml_compat/ was checked against.
    allow_untested_bentoml: bool = False
    # Front workers: by default the CPUs this process may use, at most FRONT_WORKERS_CAP (a
    # GPU host's 16 to 200 cores are no measure of the front's work); "cpu_count" takes all
    # the host's cores, not a container's share of them.
    front_workers: t.Annotated[int, Field(ge=1)] | t.Literal["cpu_count"] = Field(
        default_factory=lambda: min(len(os.sched_getaffinity(0)), FRONT_WORKERS_CAP)
    )

    # GPU speed-ups, each off by default: see docs/performance.md.
    channels_last: bool = False  # NHWC memory layout for the UNet, ControlNet and VAE
    fuse_qkv: bool = False  # one matmul for attention's Q, K and V projections
    # torch.compile the UNet and ControlNet; start-up then runs one warm-up generation at
    # each of TORCH_COMPILE_SIZES (WxH, comma-separated); other sizes run uncompiled.
    torch_compile: bool = False
    # torch.compile's mode on a GPU: reduce-overhead (CUDA graphs, no kernel search) starts
    # within about a minute; max-autotune searches kernels for many minutes at a cold start,
    # longer than a startup probe waits: choose it with a warm TORCHINDUCTOR_CACHE_DIR. The
    # CPU runs inductor's default whatever this says.
    torch_compile_mode: t.Literal["max-autotune", "reduce-overhead", "default"] = "reduce-overhead"
    torch_compile_sizes: str = Field(default="1024x1024", pattern=r"^\d+x\d+(,\d+x\d+)*$")
    # What is compiled: "blocks" compiles the transformer blocks of the UNet and the ControlNet
    # (regional compilation), one graph per block shape that all blocks of that shape reuse,
    # so a cold start compiles a few small graphs instead of two whole networks; "whole"
    # compiles each network whole, a longer cold start for what speed fusing across blocks
    # may add (docs/performance.md has both measured). The VAE decoder compiles whole in both.
    torch_compile_scope: CompileScope = "blocks"
    # With TORCH_COMPILE, the inductor settings of diffusers' speed guide for SDXL: 1×1
    # convolutions as matrix multiplications, coordinate-descent tuning in all directions, no
    # epilogue fusion. Off until a GPU has measured what they give here (bench/gpu.py's
    # SPEED_GUIDE variant).
    inductor_speed_guide: bool = False
    # A file of torch.compile's artifacts (graphs, and on a GPU their Triton kernels:
    # torch.compiler's save_cache_artifacts): loaded before compiling where it exists, so
    # that a start finds its graphs instead of compiling them cold; written after the warm-up
    # where there was none to load or the warm-up still compiled afresh. It serves the torch
    # version and GPU it was made with; a stale or damaged one is logged, ignored, replaced.
    torch_compile_cache: str = ""

    # Prompts whose text-encoder outputs the GPU Service keeps (least recently used out):
    # about 0.6 MB of GPU memory each in fp16. 0 encodes every request's prompts afresh.
    prompt_cache_size: int = Field(default=64, ge=0)

    # LoRA adapters requests choose by name, as JSON: {"name": {"model": ..., "weight_name":
    # ..., "preset": {...}}}. All load at start-up: a request never waits for one.
    lora_adapters: dict[
        t.Annotated[str, Field(pattern=r"^[A-Za-z0-9][\w-]{0,63}$")], LoraAdapter
    ] = Field(default_factory=dict)

    # Jobs (/generate_task/…), in the job store (front/jobs.py): durable, FIFO, leased.
    # Jobs waiting for the GPU at once; past that a submit is a 429 with Retry-After.
    job_queue_max: int = Field(default=1000, ge=1)
    # GPU calls jobs make at once, counted across every front worker sharing the store:
    # interactive requests keep the rest of the GPU Service's queue.
    job_concurrency: int = Field(default=1, ge=1)
    # A running job's lease: its worker renews it every third of it; a worker that died lets
    # it lapse, and another worker runs the job again, up to JOB_MAX_ATTEMPTS runs in all.
    job_lease_s: float = Field(default=30.0, ge=1, le=3600)
    job_max_attempts: int = Field(default=3, ge=1, le=20)
    # What the job store holds of jobs' inputs at most, in bytes; past it a submit is a 507.
    job_store_max_bytes: int = Field(default=2 * 2**30, ge=2**20)
    # The job store every replica shares: redis://host:port/db, rediss:// (TLS) or
    # unix:// of a Redis 7 or Valkey (front/stores/redis_store.py). Empty: the embedded
    # one-host store, in JOB_STORE_PATH (empty for $BENTOML_HOME/sdxl_controlnet_jobs.db).
    job_store_url: str = Field(default="", pattern=r"^((redis|rediss|unix)://\S+)?$", repr=False)
    job_store_path: str = ""

    # Outbound requests, each under its own allow-list: https to public addresses only, except
    # for the hosts or networks listed (comma-separated, each optionally with :port), which
    # may also be http and private. URL_FETCH_ALLOW: images by URL; WEBHOOK_ALLOW: receivers.
    url_fetch_allow: str = ""
    webhook_allow: str = ""
    # Connecting, and the whole fetch of an image, in seconds.
    url_fetch_timeout_s: float = Field(default=10.0, gt=0, le=300)
    # Image fetches one front worker runs at once; past that a request is a 503 at once.
    max_concurrent_fetches: int = Field(default=32, ge=1)
    # Pixels of uploaded pictures one front worker decodes at once (by their headers; about
    # 12 bytes each while decoded): four 4096² pictures. Past that a request is a 503 at once.
    max_decoding_pixels: int = Field(default=4 * 4096 * 4096, ge=64 * 64)
    # The key that signs webhooks of jobs that bring none (params.webhook_secret); none
    # refuses those jobs. Standard Webhooks: whsec_ and base64.
    webhook_secret: str = Field(default="", repr=False)
    # Tries per webhook delivery; the wait before try n + 1 is drawn uniformly from
    # [0, min(WEBHOOK_MAX_BACKOFF_S, WEBHOOK_BACKOFF_S × 2^(n - 1))] (full jitter), or is the
    # receiver's Retry-After, up to WEBHOOK_MAX_BACKOFF_S.
    webhook_tries: int = Field(default=8, ge=1, le=50)
    webhook_backoff_s: float = Field(default=2.0, ge=0)
    # Minutes, not hours: a receiver's Retry-After cannot hold a delivery, and its place
    # among the pending ones, for longer.
    webhook_max_backoff_s: float = Field(default=300.0, ge=0, le=24 * 3600)
    # One webhook try, connecting included, in seconds.
    webhook_timeout_s: float = Field(default=15.0, gt=0, le=300)
    # Deliveries one front worker holds at once; a job that ends past that is delivered
    # nothing (logged and counted).
    webhook_max_pending: int = Field(default=1000, ge=1)
    # Of those, the most for one receiving host: a receiver that never answers cannot take
    # the places of everyone else's.
    webhook_max_pending_per_host: int = Field(default=50, ge=1)

    @field_validator("url_fetch_allow", "webhook_allow")
    @classmethod
    def _hosts_or_networks(cls, value: str) -> str:
        parse_allow_list(value)
        return value

    @field_validator("sdxl_controlnets")
    @classmethod
    def _name_reference_pairs(cls, value: str) -> str:
        controls.parse_controlnets(value, "unused")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _whsec(cls, value: str) -> str:
        return check_webhook_secret(value) if value else value

    @field_validator("lora_adapters", mode="before")
    @classmethod
    def _json(cls, value: t.Any) -> t.Any:
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc}") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> t.Self:
        if self.min_output_side**2 > self.max_output_pixels:
            raise ValueError("MIN_OUTPUT_SIDE² must not exceed MAX_OUTPUT_PIXELS")
        for width, height in self.compile_sizes:
            if width % 8 or height % 8 or width * height > self.max_output_pixels:
                raise ValueError(
                    f"TORCH_COMPILE_SIZES: {width}x{height} must have sides that are multiples "
                    "of 8 and at most MAX_OUTPUT_PIXELS pixels"
                )
        if self.torch_compile and list(self.controlnets) != ["canny"]:
            raise ValueError(
                "TORCH_COMPILE compiles the one Canny ControlNet; SDXL_CONTROLNETS declares "
                f"{', '.join(self.controlnets)}: leave TORCH_COMPILE off"
            )
        if self.sdxl_ip_adapter and (self.torch_compile or self.fuse_qkv):
            raise ValueError(
                "SDXL_IP_ADAPTER cannot be combined with TORCH_COMPILE or FUSE_QKV: the "
                "adapter's attention layers replace the ones those compile and fuse"
            )
        if self.fuse_qkv and self.lora_adapters:
            raise ValueError(
                "FUSE_QKV cannot be combined with LORA_ADAPTERS: the fused projections "
                "bypass the adapters' attention layers"
            )
        return self

    @property
    def compile_sizes(self) -> list[tuple[int, int]]:
        """(width, height) pairs to compile for, or none when compiling is off."""
        if not self.torch_compile:
            return []
        pairs = (size.split("x") for size in self.torch_compile_sizes.split(","))
        return [(int(width), int(height)) for width, height in pairs]

    @property
    def compile_cache(self) -> Path | None:
        """The compile cache file, or None where TORCH_COMPILE_CACHE is empty."""
        return Path(self.torch_compile_cache) if self.torch_compile_cache else None

    @functools.cached_property  # read by every request's validation
    def controlnets(self) -> dict[str, str]:
        """{name: model reference} of the ControlNets the GPU Service loads."""
        return controls.parse_controlnets(self.sdxl_controlnets, self.sdxl_controlnet_model)

    @functools.cached_property
    def control_types(self) -> list[str]:
        """The control types requests may ask for: the ControlNets', and an image prompt
        where an IP-Adapter is loaded."""
        image_prompt = [controls.IMAGE_PROMPT] if self.sdxl_ip_adapter else []
        return controls.offered(self.controlnets) + image_prompt

    @property
    def front_timeout_s(self) -> int:
        """How long the front waits for the GPU Service before it answers 504 itself."""
        return self.generation_timeout_s + FRONT_TIMEOUT_MARGIN_S

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """The settings that ``environ`` sets; unset variables keep their defaults."""
        names = {name.upper(): name for name in cls.model_fields}
        values = {names[key]: value for key, value in environ.items() if key in names}
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{_variable(error['loc'])}={_shown(error['loc'], values)}: "
                f"{_within(error['loc'])}{error['msg']}"
                if error["loc"]
                else error["msg"]
                for error in exc.errors(include_url=False)
            )
            raise SettingsError(f"invalid configuration: {problems}") from None


# Never printed, not even when invalid: a store URL may carry its password.
SECRETS = {"webhook_secret", "job_store_url"}


def _shown(loc: tuple[int | str, ...], values: Mapping[str, str]) -> str:
    name = str(loc[0])
    return "<hidden>" if name in SECRETS else repr(values.get(name, ""))


def _variable(loc: tuple[int | str, ...]) -> str:
    return str(loc[0]).upper()


def _within(loc: tuple[int | str, ...]) -> str:
    """Where in a structured value (LORA_ADAPTERS) the error is: ``lightning.preset: ``."""
    return ".".join(str(part) for part in loc[1:]) + ": " if len(loc) > 1 else ""


settings = Settings.from_env()
