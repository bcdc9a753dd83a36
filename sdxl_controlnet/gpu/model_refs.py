"""Where the models come from: a local directory, or a pinned Hugging Face repository.

A model setting holds either a directory (the tiny model, a mounted volume), used as it is
and never sent to the hub, or ``org/name@revision``, which becomes a BentoML model
reference: ``bentoml build`` records the commit in the Bento, ``bentoml serve`` downloads
the files through BentoML before the workers start. The include patterns name exactly the
files the pipeline loads; everything else in the repositories (ONNX, Flax and OpenVINO
exports, ``.bin`` duplicates, single-file checkpoints, sample images) stays on the hub.
LoRA adapters are declared the same way, each downloading just its weight file.
"""

from __future__ import annotations

import contextlib
import re
import typing as t
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import attrs
from bentoml.exceptions import BentoMLException
from bentoml.models import HuggingFaceModel

from ..controls import UNION

if t.TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ..settings import LoraAdapter, Settings

BASE_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
CONTROLNET_REPO = "diffusers/controlnet-canny-sdxl-1.0"
VAE_REPO = "madebyollin/sdxl-vae-fp16-fix"
PREVIEW_REPO = "madebyollin/taesdxl"
IP_ADAPTER_REPO = "h94/IP-Adapter"

# The files the pipeline loads, in fp16: half the download of fp32, and what a GPU runs.
# A CPU upcasts them. Never "*.safetensors": that also matches the single-file
# checkpoints, the base's own VAE and both precisions.
BASE_INCLUDE = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "tokenizer_2/*",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.fp16.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    # No vae/: the pipeline is given the fp16-fix VAE instead.
]
CONTROLNET_INCLUDE = ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
# xinsir/controlnet-union-sdxl-1.0 ships its weights in fp16 under the plain name (2.5 GB);
# not its ProMax file, which from_pretrained does not load.
UNION_INCLUDE = ["config.json", "diffusion_pytorch_model.safetensors"]
# The repository has no fp16 file: the fix is in the weights, kept in fp32 (335 MB).
VAE_INCLUDE = ["config.json", "diffusion_pytorch_model.safetensors"]
# TAESD's diffusers files (10 MB); not its .pth encoder and decoder, which are the same weights.
PREVIEW_INCLUDE = ["config.json", "diffusion_pytorch_model.safetensors"]


@dataclass(frozen=True)
class IPAdapterFiles:
    """Where h94/IP-Adapter keeps one SDXL adapter and the image encoder it was trained
    with; a local folder for SDXL_IP_ADAPTER has the same layout."""

    weight: str
    encoder: str

    @property
    def include(self) -> list[str]:
        """Just these files: not the SD 1.5 adapters, the .bin copies or other encoders."""
        return [self.weight, f"{self.encoder}/config.json", f"{self.encoder}/model.safetensors"]


# SDXL_IP_ADAPTER_VARIANT: the adapter (fp16) and its encoder (as stored) in that repository.
IP_ADAPTER_VARIANTS = {
    # Four image tokens from ViT-bigG's pooled embedding: 703 MB + 3.69 GB.
    "sdxl": IPAdapterFiles("sdxl_models/ip-adapter_sdxl.safetensors", "sdxl_models/image_encoder"),
    # Sixteen tokens from ViT-H's patch features through a Resampler, which follow the
    # picture's detail more closely: 848 MB + 2.53 GB (fp32, loaded in fp16).
    "plus-vit-h": IPAdapterFiles(
        "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors", "models/image_encoder"
    ),
}


def ip_adapter_include() -> list[str]:
    """The files of the adapter SDXL_IP_ADAPTER_VARIANT chooses, and its encoder's."""
    return IP_ADAPTER_VARIANTS[_settings().sdxl_ip_adapter_variant].include


def _settings() -> Settings:
    from ..settings import settings  # when asked: importing this module reads no environment

    return settings


# org/name, optionally @revision: the hub's own rules for names (letters, digits, - _ .).
_HUB_ID = re.compile(r"(?P<id>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


@dataclass(frozen=True)
class HubRepo:
    model_id: str
    revision: str = "main"


def parse(value: str) -> Path | HubRepo:
    """A model setting as a directory or a hub repository.

    An existing path, or one that starts with ``/``, ``.`` or ``~``, is a directory;
    ``org/name`` or ``org/name@revision`` is a repository. Anything else is refused here,
    rather than sent to the hub as a name it will not know.
    """
    path = Path(value).expanduser()
    if path.exists() or value.startswith(("/", ".", "~")):
        return path
    match = _HUB_ID.fullmatch(value)
    if match is None:
        raise ValueError(
            f"{value!r} is neither an existing directory nor a hub repository (org/name@revision)"
        )
    return HubRepo(match["id"], match["revision"] or "main")


def reference(setting: str, include: list[str]) -> HuggingFaceModel | str:
    """What the GPU Service declares as a class attribute for the model setting named
    ``setting`` (its environment variable, ``SDXL_BASE_MODEL``).

    A ``HuggingFaceModel`` for a repository (BentoML collects it, and on an instance the
    attribute reads as the local snapshot directory); the directory itself otherwise, which
    BentoML ignores. Either way ``self.<attribute>`` is a path ``from_pretrained`` takes.
    """
    return model_reference(getattr(_settings(), setting.lower()), include, setting)


def optional_reference(setting: str, include: list[str]) -> HuggingFaceModel | str | None:
    """``reference`` for a model the Service can do without: None where it is empty."""
    value = getattr(_settings(), setting.lower())
    return model_reference(value, include, setting, optional=True) if value else None


def model_reference(
    value: str, include: list[str], setting: str, optional: bool = False
) -> HuggingFaceModel | str:
    """``reference`` for ``value``, a model given in ``setting``."""
    source = parse(value)
    if isinstance(source, Path):
        return str(source)
    return _HubModel(
        source.model_id,
        revision=source.revision,
        include=include,
        setting=setting,
        optional=optional,
    )


class ModelUnavailable(BentoMLException):
    """A hub model that cannot be had, named by its setting: ``bentoml build`` and
    ``bentoml serve`` stop on it in one line."""


@attrs.define(unsafe_hash=True)
class _HubModel(HuggingFaceModel):
    """BentoML's hub reference, which names its setting where the hub cannot be reached
    (offline, a revision gone): BentoML would stop with the hub client's traceback."""

    setting: str = attrs.field(default="", eq=False)
    optional: bool = attrs.field(default=False, eq=False)

    def to_info(self, alias: str | None = None) -> t.Any:  # `bentoml build`: the commit
        with self._named():
            return super().to_info(alias)

    def resolve(self, base_path: t.Any = None) -> str:  # `bentoml serve`: the download
        with self._named():
            return super().resolve(base_path)

    @contextlib.contextmanager
    def _named(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            without = ", or empty to do without it" if self.optional else ""
            raise ModelUnavailable(
                f"{self.setting}={self.model_id}@{self.revision}: not available from the "
                f"Hugging Face hub ({type(exc).__name__}: {reason}); set {self.setting} to "
                f"a local folder of the model{without}"
            ) from None


# BentoML collects the models of a Service from its class attributes, one Model instance
# each (_bentoml_sdk/service/factory.py scans dir() of the class); a dict of them would
# not be collected, so each ControlNet and each adapter gets an attribute of its own.
CONTROLNET_ATTRIBUTE = "controlnet__{}"
ADAPTER_ATTRIBUTE = "lora_adapter__{}"


def with_controlnets(controlnets: Mapping[str, str]) -> Callable[[type], type]:
    """A class decorator, under ``@bentoml.service``, that declares each ControlNet of
    SDXL_CONTROLNETS (controls.py) like the base models."""

    declared_in = (
        "SDXL_CONTROLNETS" if _settings().sdxl_controlnets.strip() else "SDXL_CONTROLNET_MODEL"
    )

    def declare(cls: type) -> type:
        for name, value in controlnets.items():
            include = UNION_INCLUDE if name == UNION else CONTROLNET_INCLUDE
            ref = model_reference(value, include, declared_in)
            setattr(cls, CONTROLNET_ATTRIBUTE.format(name), ref)
        return cls

    return declare


def with_adapters(adapters: Mapping[str, LoraAdapter]) -> Callable[[type], type]:
    """A class decorator, under ``@bentoml.service``, that declares each adapter's model
    like the base models: a reference ``bentoml build`` records, or a local directory."""

    def declare(cls: type) -> type:
        for name, adapter in adapters.items():
            ref = model_reference(adapter.model, [adapter.weight_name], "LORA_ADAPTERS")
            setattr(cls, ADAPTER_ATTRIBUTE.format(name), ref)
        return cls

    return declare


def folders(service: t.Any) -> dict[str, t.Any]:
    """The folders of the models the GPU Service declares, on this instance (downloaded
    where they are references), as ``ControlNetPipeline.from_settings`` takes them."""
    return {
        "base": service.base,
        "controlnets": {
            name: getattr(service, CONTROLNET_ATTRIBUTE.format(name))
            for name in _settings().controlnets
        },
        "vae": service.vae,
        "preview": service.preview,
        "adapters": {
            name: (getattr(service, ADAPTER_ATTRIBUTE.format(name)), adapter.weight_name)
            for name, adapter in _settings().lora_adapters.items()
        },
        "ip_adapter": service.ip_adapter,
    }
