"""The job store (sdxl_controlnet/front/jobs.py), one behaviour suite run against both of its
engines: the embedded one (SQLite) and the shared one (a real Redis). A FIFO line with
places, leases that lapse when a worker dies, attempts, bounds, retention."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import time
from pathlib import Path

import pytest
import redis

from devtools.redis_server import running_redis
from sdxl_controlnet.errors import QueueFull, StoreFull
from sdxl_controlnet.front.jobs import Claimed, JobStore, StoreUnavailable
from sdxl_controlnet.front.outbox import Message
from sdxl_controlnet.front.stores import redis_store, sqlite_store
from sdxl_controlnet.front.stores.redis_store import RedisJobStore
from sdxl_controlnet.front.stores.sqlite_store import SQLiteJobStore
from sdxl_controlnet.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def short_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    configure(monkeypatch)


def configure(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    configured = Settings.from_env({"JOB_LEASE_S": "1", **env})
    for engine in (sqlite_store, redis_store):
        monkeypatch.setattr(engine, "settings", configured)


async def claim(store: JobStore, owner: str) -> Claimed | None:
    return (await store.claim(owner))[0]


async def submitted(store: JobStore, *task_ids: str) -> None:
    for task_id in task_ids:
        await store.submit(task_id, json.dumps({"task": task_id}).encode(), f"secret-{task_id}")


async def test_jobs_wait_in_line_and_run_first_in_first_out(store: JobStore) -> None:
    await submitted(store, "a", "b", "c")
    assert [(await store.get(t)).status_body()["queue"] for t in "abc"] == [
        {"position": 1},
        {"position": 2},
        {"position": 3},
    ]
    first = await claim(store, "w1")
    assert first.job.task_id == "a" and first.job.attempt == 1
    assert (first.input, first.secret) == (b'{"task": "a"}', "secret-a")
    assert await claim(store, "w2") is None  # JOB_CONCURRENCY is 1: b waits
    assert (await store.get("b")).status_body()["queue"] == {"position": 1}
    assert await store.end("a", "w1", "completed", {"images": []})
    assert (await claim(store, "w2")).job.task_id == "b"


async def test_concurrency_is_counted_across_every_runner(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, JOB_CONCURRENCY="3")
    await submitted(store, *(f"j{i}" for i in range(10)))
    claims = await asyncio.gather(*(claim(store, f"w{i}") for i in range(8)))
    assert len([c for c in claims if c is not None]) == 3


async def test_a_lapsed_lease_puts_the_job_back_first_then_fails_it_after_the_last_attempt(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, JOB_MAX_ATTEMPTS="2")
    await submitted(store, "a", "b")
    assert (await claim(store, "dies")).job.task_id == "a"
    time.sleep(1.1)  # its worker died: nobody renews the lease
    assert await store.watch("a", "dies", renew=False) == "in_progress"
    again = await claim(store, "w2")
    assert (again.job.task_id, again.job.attempt) == ("a", 2)  # ahead of b
    assert await store.watch("a", "dies", renew=True) is None  # the dead one lost it
    assert not await store.end("a", "dies", "completed")
    time.sleep(1.1)  # and its second worker died too
    claimed, gave_up = await store.claim("w3")
    assert claimed.job.task_id == "b"
    assert [given.job.task_id for given in gave_up] == ["a"]  # for its webhook
    assert gave_up[0].input == b'{"task": "a"}'
    failed = await store.get("a")
    assert failed.status == "failed"
    assert "stopped during each of its 2 runs" in json.loads(failed.outcome)["error"]


async def test_a_renewed_lease_keeps_the_job(store: JobStore) -> None:
    await submitted(store, "a", "b")
    await claim(store, "w1")
    for _ in range(3):
        time.sleep(0.5)
        assert await store.watch("a", "w1", renew=True) == "in_progress"
    assert await claim(store, "w2") is None


async def test_a_job_handed_back_keeps_its_place_and_its_attempts(store: JobStore) -> None:
    await submitted(store, "a", "b")
    await claim(store, "w1")
    assert await store.requeue("a", "w1")
    again = await claim(store, "w2")
    assert (again.job.task_id, again.job.attempt) == ("a", 1)


async def test_a_job_handed_back_after_an_unreachable_gpu_keeps_its_attempt(
    store: JobStore,
) -> None:
    await submitted(store, "a")
    await claim(store, "w1")
    assert await store.requeue("a", "w1", counted=True)
    again = await claim(store, "w2")
    assert (again.job.task_id, again.job.attempt) == ("a", 2)


async def test_cancel_says_what_the_job_was_and_a_canceled_job_never_ends_otherwise(
    store: JobStore,
) -> None:
    await submitted(store, "a", "b")
    await claim(store, "w1")
    job, before = await store.cancel("b")
    assert (job.status, before) == ("canceled", "pending")
    job, before = await store.cancel("a")
    assert (job.status, before) == ("canceled", "in_progress")
    assert await store.watch("a", "w1", renew=True) == "canceled"
    assert not await store.end("a", "w1", "completed", {"images": []})
    assert await store.cancel("nope") == (None, None)


async def test_the_line_and_the_store_are_bounded(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, JOB_QUEUE_MAX="2", JOB_STORE_MAX_BYTES=str(2**20))
    await submitted(store, "a", "b")
    with pytest.raises(QueueFull) as full:
        await submitted(store, "c")
    assert full.value.error_code == 429 and full.value.retry_after_s
    await claim(store, "w1")
    with pytest.raises(StoreFull) as too_much:
        await store.submit("big", b"x" * 2**20, None)
    assert too_much.value.error_code == 507
    assert await store.get("c") is None and await store.get("big") is None


async def test_results_count_toward_the_store_s_bound(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, JOB_STORE_MAX_BYTES=str(2**20))
    await submitted(store, "a")
    await claim(store, "w1")
    await store.end("a", "w1", "completed", {"images": ["x" * 600_000]})
    with pytest.raises(StoreFull):
        await store.submit("b", b"x" * 500_000, None)
    await store.submit("c", b"x" * 100, None)


async def test_the_store_outlives_the_server_and_is_the_server_s_user_s_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch)
    store = SQLiteJobStore(tmp_path / "jobs.db")
    store.open()
    await submitted(store, "a")
    await claim(store, "w1")
    await store.end("a", "w1", "completed", {"images": ["x"]})
    await store.outbox.hold([Message("msg_a", "https://example.com/", b"{}", "key")], "w1", 0)
    reopened = SQLiteJobStore(store.path)
    reopened.open()
    assert json.loads((await reopened.get("a")).outcome) == {"images": ["x"]}
    assert [m.message_id for m in await reopened.outbox.adopt("w2", 60, 1)] == ["msg_a"]
    for private in (store.path, store.outbox.path):
        assert private.stat().st_mode & 0o077 == 0


def test_a_store_of_another_schema_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE job (task_id TEXT PRIMARY KEY, status TEXT)")
        db.execute("INSERT INTO job VALUES ('old', 'in_progress')")
    store = SQLiteJobStore(path)
    store.open()
    assert asyncio.run(store.get("old")) is None


def test_a_store_of_the_previous_schema_keeps_its_jobs_and_counts_their_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, JOB_STORE_MAX_BYTES=str(2**20))
    path = tmp_path / "jobs.db"
    with sqlite3.connect(path) as db:
        db.executescript(sqlite_store._SCHEMA.replace(
            "    outcome_bytes INTEGER NOT NULL DEFAULT 0,\n", ""
        ))  # fmt: skip
        db.execute(
            "INSERT INTO job (task_id, status, created_at, outcome, input) "
            "VALUES ('old', 'completed', ?, ?, x'00')",
            (time.time(), json.dumps({"images": ["x" * 600_000]})),
        )
        db.execute("PRAGMA user_version = 2")
    store = SQLiteJobStore(path)
    store.open()
    assert asyncio.run(store.get("old")).status == "completed"
    with pytest.raises(StoreFull):
        asyncio.run(store.submit("new", b"x" * 500_000, None))


async def test_ended_jobs_are_removed_after_their_retention(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await submitted(store, "old")
    await claim(store, "w1")
    await store.end("old", "w1", "completed", {"images": []})
    for engine in (sqlite_store, redis_store):
        monkeypatch.setattr(engine, "RETENTION_S", 0)
    time.sleep(0.01)
    await submitted(store, "new")
    assert await store.get("old") is None and await store.get("new") is not None


async def test_the_counts_are_the_whole_store_s(store: JobStore) -> None:
    await submitted(store, "a", "b", "c")
    await claim(store, "w1")
    assert await store.counts() == (2, 1)


async def test_a_runner_that_lost_its_job_to_the_line_is_told_so(store: JobStore) -> None:
    await submitted(store, "a")
    await claim(store, "dies")
    time.sleep(1.1)
    await store.claim("w2")  # settles the lapsed lease; w2's own claim takes it again
    assert await store.watch("a", "dies", renew=True) is None


def test_an_unreachable_or_missing_store_stops_the_start_with_what_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(redis_store, "OPEN_WAIT_S", 0.3)
    monkeypatch.setattr(redis_store, "OPEN_RETRY_S", 0.1)
    shown = re.escape("JOB_STORE_URL redis://:***@127.0.0.1:1/0 cannot be reached")
    with pytest.raises(StoreUnavailable, match=shown):
        RedisJobStore("redis://:hunter2@127.0.0.1:1/0").open()
    assert "waiting for JOB_STORE_URL redis://:***@127.0.0.1:1/0 to answer" in caplog.text
    assert "hunter2" not in caplog.text
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreUnavailable, match="JOB_STORE_PATH"):
        SQLiteJobStore(tmp_path / "file" / "jobs.db").open()


def test_a_redis_that_refuses_the_front_stops_the_start_at_once() -> None:
    """A wrong password is no Redis still starting: no wait, and the password not shown."""
    with running_redis() as url:
        with redis.Redis.from_url(url) as client:
            client.config_set("requirepass", "right")
        wrong = url.replace("redis://", "redis://:hunter2@")
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"redis://:\*\*\*@.* refused") as refused:
            RedisJobStore(wrong).open()
        assert time.monotonic() - start < redis_store.OPEN_RETRY_S
        assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@db:6379/0", "redis://:***@db:6379/0"),
        ("rediss://user:s3cret@db:6380/1", "rediss://user:***@db:6380/1"),
        ("redis://db:6379/0?password=s3cret", "redis://db:6379/0"),
        ("unix:///run/redis.sock?db=0&password=s3cret", "unix:///run/redis.sock"),
    ],
)
def test_a_store_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert redis_store.redacted(url) == shown
