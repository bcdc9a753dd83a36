"""The GPU Service's queue: one generation at a time, in arrival order, and no
request admitted that certainly could not finish within the timeout.

The wait is estimated from the denoising steps queued ahead and the time recent steps
took. A step's time grows with the pixels it denoises (width × height × images), but
not in proportion: small steps are mostly fixed costs. So the estimate is a lower
bound: a step at least as large as one timed takes at least as long, a smaller one at
least its share of the pixels. A request is refused only when even that bound is past
the timeout; a size never timed counts for nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from . import metrics
from .errors import ServiceBusy

# How much each timed step moves the estimate for its size.
LEARNING_RATE = 0.2


@dataclass
class _Request:
    pixels: int  # denoised per step: width × height × images
    steps_left: int


class GPUQueue:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._lock = asyncio.Lock()
        self._admitted: list[_Request] = []  # running and waiting
        self._step_s: dict[int, float] = {}  # seconds per step, by pixels

    @property
    def idle(self) -> bool:
        """No generation is running or waiting."""
        return not self._admitted and not self._lock.locked()

    def step_s_at_least(self, pixels: int) -> float:
        """A lower bound on the seconds one step of ``pixels`` takes; 0 if unknown."""
        return (
            max(
                (step_s if pixels >= timed else step_s * pixels / timed)
                for timed, step_s in self._step_s.items()
            )
            if self._step_s
            else 0.0
        )

    def finish_s_at_least(self, pixels: int, steps: int) -> float:
        """A lower bound on when a request would finish, if admitted now."""
        queued = [*self._admitted, _Request(pixels, steps)]
        return sum(r.steps_left * self.step_s_at_least(r.pixels) for r in queued)

    @contextlib.asynccontextmanager
    async def turn(self, pixels: int, steps: int) -> AsyncIterator[Callable[[], None]]:
        """Admit a request that denoises ``pixels`` in each of ``steps`` steps, wait for
        its turn on the GPU, and time both. Yields the callback to call after each step
        (from any thread). Raises ServiceBusy at once when it could not finish in time."""
        finish_s = self.finish_s_at_least(pixels, steps)
        if finish_s > self.timeout_s:
            metrics.REFUSED_BUSY.inc()
            raise ServiceBusy(
                f"the GPU Service is busy: this request would finish in {finish_s:.0f} s "
                f"at the earliest, past the {self.timeout_s:.0f} s timeout",
                retry_after_s=math.ceil(finish_s - self.timeout_s),
            )
        request = _Request(pixels, steps)
        self._admitted.append(request)
        try:
            with metrics.QUEUE_WAIT.time():
                await self._lock.acquire()
            try:
                with metrics.GENERATION.time():
                    yield self._step_timer(request)
            finally:
                self._lock.release()
        finally:
            self._admitted.remove(request)

    def _step_timer(self, request: _Request) -> Callable[[], None]:
        """Counts the steps done and times those between two callbacks: the first
        step's start is not seen, and it includes the text encoders."""
        last: list[float] = []

        def step_done() -> None:
            now = time.perf_counter()
            request.steps_left = max(request.steps_left - 1, 0)
            if last:
                step_s, old = now - last[0], self._step_s.get(request.pixels)
                metrics.STEP_SECONDS.set(step_s)
                new = step_s if old is None else old + LEARNING_RATE * (step_s - old)
                self._step_s[request.pixels] = new
            last[:] = [now]

        return step_done
