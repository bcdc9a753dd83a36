"""The GPU queue: one generation at a time, timed, and admission refused for what
certainly could not finish within the timeout."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY

from sdxl_controlnet.errors import ServiceBusy
from sdxl_controlnet.gpu.queue import GPUQueue, Work

pytestmark = pytest.mark.anyio

MP = Work(1024 * 1024, compiled=False)


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(f"sdxl_controlnet_{name}") or 0.0


async def generate(queue: GPUQueue, work: Work, steps: int, step_s: float) -> None:
    async with queue.turn(work, steps) as step_done:
        for _ in range(steps):
            await asyncio.sleep(step_s)
            step_done()


async def test_turns_run_one_at_a_time_and_are_timed() -> None:
    queue = GPUQueue(timeout_s=60)
    waits, runs = sample("queue_wait_seconds_sum"), sample("generation_seconds_count")
    # Two at once: the second waits out the first's whole turn.
    await asyncio.gather(generate(queue, MP, 2, 0.1), generate(queue, MP, 2, 0.1))
    assert sample("generation_seconds_count") - runs == 2
    assert sample("queue_wait_seconds_sum") - waits >= 0.2
    assert queue.idle


async def test_a_failed_generation_frees_the_queue() -> None:
    queue = GPUQueue(timeout_s=60)
    with pytest.raises(RuntimeError):
        async with queue.turn(MP, 2) as step_done:
            step_done()
            raise RuntimeError("out of memory")
    assert queue.idle and queue.step_s_at_least(MP) == 0  # one step times nothing


async def test_a_request_that_cannot_finish_in_time_is_refused_at_once() -> None:
    queue = GPUQueue(timeout_s=1)
    await generate(queue, MP, 3, 0.05)  # learns about 0.05 s per 1 MP step
    refused = sample("refused_busy_total")
    first = asyncio.create_task(generate(queue, MP, 12, 0.05))  # ~0.6 s queued
    await asyncio.sleep(0)
    with pytest.raises(ServiceBusy) as busy:
        await generate(queue, MP, 10, 0.05)  # would finish at ~1.1 s, past the 1 s timeout
    assert busy.value.error_code == 503 and busy.value.retry_after_s == 1
    assert "past the 1 s timeout" in busy.value.message
    assert sample("refused_busy_total") - refused == 1
    await generate(queue, MP, 2, 0.05)  # a small one still fits
    await first


async def test_the_first_steps_fixed_costs_are_not_counted() -> None:
    queue = GPUQueue(timeout_s=60)
    async with queue.turn(MP, 4) as step_done:
        await asyncio.sleep(0.5)  # text encoders: before the first step ends
        for _ in range(4):
            await asyncio.sleep(0.05)
            step_done()
    assert queue.step_s_at_least(MP) == pytest.approx(0.05, rel=0.5)


async def test_estimates_are_lower_bounds_across_sizes() -> None:
    queue = GPUQueue(timeout_s=60)
    await generate(queue, MP, 3, 0.1)
    step_s = queue.step_s_at_least(MP)
    # Larger: at least as long. Smaller: at least its share. Never extrapolated upwards,
    # where a small size's fixed costs would make a large one look impossibly slow.
    assert queue.step_s_at_least(Work(4 * MP.pixels, compiled=False)) == step_s
    assert queue.step_s_at_least(Work(MP.pixels // 4, compiled=False)) == pytest.approx(step_s / 4)
    assert queue.finish_s_at_least(MP, 30) == pytest.approx(30 * step_s)


async def test_a_compiled_step_is_bounded_by_compiled_steps_only() -> None:
    queue = GPUQueue(timeout_s=60)
    compiled = Work(MP.pixels, compiled=True)
    await generate(queue, MP, 3, 0.1)
    # An uncompiled step says nothing of a compiled one, which may be much faster...
    assert queue.step_s_at_least(compiled) == 0
    await generate(queue, compiled, 3, 0.02)
    assert queue.step_s_at_least(compiled) == pytest.approx(0.02, rel=0.5)
    # ...but a compiled step is a lower bound on an uncompiled one.
    assert queue.step_s_at_least(MP) == pytest.approx(0.1, rel=0.5)


async def test_one_slow_request_does_not_shut_the_queue() -> None:
    """A request 50 times slower than the rest (a GPU shared for a moment): ordinary
    requests, arriving together behind one another, are all admitted afterwards."""
    queue = GPUQueue(timeout_s=5)
    for _ in range(3):
        await generate(queue, MP, 3, 0.01)
    await generate(queue, MP, 3, 0.5)  # 50 times slower
    refused = sample("refused_busy_total")
    await asyncio.gather(*(generate(queue, MP, 10, 0.01) for _ in range(6)))
    assert sample("refused_busy_total") == refused


async def test_an_idle_queue_admits_whatever_the_estimates_say() -> None:
    """Even the first request being the slow one locks nothing: an idle queue admits the
    next request, which teaches the estimate better."""
    queue = GPUQueue(timeout_s=1)
    await generate(queue, MP, 3, 0.6)  # learns 0.6 s a step: 10 steps look like 6 s
    await generate(queue, MP, 10, 0.01)  # idle: admitted anyway
    await generate(queue, MP, 10, 0.01)
    # Another request's turn: the queue is busy, and the estimate has recovered.
    first = asyncio.create_task(generate(queue, MP, 10, 0.01))
    await asyncio.sleep(0)
    await generate(queue, MP, 10, 0.01)
    await first


async def test_steps_are_learned_when_the_request_ends_not_from_the_pipeline_thread() -> None:
    """The step callback runs on the pipeline's thread: it times only its own request, and
    the estimates the event loop reads change once the request is over."""
    queue = GPUQueue(timeout_s=60)
    async with queue.turn(MP, 4) as step_done:

        def steps() -> None:
            for _ in range(4):
                time.sleep(0.02)
                step_done()

        await asyncio.to_thread(steps)
        assert queue.step_s_at_least(MP) == 0
    assert queue.step_s_at_least(MP) == pytest.approx(0.02, rel=0.5)


async def test_a_waiting_request_that_leaves_takes_only_its_own_place() -> None:
    """Two alike requests wait; one leaves. The other runs, ends and leaves the queue
    without error (alike requests were once taken for one another: list.remove failed)."""
    queue = GPUQueue(timeout_s=60)
    first = asyncio.ensure_future(generate(queue, MP, 3, 0.05))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(generate(queue, MP, 3, 0.01))
    leaving = asyncio.ensure_future(generate(queue, MP, 3, 0.01))
    await asyncio.sleep(0.01)
    leaving.cancel()
    await asyncio.gather(first, second)
    assert leaving.cancelled() and queue.idle
