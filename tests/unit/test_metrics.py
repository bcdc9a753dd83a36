"""The application's metrics: what a generation and the queue in front of it record."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from sdxl_controlnet import metrics


def snapshot() -> dict[str, float]:
    names = (
        "queue_wait_seconds_count",
        "queue_wait_seconds_sum",
        "generation_seconds_count",
        "generation_seconds_sum",
        "images_generated_total",
    )
    return {name: REGISTRY.get_sample_value(f"sdxl_controlnet_{name}") or 0.0 for name in names}


def growth(before: dict[str, float]) -> dict[str, float]:
    return {name: value - before[name] for name, value in snapshot().items()}


@pytest.mark.anyio
async def test_gpu_turn_times_the_queue_and_the_generation() -> None:
    lock = asyncio.Lock()
    before = snapshot()

    async def generate() -> None:
        async with metrics.gpu_turn(lock):
            await asyncio.sleep(0.2)

    # Two at once: the second waits out the first's whole turn.
    await asyncio.gather(generate(), generate())

    grew = growth(before)
    assert grew["queue_wait_seconds_count"] == grew["generation_seconds_count"] == 2
    assert grew["generation_seconds_sum"] >= 0.4
    assert grew["queue_wait_seconds_sum"] >= 0.2
    assert not lock.locked()


@pytest.mark.anyio
async def test_gpu_turn_releases_the_gpu_when_generation_fails() -> None:
    lock = asyncio.Lock()
    with pytest.raises(RuntimeError):
        async with metrics.gpu_turn(lock):
            raise RuntimeError("out of memory")
    assert not lock.locked()


def test_images_generated_counts_images() -> None:
    before = snapshot()
    metrics.IMAGES_GENERATED.inc(3)
    assert growth(before)["images_generated_total"] == 3
