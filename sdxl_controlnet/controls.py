"""The control types a request can steer with, and which ControlNets serve them: shared by
the front, which checks and publishes them, and the GPU Service, which loads the models.

``SDXL_CONTROLNETS`` declares the ControlNets as ``name=reference`` pairs: each name is the
control type that ControlNet serves (``canny=…,depth=…``), or ``union=…`` alone names one
ControlNet Union, which serves many types with one set of weights."""

from __future__ import annotations

import typing as t
from collections.abc import Mapping

ControlType = t.Literal[
    "canny", "depth", "pose", "lineart", "softedge", "scribble", "normal", "segment", "tile"
]
CONTROL_TYPES: tuple[str, ...] = t.get_args(ControlType)
# A control that is no ControlNet's: a picture whose style and subject the IP-Adapter
# (SDXL_IP_ADAPTER) carries into the image, beside the ControlNets' structure.
IMAGE_PROMPT = "image_prompt"
RequestControlType = t.Literal[ControlType, "image_prompt"]
UNION = "union"
# The types the front derives from the upload with OpenCV; the others need a model of
# their own (a depth estimator, a pose detector), so the client sends their control image.
DERIVED = ("canny", "tile")
# What xinsir/controlnet-union-sdxl-1.0 was trained on, as its control_mode index (its
# model card; diffusers' ControlNetUnionModel takes the index): six modes, no tile (its
# ProMax weights add tile and inpainting, in a file from_pretrained does not load).
UNION_MODES: dict[str, int] = {
    "pose": 0,
    "depth": 1,
    "softedge": 2,
    "scribble": 2,
    "canny": 3,
    "lineart": 3,
    "normal": 4,
    "segment": 5,
}
UNION_MODE_COUNT = 6


def parse_controlnets(value: str, single: str) -> dict[str, str]:
    """``SDXL_CONTROLNETS`` as {name: model reference}; empty means ``single`` (the one
    Canny ControlNet of ``SDXL_CONTROLNET_MODEL``). ValueError names the entry at fault."""
    if not value.strip():
        return {"canny": single}
    controlnets: dict[str, str] = {}
    for entry in (part.strip() for part in value.split(",")):
        name, equals, reference = (part.strip() for part in entry.partition("="))
        if not equals or not reference:
            raise ValueError(f"{entry!r} is not name=reference")
        if name not in (*CONTROL_TYPES, UNION):
            raise ValueError(
                f"{entry!r}: the name must be a control type ({', '.join(CONTROL_TYPES)}) "
                f"or {UNION}"
            )
        if name in controlnets:
            raise ValueError(f"{name!r} is declared twice")
        controlnets[name] = reference
    if UNION in controlnets and len(controlnets) > 1:
        raise ValueError(f"{UNION}=… serves every type alone: declare no other ControlNet")
    return controlnets


def offered(controlnets: Mapping[str, str]) -> list[str]:
    """The control types the declared ControlNets serve: a Union's, or their names."""
    if UNION in controlnets:
        return [kind for kind in CONTROL_TYPES if kind in UNION_MODES]
    return [kind for kind in CONTROL_TYPES if kind in controlnets]
