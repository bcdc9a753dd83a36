"""The job runner's own bookkeeping (sdxl_controlnet/front/job_runner.py); its work with a
store and the GPU Service is served in tests/e2e (jobs, queue, durability, replicas)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sdxl_controlnet.front.job_runner import JobRunner
from sdxl_controlnet.front.stores.sqlite_store import SQLiteJobStore

pytestmark = pytest.mark.anyio


async def test_the_end_of_a_job_s_earlier_run_leaves_its_later_run_held(tmp_path: Path) -> None:
    """A job put back in line by a busy GPU can be claimed again while its first run waits
    out its backoff: that run's end must not drop the second from the runs a graceful stop
    hands back."""
    runner = JobRunner(SQLiteJobStore(tmp_path / "jobs.db"), None, None)
    earlier = asyncio.create_task(asyncio.sleep(0))
    later = asyncio.create_task(asyncio.sleep(60))
    runner.running["job"] = later
    await earlier
    runner._done("job", earlier)
    assert runner.running == {"job": later} and runner.wake.is_set()
    later.cancel()
    runner._done("job", later)
    assert runner.running == {}
