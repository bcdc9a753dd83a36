"""The GPU Service's queue: one generation at a time, in arrival order, and no
request admitted that could not finish within the timeout.

The wait is estimated from the denoising steps already queued and the time recent
steps took per megapixel. Steps dominate a generation's time on a GPU; timing them,
rather than whole requests, keeps the fixed costs of small requests (text encoders,
VAE) from inflating the estimate for large ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable

from . import metrics
from .errors import ServiceBusy

# How much each timed step moves the estimate of seconds per megapixel-step.
LEARNING_RATE = 0.2


def work_units(width: int, height: int, steps: int, images: int) -> float:
    """Megapixel-steps: what a generation's time grows with."""
    return width * height * steps * images / 1e6


class GPUQueue:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._lock = asyncio.Lock()
        self._queued_units = 0.0  # admitted and not finished, the running one included
        self._seconds_per_unit: float | None = None  # unknown until two steps have run

    @property
    def idle(self) -> bool:
        """No generation is running or waiting."""
        return self._queued_units == 0 and not self._lock.locked()

    def expected_finish_s(self, units: float) -> float | None:
        """Seconds until a request of ``units`` would finish, if admitted now."""
        if self._seconds_per_unit is None:
            return None
        return (self._queued_units + units) * self._seconds_per_unit

    @contextlib.asynccontextmanager
    async def turn(self, units: float, steps: int) -> AsyncIterator[Callable[[], None]]:
        """Admit a request of ``units`` in ``steps`` steps, wait for its turn on the GPU,
        and time both. Yields the callback to call after each step (from any thread).

        Raises ServiceBusy at once when the request could not finish within the timeout.
        """
        finish_s = self.expected_finish_s(units)
        if finish_s is not None and finish_s > self.timeout_s:
            metrics.REFUSED_BUSY.inc()
            raise ServiceBusy(
                f"the GPU Service is busy: this request would finish in about {finish_s:.0f} s, "
                f"past the {self.timeout_s:.0f} s timeout",
                retry_after_s=math.ceil(finish_s - self.timeout_s),
            )
        self._queued_units += units
        try:
            with metrics.QUEUE_WAIT.time():
                await self._lock.acquire()
            try:
                with metrics.GENERATION.time():
                    yield self._step_timer(units / steps)
            finally:
                self._lock.release()
        finally:
            self._queued_units -= units

    def _step_timer(self, units_per_step: float) -> Callable[[], None]:
        """Learns from the time between consecutive steps; the first step's start is
        not seen, and includes the text encoders, so it is not counted."""
        last: list[float] = []

        def step_done() -> None:
            now = time.perf_counter()
            if last:
                rate = (now - last[0]) / units_per_step
                old = self._seconds_per_unit
                self._seconds_per_unit = rate if old is None else old + LEARNING_RATE * (rate - old)
            last[:] = [now]

        return step_done
