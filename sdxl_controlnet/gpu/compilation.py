"""torch.compile for the UNet, the ControlNet and the VAE's decoder, with one promise:
after the warm-up nothing compiles. On a GPU a compilation holds it for a minute or more
(max-autotune: many) and cannot be canceled, so a call that the warmed graphs do not fit
runs the eager module instead, and says so.

TORCH_COMPILE_SCOPE says how much of the UNet and the ControlNet is compiled: their
transformer blocks (``blocks``, regional compilation: one graph per block shape, reused by
every block of that shape) or each network whole (``whole``). Whatever is compiled is
compiled with ``fullgraph=True``: a graph break, which would split it into pieces with Python
between them, fails its compile at the warm-up, which says so, instead of running slower
than it claims. What torch still counts (graph breaks, CUDA graphs it skipped) is logged
after the warm-up and reported on ``/metrics``."""

from __future__ import annotations

import contextlib
import copy
import functools
import typing as t
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch._dynamo.utils import counters  # torch's own tally; no public API has it (2.13)

from .. import logs, metrics
from ..schemas import GenerationParams
from ..settings import CompileScope
from . import control_skip

logger = logs.logger(__name__)

# What the graphs are specialised on: height, width and the models' batch. Everything
# else a request sets reaches them as tensor values (see below).
GraphKey = tuple[int, int, int]


def graph_key(height: int, width: int, params: GenerationParams) -> GraphKey:
    return (height, width, params.batch)


# The inductor settings of diffusers' speed guide ("Accelerate inference of text-to-image
# diffusion models", its torch.compile section) for SDXL's UNet on a GPU
# (INDUCTOR_SPEED_GUIDE). Coordinate-descent tuning searches Triton kernels' launch
# settings; on the CPU it does nothing.
SPEED_GUIDE = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "epilogue_fusion": False,
}


def compile_options(mode: str, speed_guide: bool) -> dict[str, t.Any]:
    """torch.compile's arguments in ``mode``, with the speed guide's inductor settings on top
    where asked: as ``options``, since torch.compile takes a mode or options, not both."""
    options = {"dynamic": False, "fullgraph": True}
    if not speed_guide:
        return {**options, "mode": mode}
    # What each mode sets, as torch.compile's documentation points to it.
    from torch._inductor import list_mode_options

    return {**options, "options": {**list_mode_options(mode, dynamic=False), **SPEED_GUIDE}}


# The blocks regional compilation compiles: those diffusers declares as the SDXL UNet's
# repeated blocks (its BasicTransformerBlocks). The ControlNet and the Union declare none,
# but are built of the same blocks.
REPEATED_BLOCKS = tuple(UNet2DConditionModel._repeated_blocks)


def compile_module(
    module: torch.nn.Module, scope: CompileScope, **options: t.Any
) -> torch.nn.Module:
    """``module`` for compiled calls, ``torch.compile``'s ``options`` given: compiled whole (an
    OptimizedModule around it), or with each of its repeated blocks compiled in place, as
    diffusers' ``compile_repeated_blocks`` does, and returned as a shallow copy. The copy shares
    every submodule and weight, so it is the same model to diffusers, and a forward wrapped on
    it leaves the module's own calls as they were."""
    if scope == "whole":
        return torch.compile(module, **options)
    blocks = [block for block in module.modules() if type(block).__name__ in REPEATED_BLOCKS]
    if not blocks:
        raise ValueError(f"{type(module).__name__} has no {', '.join(REPEATED_BLOCKS)} to compile")
    for block in blocks:
        block.compile(**options)
    return copy.copy(module)


class CompiledModels:
    """The UNet and ControlNet compiled (the pipeline puts them in place for a compiled
    call), the VAE's decoder compiled in place, and the shapes a warm-up has recorded.

    Dynamo specialises a graph on the value of a Python float, on each tensor's dtype and on
    the keyword arguments given. So the ControlNet scale goes in as a tensor (it changes with
    every request, and within one past the guidance window), the timestep as float32
    (DPM-Solver, DDIM, UniPC and LCM step on int64 timesteps, Euler on float32), the latents
    contiguous (the VAE encodes a start picture's channels last), and arguments given as None
    are left to their default, None (the text-to-image pipeline passes timestep_cond=None,
    the image-to-image and inpainting ones do not). Both modules make the timestep float32
    before using it, so the maths is the same. With regional compilation the scale reaches no
    graph (the ControlNet multiplies its residuals by it outside its blocks): the same
    arguments serve both scopes."""

    def __init__(
        self,
        unet: torch.nn.Module,
        controlnet: torch.nn.Module,
        vae: torch.nn.Module,
        device: str,
        mode: str,
        scope: CompileScope,
        speed_guide: bool = False,
    ) -> None:
        # The mode is for a GPU (CUDA graphs, autotuning); the CPU (tests) runs inductor's default.
        mode = mode if device.startswith("cuda") else "default"
        self.warm_ups = warm_ups(mode)
        self.scope = scope
        options = compile_options(mode, speed_guide)
        self.modules = tuple(compile_module(m, scope, **options) for m in (unet, controlnet))
        # Each compiled forward runs these first: dynamo sees tensors where it would
        # specialise, CUDA graphs see each step's start, and a misfit runs eagerly.
        unet_forward, controlnet_forward = (module.forward for module in self.modules)
        self.modules[0].forward = functools.partial(self._unet, unet_forward)
        self.modules[1].forward = functools.partial(self._controlnet, controlnet_forward)
        # The VAE's decoder, compiled in place: it runs once, after the last step, in every
        # request; its misfits run eagerly like the others'. Whole in either scope: it has
        # no block repeated at one shape (each up block has channels and a size of its own),
        # so its regions would cost as many compiles as the whole, and more graphs to launch.
        decoder = torch.compile(vae.decoder, **options)
        decoder.forward = functools.partial(self._decoder, decoder.forward)
        vae.decoder = decoder
        # The scale's one tensor on the device, refilled for each call: a kernel launch, where
        # torch.tensor(scale, device=cuda) would copy from the host and wait for it.
        self._scale = torch.zeros((), device=device)
        self._step_marked = False
        self.warmed: set[GraphKey] = set()
        # What ran eagerly since the last take_fallbacks(): module name, and why.
        self.fallbacks: dict[str, str] = {}

    def _controlnet(self, compiled: Callable, *args: object, **kwargs: object) -> object:
        if control_skip.adds_nothing(kwargs):
            return control_skip.NOTHING  # the UNet marks this step
        self._mark_step()
        args, kwargs = _as_graph_inputs(args, kwargs)
        if "conditioning_scale" in kwargs:
            kwargs["conditioning_scale"] = self._scale.fill_(float(kwargs["conditioning_scale"]))
        return self._run("controlnet", compiled, args, kwargs)

    def _unet(self, compiled: Callable, *args: object, **kwargs: object) -> object:
        if not self._step_marked:  # a step where the ControlNet did not run
            self._mark_step()
        self._step_marked = False
        return self._run("unet", compiled, *_as_graph_inputs(args, kwargs))

    def _decoder(self, compiled: Callable, *args: object, **kwargs: object) -> object:
        self._mark_step()  # its graph starts a step of its own, whatever ran last
        self._step_marked = False
        latents, *rest = args  # channels last after image-to-image: contiguous, as warmed
        return self._run("vae decoder", compiled, (latents.contiguous(), *rest), kwargs)

    def _mark_step(self) -> None:
        """A new denoising step for CUDA graphs, so that each step replays the recorded graphs
        rather than recording new ones. diffusers marks steps only in its text-to-image
        ControlNet pipelines, not in image-to-image and inpainting; a second mark costs
        nothing. Each step's first compiled call marks it: the ControlNet's, or the UNet's
        where the ControlNet is skipped."""
        torch.compiler.cudagraph_mark_step_begin()
        self._step_marked = True

    def _run(self, name: str, compiled: Callable, args: tuple, kwargs: dict) -> object:
        """The compiled forward, or, where its graphs do not fit a call and dynamo's
        fail_on_recompile stance refuses to compile it, the same forward run eagerly,
        recorded. Eagerly through and through: with regional compilation the module's
        blocks are compiled in place, and a stance of force_eager runs them uncompiled too."""
        try:
            return compiled(*args, **kwargs)
        except RuntimeError as exc:
            if RECOMPILE not in str(exc):
                raise
            self.fallbacks.setdefault(name, _guard_failure(str(exc)))
            with running_eagerly():
                return compiled(*args, **kwargs)

    def take_fallbacks(self) -> dict[str, str]:
        fallbacks, self.fallbacks = self.fallbacks, {}
        return fallbacks


# The modes whose graphs are CUDA graphs.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def warm_ups(mode: str) -> int:
    """Warm-up calls that leave nothing for a request to record: CUDA-graph trees run a
    function eagerly on its first call and record its graph on the second."""
    return 2 if mode in CUDA_GRAPH_MODES else 1


def report_counts() -> dict[str, int]:
    """What torch has counted since the process started: graph breaks (each splits a
    module's graph, with Python between the pieces) and the graphs its CUDA-graph trees
    skipped (they ran without CUDA graphs), on ``/metrics`` and in the log."""
    counts = {
        "graph_breaks": sum(counters["graph_break"].values()),
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
    }
    for kind, count in counts.items():
        metrics.COMPILE_COUNTS.labels(kind).set(count)
    logger.info(
        "torch.compile: %(graph_breaks)d graph breaks, %(cudagraph_skips)d CUDA graphs skipped; "
        "inductor's graph cache: %(hits)d found, %(misses)d compiled",
        {**counts, **cache_counts()},
    )
    return counts


def cache_counts() -> dict[str, int]:
    """Graphs inductor found in its cache (a warm start) and graphs it compiled afresh."""
    return {
        "hits": counters["inductor"]["fxgraph_cache_hit"],
        "misses": counters["inductor"]["fxgraph_cache_miss"],
    }


def load_cache(path: Path) -> int | None:
    """The compile artifacts saved in ``path`` (``save_cache``), put into torch's caches
    before anything compiles, so that compiles find their graphs there; how many entries it
    held. An absent file, or one this torch cannot read, is logged and compiling starts
    cold (None): a stale cache costs a cold start, never the start. Entries that another
    torch or GPU made are loaded but match no graph: the warm-up's log counts them."""
    if not path.is_file():
        logger.info("compile cache %s: absent; compiling cold", path)
        return None
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as exc:  # a damaged file can fail in many ways inside torch
        info, why = None, f"{type(exc).__name__}: {exc}"
    else:
        why = "not artifacts this torch can read"
    if info is None:
        logger.warning("compile cache %s ignored (%s); compiling cold", path, why)
        return None
    entries = sum(len(keys) for keys in info.artifacts.values())
    kinds = ", ".join(f"{len(keys)} {kind}" for kind, keys in sorted(info.artifacts.items()))
    logger.info("compile cache %s: %d entries loaded (%s)", path, entries, kinds)
    return entries


def save_cache(path: Path) -> int | None:
    """Write the compile artifacts this process compiled or found so far into ``path``,
    replaced whole (a reader never sees half a file); how many entries, or None where there
    were none or the file could not be written (logged: the Service runs on without it)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        logger.warning("compile cache %s: nothing compiled to save", path)
        return None
    artifacts, info = saved
    partial = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(artifacts)
        partial.replace(path)
    except OSError as exc:
        logger.warning("compile cache %s not saved: %s", path, exc)
        return None
    entries = sum(len(keys) for keys in info.artifacts.values())
    logger.info("compile cache %s: %d entries saved (%d bytes)", path, entries, len(artifacts))
    return entries


# How dynamo's fail_on_recompile stance says that a call would compile.
RECOMPILE = "Detected recompile when torch.compile stance is 'fail_on_recompile'"


def _guard_failure(message: str) -> str:
    """The first guard that failed, from dynamo's message: why the graphs did not fit."""
    lines = [line.strip(" -") for line in message.splitlines()]
    reasons = [line for line in lines[1:] if line and "guard failure" not in line]
    return reasons[0][:200] if reasons else "no graph fits"


def _as_graph_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    sample, timestep, *rest = args
    kwargs = {name: value for name, value in kwargs.items() if value is not None}
    return (sample.contiguous(), timestep.to(torch.float32), *rest), kwargs


@contextlib.contextmanager
def without_compiling() -> Iterator[None]:
    """Inside, compiled modules run the graphs they have; a call those do not fit (guess
    mode's ControlNet, say) runs the eager module instead of compiling, and is recorded in
    ``CompiledModels.fallbacks``."""
    with torch.compiler.set_stance("fail_on_recompile"):
        yield


@contextlib.contextmanager
def running_eagerly() -> Iterator[None]:
    """Inside, nothing compiled runs compiled: every torch.compile'd function and module,
    blocks compiled in place included, runs its Python code as if never compiled."""
    with torch.compiler.set_stance("force_eager"):
        yield
