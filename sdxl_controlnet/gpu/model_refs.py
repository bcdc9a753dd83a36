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

import re
import typing as t
from dataclasses import dataclass
from pathlib import Path

from ..controls import UNION

if t.TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from bentoml.models import HuggingFaceModel

    from ..settings import LoraAdapter

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


def reference(value: str, include: list[str]) -> HuggingFaceModel | str:
    """What the GPU Service declares as a class attribute for one model setting.

    A ``HuggingFaceModel`` for a repository (BentoML collects it, and on an instance the
    attribute reads as the local snapshot directory); the directory itself otherwise, which
    BentoML ignores. Either way ``self.<attribute>`` is a path ``from_pretrained`` takes.
    """
    source = parse(value)
    if isinstance(source, Path):
        return str(source)
    from bentoml.models import HuggingFaceModel

    return HuggingFaceModel(source.model_id, revision=source.revision, include=include)


def optional_reference(value: str, include: list[str]) -> HuggingFaceModel | str | None:
    """``reference`` for a model the Service can do without: None where ``value`` is empty."""
    return reference(value, include) if value else None


# BentoML collects the models of a Service from its class attributes, one Model instance
# each (_bentoml_sdk/service/factory.py scans dir() of the class); a dict of them would
# not be collected, so each ControlNet and each adapter gets an attribute of its own.
CONTROLNET_ATTRIBUTE = "controlnet__{}"
ADAPTER_ATTRIBUTE = "lora_adapter__{}"


def with_controlnets(controlnets: Mapping[str, str]) -> Callable[[type], type]:
    """A class decorator, under ``@bentoml.service``, that declares each ControlNet of
    SDXL_CONTROLNETS (controls.py) like the base models."""

    def declare(cls: type) -> type:
        for name, value in controlnets.items():
            include = UNION_INCLUDE if name == UNION else CONTROLNET_INCLUDE
            setattr(cls, CONTROLNET_ATTRIBUTE.format(name), reference(value, include))
        return cls

    return declare


def controlnet_sources(service: object, controlnets: Mapping[str, str]) -> dict[str, str]:
    """Each ControlNet's directory on this instance, by name, downloaded if a reference."""
    return {name: getattr(service, CONTROLNET_ATTRIBUTE.format(name)) for name in controlnets}


def with_adapters(adapters: Mapping[str, LoraAdapter]) -> Callable[[type], type]:
    """A class decorator, under ``@bentoml.service``, that declares each adapter's model
    like the base models: a reference ``bentoml build`` records, or a local directory."""

    def declare(cls: type) -> type:
        for name, adapter in adapters.items():
            ref = reference(adapter.model, [adapter.weight_name])
            setattr(cls, ADAPTER_ATTRIBUTE.format(name), ref)
        return cls

    return declare


def adapter_sources(
    service: object, adapters: Mapping[str, LoraAdapter]
) -> dict[str, tuple[str, str]]:
    """Each adapter's (directory, weight file) on this instance, downloaded if a reference."""
    return {
        name: (getattr(service, ADAPTER_ATTRIBUTE.format(name)), adapter.weight_name)
        for name, adapter in adapters.items()
    }
