"""Fixtures of the unit tests."""

from __future__ import annotations

import typing as t
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

# pytest loads this file before tests/conftest.py's pytest_configure puts the tiny model in
# the environment whenever a path under tests/unit is named on its command line: the
# application is imported in the fixture, so that its settings are read after that.
if t.TYPE_CHECKING:
    from sdxl_controlnet.front.jobs import JobStore


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    """An empty job store, with its outbox, of each engine: the embedded one, and the one
    every replica shares, on the test process's own Redis."""
    from sdxl_controlnet.front.stores.redis_store import RedisJobStore
    from sdxl_controlnet.front.stores.sqlite_store import SQLiteJobStore

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
