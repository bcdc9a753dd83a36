"""A fault for tests: a slow GPU. While the file named by ``SDXL_SLOW_STEP_FILE`` exists,
every UNet pass (one denoising step) takes at least the seconds written in it, so a test
can hold a generation in flight for as long as it needs at any image size.

Only development uses it: ``devtools.harness`` puts this folder on the ``PYTHONPATH`` of the
servers it starts, so each of their processes imports this module at start-up. It imports
nothing heavy; it waits for diffusers' UNet module to be imported (only the GPU Service
does) and wraps ``UNet2DConditionModel.forward`` there. Without the variable it does nothing.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
import time
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

UNET_MODULE = "diffusers.models.unets.unet_2d_condition"
STEP_FILE = os.environ.get("SDXL_SLOW_STEP_FILE", "")


def step_seconds() -> float:
    """The slowest a step may be now: 0 while the file is absent."""
    try:
        with open(STEP_FILE) as file:
            return float(file.read())
    except FileNotFoundError:
        return 0.0


def slowed(forward: Callable) -> Callable:
    @functools.wraps(forward)
    def slow_forward(*args: object, **kwargs: object) -> object:
        start = time.monotonic()
        output = forward(*args, **kwargs)
        time.sleep(max(0.0, step_seconds() - (time.monotonic() - start)))
        return output

    return slow_forward


class SlowUNetFinder(importlib.abc.MetaPathFinder):
    """Finds the UNet module as Python would, and slows its forward once it has run."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != UNET_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_slow(module: ModuleType) -> None:
            exec_module(module)
            unet = module.UNet2DConditionModel
            unet.forward = slowed(unet.forward)

        spec.loader.exec_module = exec_and_slow  # type: ignore[method-assign]
        return spec


if STEP_FILE:
    sys.meta_path.insert(0, SlowUNetFinder())
