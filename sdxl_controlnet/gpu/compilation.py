"""torch.compile for the UNet and ControlNet, with one promise: after the warm-up nothing
compiles. On a GPU a compilation (max-autotune) holds it for minutes and cannot be
cancelled, so a call that the warmed graphs do not fit runs the eager module instead."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..schemas import GenerationParams

# What the graphs are specialised on: height, width and the models' batch. Everything
# else a request sets reaches them as tensor values (see below).
GraphKey = tuple[int, int, int]


def graph_key(height: int, width: int, params: GenerationParams) -> GraphKey:
    return (height, width, params.batch)


def _as_graph_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Dynamo specialises a graph on the value of a Python float, on each tensor's dtype and
    on the keyword arguments given. So the ControlNet scale goes in as a tensor (it changes
    with every request, and within one past the guidance window), the timestep as float32
    (DPM-Solver, DDIM, UniPC and LCM step on int64 timesteps, Euler on float32), the latents
    contiguous (the VAE encodes a start picture's channels last), and arguments given as
    None are left to their default, None (the text-to-image pipeline passes
    timestep_cond=None, the image-to-image and inpainting ones do not). Both modules make the
    timestep float32 before using it, so the maths is the same."""
    sample, timestep, *rest = args
    kwargs = {name: value for name, value in kwargs.items() if value is not None}
    if "conditioning_scale" in kwargs:
        scale = float(kwargs["conditioning_scale"])
        kwargs["conditioning_scale"] = torch.tensor(scale, device=sample.device)
    return (sample.contiguous(), timestep.to(torch.float32), *rest), kwargs


class CompiledModels:
    """The UNet and ControlNet compiled, and the shapes a warm-up has recorded them at."""

    def __init__(self, unet: torch.nn.Module, controlnet: torch.nn.Module, device: str) -> None:
        # CUDA graphs on a GPU; on the CPU (tests) inductor's default is the useful mode.
        mode = "max-autotune" if device.startswith("cuda") else None
        self.modules = tuple(
            torch.compile(module, mode=mode, dynamic=False) for module in (unet, controlnet)
        )
        for module in self.modules:
            module.register_forward_pre_hook(_as_graph_inputs, with_kwargs=True)
        self.warmed: set[GraphKey] = set()


@contextlib.contextmanager
def without_compiling() -> Iterator[None]:
    """Inside, compiled modules run the graphs they have; whatever those do not fit (guess
    mode's ControlNet, say) runs eagerly instead of being compiled (dynamo's
    ``eager_on_recompile`` stance)."""
    with torch.compiler.set_stance("eager_on_recompile"):
        yield
