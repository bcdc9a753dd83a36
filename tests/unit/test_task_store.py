"""BentoML's local task store keeps its word once patched (bentoml_workarounds.keep_tasks_word):
a canceled task stays canceled, and canceled tasks are dated and purged like finished ones."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from _bentoml_impl.tasks import ResultStatus
from _bentoml_impl.tasks.result import Sqlite3Store
from starlette.requests import Request
from starlette.responses import JSONResponse

from sdxl_controlnet import bentoml_workarounds

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Sqlite3Store]:
    bentoml_workarounds.apply()
    path = str(tmp_path / "task_result.db")
    Sqlite3Store.init_db(path)
    async with Sqlite3Store(path) as store:
        yield store


async def new_task(store: Sqlite3Store) -> str:
    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    return await store.new_entry("generate_task", Request({"type": "http", "headers": []}, receive))


async def test_a_late_result_does_not_overwrite_a_cancel(store: Sqlite3Store) -> None:
    task_id = await new_task(store)
    await store.set_status(task_id, ResultStatus.CANCELED)
    await store.set_result(task_id, JSONResponse({"images": []}), ResultStatus.COMPLETED)
    assert (await store.get_status(task_id)).status is ResultStatus.CANCELED


async def test_a_finished_task_cannot_be_canceled(store: Sqlite3Store) -> None:
    task_id = await new_task(store)
    await store.set_result(task_id, JSONResponse({"images": []}), ResultStatus.COMPLETED)
    await store.set_status(task_id, ResultStatus.CANCELED)
    row = await store.get(task_id)
    assert row.status is ResultStatus.COMPLETED and row.result.body == b'{"images":[]}'


async def test_canceled_and_failed_tasks_are_purged_like_finished_ones(
    store: Sqlite3Store,
) -> None:
    canceled, failed, recent = [await new_task(store) for _ in range(3)]
    await store.set_status(canceled, ResultStatus.CANCELED)
    await store.set_result(failed, JSONResponse({"error": "x"}, 400), ResultStatus.FAILED)
    row = await store.get(canceled)  # dated, so readable: no "not completed"
    assert row.completed_at is not None
    old = datetime.datetime.now(tz=datetime.UTC) - datetime.timedelta(days=2)
    await store._conn.execute(
        "UPDATE result SET completed_at = ? WHERE task_id IN (?, ?)", (old, canceled, failed)
    )
    await store.set_result(recent, JSONResponse({"images": []}), ResultStatus.COMPLETED)
    for purged in (canceled, failed):
        with pytest.raises(KeyError):
            await store.get_status(purged)
    assert (await store.get_status(recent)).status is ResultStatus.COMPLETED
