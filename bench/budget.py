"""A benchmark plan within one time budget: items with estimated costs, run in priority
order, skipped with their reason when they would overrun, abandoned at the deadline."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Overrun(BaseException):
    """The deadline passed. A BaseException: library code that catches every Exception
    (a compiler falling back, say) must not swallow it."""


@contextlib.contextmanager
def deadline_alarm(deadline: float) -> Iterator[None]:
    """Raise Overrun in this thread at ``deadline`` (time.monotonic), whatever runs then."""

    def ring(signum: int, frame: object) -> None:
        raise Overrun

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Item:
    """One thing to do, what it is expected to cost, and what became of it."""

    name: str
    estimate: Callable[[], float]  # asked just before it would run: it can use what ran
    run: Callable[[], None]
    # Why it cannot run (what it needs failed, say), or None.
    blocked: Callable[[], str | None] = lambda: None
    # Where the cost is a guess (a compile): it is tried when this much fits.
    minimum: Callable[[], float] | None = None
    missed: Callable[[str], None] = lambda reason: None  # told why, if it did not run to the end
    listed: bool = True  # housekeeping is not
    status: str = "planned"  # done, skipped, failed or abandoned
    estimate_s: float | None = None
    seconds: float | None = None
    note: str = ""

    def record(self, status: str, note: str) -> None:
        self.status, self.note = status, note
        self.missed(note)
        if self.listed:
            say(f"{self.name}: {status}, {note}")

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("name", "status", "estimate_s", "seconds", "note")}


class Plan:
    """Items in priority order, run one after another until ``deadline`` (time.monotonic)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.items: list[Item] = []

    def add(self, item: Item) -> None:
        self.items.append(item)

    def run(self, after: Callable[[], None] = lambda: None) -> None:
        """Each item in turn; ``after`` is called once each has run or been skipped, so
        that what is done so far is on disk before the next one starts."""
        for item in self.items:
            self._run(item)
            after()

    def _run(self, item: Item) -> None:
        left = self.deadline - time.monotonic()
        reason = item.blocked()
        if reason is None:
            item.estimate_s = item.estimate()
            need = item.minimum() if item.minimum else item.estimate_s
            if need > left:
                at_least = f", at least {need:.0f} s" if item.minimum else ""
                reason = f"needs ≈ {item.estimate_s:.0f} s{at_least}; {max(left, 0):.0f} s left"
        if reason is not None:
            item.record("skipped", reason)
            return
        if item.listed:
            say(f"{item.name} (≈ {item.estimate_s:.0f} s, {left:.0f} s left)")
        began = time.monotonic()
        try:
            with deadline_alarm(self.deadline):
                item.run()
            item.status = "done"
        except Overrun:
            item.record("abandoned", f"at the deadline, after {time.monotonic() - began:.0f} s")
        except Exception as exc:
            item.record("failed", f"{type(exc).__name__}: {exc}"[:300])
        item.seconds = time.monotonic() - began
