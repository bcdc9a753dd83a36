"""The GPU queue: one generation at a time, timed, and admission refused for what
could not finish within the timeout."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from sdxl_controlnet.errors import ServiceBusy
from sdxl_controlnet.gpu_queue import GPUQueue, work_units

pytestmark = pytest.mark.anyio


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(f"sdxl_controlnet_{name}") or 0.0


async def generate(queue: GPUQueue, units: float, seconds: float, steps: int = 2) -> None:
    """A generation of ``units`` in ``steps`` steps taking ``seconds`` in all."""
    async with queue.turn(units, steps) as step_done:
        for _ in range(steps):
            await asyncio.sleep(seconds / steps)
            step_done()


async def test_turns_run_one_at_a_time_and_are_timed() -> None:
    queue = GPUQueue(timeout_s=60)
    waits, runs = sample("queue_wait_seconds_sum"), sample("generation_seconds_count")
    # Two at once: the second waits out the first's whole turn.
    await asyncio.gather(generate(queue, 1, 0.2), generate(queue, 1, 0.2))
    assert sample("generation_seconds_count") - runs == 2
    assert sample("queue_wait_seconds_sum") - waits >= 0.2
    assert queue.idle


async def test_a_failed_generation_frees_the_queue() -> None:
    queue = GPUQueue(timeout_s=60)
    with pytest.raises(RuntimeError):
        async with queue.turn(1, 2) as step_done:
            step_done()
            raise RuntimeError("out of memory")
    assert queue.idle and queue.expected_finish_s(1) is None  # one step teaches nothing


async def test_a_request_that_cannot_finish_in_time_is_refused_at_once() -> None:
    queue = GPUQueue(timeout_s=1)
    await generate(queue, 1, 0.1)  # learns about 0.1 s per unit from its second step
    refused = sample("refused_busy_total")
    first = asyncio.create_task(generate(queue, 6, 0.6))  # ~0.6 s of queued work
    await asyncio.sleep(0)
    with pytest.raises(ServiceBusy) as busy:
        await generate(queue, 5, 0.5)  # would finish at ~1.1 s, past the 1 s timeout
    assert busy.value.error_code == 503 and busy.value.retry_after_s == 1
    assert "past the 1 s timeout" in busy.value.message
    assert sample("refused_busy_total") - refused == 1
    await generate(queue, 1, 0.1)  # a small one still fits
    await first


def test_work_grows_with_pixels_steps_and_images() -> None:
    assert work_units(1024, 1024, 30, 1) == pytest.approx(31.46, rel=1e-3)
    assert work_units(1024, 1024, 30, 4) == 4 * work_units(1024, 1024, 30, 1)


async def test_steps_teach_the_rate_without_the_first_steps_fixed_costs() -> None:
    queue = GPUQueue(timeout_s=60)
    async with queue.turn(4, 4) as step_done:
        await asyncio.sleep(0.5)  # text encoders: before the first step ends
        for _ in range(4):
            await asyncio.sleep(0.05)
            step_done()
    assert queue.expected_finish_s(1) == pytest.approx(0.05, rel=0.5)
