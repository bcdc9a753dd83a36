"""The front's readiness answers within its limit whatever the GPU Service does."""

from __future__ import annotations

import asyncio
import time

import pytest

from sdxl_controlnet.front import readiness


class Dependency:
    """What ``bentoml.depends`` gives across processes: a client with ``is_ready``."""

    def __init__(self, answer: object) -> None:
        self.answer = answer

    async def is_ready(self, timeout: float) -> bool:
        if self.answer == "hangs":
            await asyncio.sleep(3600)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.parametrize(
    ("answer", "ready"),
    [
        (True, True),
        (False, False),
        ("hangs", False),  # loading: the connection waits in the socket's queue
        (ConnectionRefusedError(), False),  # down
        (TimeoutError(), False),  # what BentoML's own probe lets escape as a 500
    ],
)
def test_the_gpu_service_is_asked_with_a_short_limit(answer: object, ready: bool) -> None:
    start = time.monotonic()
    assert asyncio.run(readiness.dependency_ready(Dependency(answer), timeout_s=0.2)) is ready
    assert time.monotonic() - start < 1


def test_a_dependency_in_the_same_process_is_ready() -> None:
    assert asyncio.run(readiness.dependency_ready(object()))
