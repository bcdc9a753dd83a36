"""The CPU kept at most one denoising step ahead of the GPU.

On CUDA the pipeline's Python only queues work: nothing in diffusers' loop waits for the
GPU until the end, and with CUDA graphs every step of a request is queued within tens of
milliseconds. The step callback is the clock of progress, previews, cancellation and the
step time that admission estimates from (``queue.py``): it must tick as the GPU works. So
each step's end records a CUDA event and waits for the previous step's: the GPU always has
the next step queued (it never idles for the CPU), and a callback runs at most one step
before the GPU finishes that step. On the CPU the work is done when the call returns.
"""

from __future__ import annotations

import typing as t
from collections.abc import Callable

import torch


class Event(t.Protocol):
    def record(self) -> None: ...
    def synchronize(self) -> None: ...


class StepPacer:
    """One per generation: ``step_done()`` at the end of each step."""

    def __init__(self, device: str, new_event: Callable[[], Event] = torch.cuda.Event) -> None:
        self.new_event = new_event if device.startswith("cuda") else None
        self.previous: Event | None = None

    def step_done(self) -> None:
        """Mark the step just queued, and wait until the GPU has finished the one before."""
        if self.new_event is None:
            return
        event = self.new_event()
        event.record()
        if self.previous is not None:
            self.previous.synchronize()
        self.previous = event
