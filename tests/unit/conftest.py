"""Fixtures of the unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from sdxl_controlnet.front.jobs import JobStore
from sdxl_controlnet.front.stores.redis_store import RedisJobStore
from sdxl_controlnet.front.stores.sqlite_store import SQLiteJobStore


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    """An empty job store, with its outbox, of each engine: the embedded one, and the one
    every replica shares, on the test process's own Redis."""
    if request.param == "sqlite":
        opened: JobStore = SQLiteJobStore(tmp_path / "jobs.db")
    else:
        url = request.getfixturevalue("redis_url")
        with redis.Redis.from_url(url) as client:
            client.flushdb()
        opened = RedisJobStore(url)
    opened.open()
    yield opened
    if isinstance(opened, RedisJobStore):
        await opened.client.aclose()
