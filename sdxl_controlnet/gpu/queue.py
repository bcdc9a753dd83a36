"""The GPU Service's queue: one generation at a time, in arrival order, and no
request admitted that certainly could not finish within the timeout.

The wait is estimated from the denoising steps queued ahead and what steps of each kind
of work took in recent requests. A step's time grows with the pixels the models denoise
(width × height × images, twice over with classifier-free guidance, which doubles the
batch), but not in proportion: small steps are mostly fixed costs. So the estimate is a
lower bound: a step at least as large as one timed takes at least as long, a smaller one
at least its share of the pixels, and an uncompiled step at least as long as a compiled
one. A request is refused only when even that bound is past the timeout; work never
timed counts for nothing, and a request is always admitted to an idle queue, so the
estimates keep learning whatever an odd request taught them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from .. import metrics
from ..errors import ServiceBusy

# Each kind of work is estimated from its last requests; their median shrugs off an odd one
# (a cold cache, a GPU shared for a moment) and follows a lasting change within a few.
REQUESTS_REMEMBERED = 9


@dataclass(frozen=True)
class Work:
    """What one denoising step asks of the GPU."""

    pixels: int  # width × height × images, doubled by classifier-free guidance
    compiled: bool

    def at_least(self, timed: Work, step_s: float) -> float | None:
        """A lower bound on a step of this work, from a ``timed`` one; None if it says nothing."""
        if self.compiled and not timed.compiled:
            return None  # an uncompiled step is no bound on a compiled one
        return step_s if self.pixels >= timed.pixels else step_s * self.pixels / timed.pixels


@dataclass(eq=False)  # each request is itself: two alike must not be taken for one another
class _Request:
    work: Work
    steps_left: int
    step_s: list[float] = field(default_factory=list)  # each step timed, on the pipeline's thread


class GPUQueue:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._lock = asyncio.Lock()
        self._admitted: list[_Request] = []  # running and waiting
        # Per kind of work, the step time of each of its last requests. Only the event loop
        # reads and writes these; the pipeline's thread only times its own request.
        self._recent: dict[Work, deque[float]] = {}

    @property
    def idle(self) -> bool:
        """No generation is running or waiting."""
        return not self._admitted and not self._lock.locked()

    def step_s_at_least(self, work: Work) -> float:
        """A lower bound on the seconds one step of ``work`` takes; 0 if unknown."""
        bounds = (
            work.at_least(timed, statistics.median_low(recent))
            for timed, recent in self._recent.items()
        )
        return max((bound for bound in bounds if bound is not None), default=0.0)

    def finish_s_at_least(self, work: Work, steps: int) -> float:
        """A lower bound on when a request would finish, if admitted now."""
        queued = [*self._admitted, _Request(work, steps)]
        return sum(r.steps_left * self.step_s_at_least(r.work) for r in queued)

    @contextlib.asynccontextmanager
    async def turn(self, work: Work, steps: int) -> AsyncIterator[Callable[[], None]]:
        """Admit a request of ``steps`` steps of ``work``, wait for its turn on the GPU, and
        time both. Yields the callback to call after each step (from any thread). Raises
        ServiceBusy at once when it could not finish in time."""
        finish_s = self.finish_s_at_least(work, steps)
        if finish_s > self.timeout_s and not self.idle:
            metrics.REFUSED_BUSY.inc()
            raise ServiceBusy(
                f"the GPU Service is busy: this request would finish in {finish_s:.0f} s "
                f"at the earliest, past the {self.timeout_s:.0f} s timeout",
                retry_after_s=math.ceil(finish_s - self.timeout_s),
            )
        request = _Request(work, steps)
        self._admitted.append(request)
        try:
            with metrics.QUEUE_WAIT.time():
                await self._lock.acquire()
            try:
                with metrics.GENERATION.time():
                    yield self._step_timer(request)
            finally:
                self._lock.release()
                self._learn(request)
        finally:
            self._admitted.remove(request)

    def _learn(self, request: _Request) -> None:
        if request.step_s:
            recent = self._recent.setdefault(request.work, deque(maxlen=REQUESTS_REMEMBERED))
            recent.append(statistics.median(request.step_s))

    @staticmethod
    def _step_timer(request: _Request) -> Callable[[], None]:
        """Counts the steps done and times those between two callbacks: the first
        step's start is not seen, and it includes the text encoders."""
        last: list[float] = []

        def step_done() -> None:
            now = time.perf_counter()
            request.steps_left = max(request.steps_left - 1, 0)
            if last:
                request.step_s.append(now - last[0])
                metrics.STEP_SECONDS.set(now - last[0])
            last[:] = [now]

        return step_done
