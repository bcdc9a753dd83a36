"""Per-worker budgets for the front's own work, so that no burst of requests can take a
worker's memory or connections: each request holds its cost while it works, and one that
would pass the budget is a 503 with ``Retry-After`` at once, before any of the work."""

from __future__ import annotations

import contextlib
import typing as t
from collections.abc import Callable, Iterator

from starlette.requests import Request

from ..errors import ServiceBusy
from ..middleware import RETRY_AFTER
from ..settings import settings

# How soon a refused request may try again: the work it waited for takes about that long.
BUSY_RETRY_AFTER_S = 1


class Budget:
    """``capacity()`` units of one kind of work in one worker (one event loop: no lock).
    A request that alone costs more than the whole budget runs when nothing else does."""

    def __init__(self, capacity: Callable[[], int], busy: str) -> None:
        self.capacity = capacity
        self.busy = busy  # what a refused client reads
        self.in_use = 0

    @contextlib.contextmanager
    def held(self, cost: int, request: Request | None = None) -> Iterator[None]:
        """Hold ``cost`` units while the block runs, or refuse the request at once;
        ``request`` where BentoML builds the answer (while it reads the request)."""
        if self.in_use and self.in_use + cost > self.capacity():
            if request is not None:  # read before BentoML's handler, which sets the header
                request.scope[RETRY_AFTER] = BUSY_RETRY_AFTER_S
            raise ServiceBusy(
                f"{self.busy}; retry in {BUSY_RETRY_AFTER_S} s", retry_after_s=BUSY_RETRY_AFTER_S
            )
        self.in_use += cost
        try:
            yield
        finally:
            self.in_use -= cost


# Image URLs fetched at once.
FETCHES = Budget(
    lambda: settings.max_concurrent_fetches,
    "image URLs: this server is fetching all the pictures it can at once",
)
# Pixels of the pictures being decoded and fitted at once, by their headers: about 12 bytes
# of memory each while they are (the decoded picture, its gray or RGB copy, the output).
DECODING = Budget(
    lambda: settings.max_decoding_pixels,
    "pictures: this server is decoding all the pixels it can at once",
)


def pixels(*pictures: t.Any) -> int:
    """What decoding ``pictures`` (opened, header read; None where absent) costs."""
    return sum(p.width * p.height for p in pictures if p is not None)
