"""Jobs (``@bentoml.task``) on the front: a running job's progress, and the answers the task
endpoints give for a job that has no result.

Progress lives beside BentoML's task store, in a table of the same SQLite file, which every
front worker of a host shares: the worker that runs a job writes it, whichever worker answers
``/generate_task/status`` reads it. Like the store, it is emptied when the server starts.
"""

from __future__ import annotations

import logging
import sqlite3
import time
import typing as t

import aiosqlite
import bentoml
from starlette.responses import JSONResponse

from .errors import error_response

logger = logging.getLogger("bentoml").getChild(__name__)

PROGRESS_EVERY_S = 0.25  # a write a step at most this often, and the last step always
_SCHEMA = "CREATE TABLE IF NOT EXISTS task_progress (task_id TEXT PRIMARY KEY, step INT, total INT)"
Progress = t.Callable[[int, int], t.Awaitable[None]]  # (step, total) of the denoising
# The task store's own connection: a second one in the same process would hold read
# snapshots that make the store's writes fail at once ("database is locked").
_connection: aiosqlite.Connection | None = None
_ready = False


def attach(connection: aiosqlite.Connection) -> None:
    """Keep progress through ``connection``, the task store's (``bentoml_workarounds``)."""
    global _connection, _ready
    if connection is not _connection:
        _connection, _ready = connection, False


async def _db() -> aiosqlite.Connection:
    global _ready
    if _connection is None:
        raise RuntimeError("no task store attached")
    if not _ready:
        await _connection.execute(_SCHEMA)
        await _connection.commit()
        _ready = True
    return _connection


def current_task_id() -> str | None:
    """The id of the job the current request runs, or None outside a job."""
    try:
        request = bentoml.Context().request
    except LookupError:
        return None
    return getattr(getattr(request, "state", None), "task_id", None)


def progress_recorder() -> Progress | None:
    """Records the current job's denoising steps for ``/status``; None outside a job."""
    task_id = current_task_id()
    if task_id is None:
        return None
    last = 0.0

    async def record(step: int, total: int) -> None:
        nonlocal last
        if step < total and time.monotonic() - last < PROGRESS_EVERY_S:
            return
        last = time.monotonic()
        db = await _db()
        try:
            await db.execute(
                "INSERT OR REPLACE INTO task_progress VALUES (?, ?, ?)", (task_id, step, total)
            )
            await db.commit()
        except sqlite3.OperationalError as exc:  # another process writing: the next step will do
            logger.debug("task %s: progress not recorded: %s", task_id, exc)

    return record


async def progress(task_id: str) -> dict[str, int] | None:
    """``{"step", "total"}`` of a job that has started denoising, else None."""
    db = await _db()
    async with db.execute(
        "SELECT step, total FROM task_progress WHERE task_id = ?", (task_id,)
    ) as rows:
        row = await rows.fetchone()
    return None if row is None else {"step": row[0], "total": row[1]}


async def forget(task_id: str) -> None:
    """Drop a finished job's progress: its status says all there is to say."""
    db = await _db()
    await db.execute("DELETE FROM task_progress WHERE task_id = ?", (task_id,))
    await db.commit()


def no_result(task_id: str, status: str, failure: dict[str, t.Any] | None) -> JSONResponse:
    """``/get`` of a job that has no result: a 409 that says why, in the one error shape;
    a failed job's answer carries the failure, as ``/generate_batch`` would have answered."""
    if status == "canceled":
        message = f"task {task_id} was canceled: it has no result"
    elif status == "failed":
        reason = (failure or {}).get("error", "see the server log")
        message = f"task {task_id} failed: {reason}"
    else:
        message = f"task {task_id} is {status}: its result is not ready; poll /status"
    return error_response(409, message, task_status=status, failure=failure)
