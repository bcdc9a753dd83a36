"""Jobs (``@bentoml.task``): each job's status, progress, cancel and outcome, in the
application's own store.

BentoML runs a job's body with the job's id on the request state
(``bentoml.Context().request.state.task_id``); keyed by it, the body records here when it
starts, each step, and how it ended (its result, or its failure), and watches here for a
cancel. The task endpoints (``job_endpoints.py``) answer from here too. The store is an
SQLite file of the application's own, shared by the front workers of a host: the worker that
runs a job may not be the one that answers its ``/status`` or ``/cancel``.

A job's status moves once, from ``in_progress`` to ``completed``, ``failed`` or
``canceled``, in one SQL statement that checks the status it leaves: a cancel and a
finishing body cannot both win, so a cancel that answered ``canceled`` is never followed
by a result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
import typing as t
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import bentoml
from pydantic import BaseModel

from .. import logs
from ..errors import ClientError, JobCanceled
from ..streaming import Progress

logger = logs.logger(__name__)

T = t.TypeVar("T", bound=BaseModel)

# BentoML's words for a task's status (``_bentoml_impl.tasks.ResultStatus``).
IN_PROGRESS, COMPLETED, FAILED, CANCELED = "in_progress", "completed", "failed", "canceled"
# How often a running job looks for a cancel, and writes its step at most.
WATCH_S = 0.25
# A finished job is kept as long as BentoML's local task store keeps a result (24 h).
RETENTION_S = 24 * 3600
# Writers from every front worker queue on SQLite's lock for up to this long.
BUSY_TIMEOUT_S = 5.0
# What a failure other than a client's error is reported as; the log says more.
SERVER_FAILURE = {"status": 500, "error": "the task failed on the server; see its log"}

_SCHEMA = """CREATE TABLE IF NOT EXISTS job (
    task_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    step INTEGER,
    total INTEGER,
    created_at REAL NOT NULL,
    executed_at REAL,
    completed_at REAL,
    outcome TEXT,
    preview_step INTEGER,
    preview TEXT,
    webhook TEXT
)"""
_COLUMNS = (
    "task_id, status, step, total, created_at, executed_at, completed_at, outcome, "
    "preview_step, preview, webhook"
)


def _iso(moment: float | None) -> str | None:
    return None if moment is None else datetime.fromtimestamp(moment, tz=UTC).isoformat()


@dataclass(frozen=True)
class Job:
    task_id: str
    status: str
    step: int | None
    total: int | None
    created_at: float
    executed_at: float | None
    completed_at: float | None
    outcome: str | None  # JSON: a completed job's result, or a failed one's failure
    preview_step: int | None = None
    preview: str | None = None  # the latest preview: a WebP, base64-encoded
    webhook: str | None = None  # the state of its webhook's delivery (webhooks.py)

    def status_body(self) -> dict[str, t.Any]:
        """What ``/status`` answers: BentoML's fields, and a running job's ``progress`` and
        latest ``preview`` (``params.preview_every``)."""
        body: dict[str, t.Any] = {
            "task_id": self.task_id,
            "status": self.status,
            "created_at": _iso(self.created_at),
            "executed_at": _iso(self.executed_at),
            "completed_at": _iso(self.completed_at),
        }
        if self.status == IN_PROGRESS and self.total is not None:
            body["progress"] = {"step": self.step or 0, "total": self.total}
        if self.status == IN_PROGRESS and self.preview is not None:
            body["preview"] = {"step": self.preview_step, "image": self.preview}
        if self.webhook is not None:
            body["webhook"] = {"state": self.webhook}
        return body


def default_path() -> Path:
    """Beside BentoML's own task store, in ``$BENTOML_HOME``."""
    home = os.environ.get("BENTOML_HOME") or "~/bentoml"
    return Path(home).expanduser() / "sdxl_controlnet_jobs.db"


class JobStore:
    """The jobs of this host. Each call opens its own connection on a worker thread and
    runs one statement, in autocommit: SQLite connections are cheap, none is shared between
    coroutines or threads, and no lock or snapshot is held from one statement to the next."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def reset(self) -> None:
        """Start empty, as BentoML's task store does when the server starts."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        self.path.touch(mode=0o600)  # for the server's user only, as SQLite's own files after it
        with self._connection() as db:
            db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            db.execute(_SCHEMA)
            yield db
        finally:
            db.close()

    async def _write(self, sql: str, *args: t.Any) -> int:
        def write() -> int:
            with self._connection() as db:
                return db.execute(sql, args).rowcount

        return await asyncio.to_thread(write)

    async def get(self, task_id: str) -> Job | None:
        def read() -> Job | None:
            with self._connection() as db:
                sql = f"SELECT {_COLUMNS} FROM job WHERE task_id = ?"
                row = db.execute(sql, (task_id,)).fetchone()
            return None if row is None else Job(*row)

        return await asyncio.to_thread(read)

    async def submitted(self, task_id: str) -> None:
        await self._write(
            "INSERT INTO job (task_id, status, created_at) VALUES (?, ?, ?) "
            "ON CONFLICT (task_id) DO NOTHING",
            task_id,
            IN_PROGRESS,
            time.time(),
        )

    async def start(self, task_id: str) -> Job:
        """The job as its body starts it; one canceled before it started stays so."""
        now = time.time()
        await self.submitted(task_id)  # where no front recorded it (BentoCloud's queue)
        await self._write("UPDATE job SET executed_at = ? WHERE task_id = ?", now, task_id)
        job = await self.get(task_id)
        assert job is not None, "inserted above"
        return job

    async def record_step(self, task_id: str, step: int, total: int) -> None:
        await self._write(
            "UPDATE job SET step = ?, total = ? WHERE task_id = ? AND status = ?",
            step,
            total,
            task_id,
            IN_PROGRESS,
        )

    async def record_preview(self, task_id: str, step: int, image: str) -> None:
        """Keep the latest preview only: a job's row never grows with its steps."""
        await self._write(
            "UPDATE job SET preview_step = ?, preview = ? WHERE task_id = ? AND status = ?",
            step,
            image,
            task_id,
            IN_PROGRESS,
        )

    async def record_webhook(self, task_id: str, state: str) -> None:
        await self._write("UPDATE job SET webhook = ? WHERE task_id = ?", state, task_id)

    async def end(self, task_id: str, status: str, outcome: t.Any = None) -> bool:
        """Move a job in progress to ``status`` with its ``outcome`` (JSON-able); False if
        it had already ended: canceled."""
        now = time.time()
        # An ended job's status shows no preview: its row lets go of the last one.
        moved = await self._write(
            "UPDATE job SET status = ?, completed_at = ?, outcome = ?, preview = NULL "
            "WHERE task_id = ? AND status = ?",
            status,
            now,
            None if outcome is None else json.dumps(outcome, separators=(",", ":")),
            task_id,
            IN_PROGRESS,
        )
        await self._write("DELETE FROM job WHERE completed_at < ?", now - RETENTION_S)
        return moved == 1

    async def cancel(self, task_id: str) -> Job | None:
        """Cancel a job in progress. The job as it is afterwards, canceled or ended as it
        had; None for a job this store does not know."""
        await self.end(task_id, CANCELED)
        return await self.get(task_id)


def current_task_id() -> str | None:
    """The id of the job the current request runs, or None outside a job."""
    try:
        request = bentoml.Context().request
    except LookupError:
        return None
    return getattr(getattr(request, "state", None), "task_id", None)


@dataclass(frozen=True)
class Outcome:
    """How a job ended, for its webhook."""

    job: Job
    result: t.Any = None  # what /get answers, for a completed job
    failure: dict[str, t.Any] | None = None  # the status and error body, for a failed one


async def run(
    store: JobStore,
    task_id: str | None,
    work: Callable[[Progress | None], Awaitable[T]],
    on_end: Callable[[Outcome], Awaitable[None]] | None = None,
) -> T:
    """Run job ``task_id``'s ``work`` (given where to report its steps), stopping it when
    the job is canceled; ``on_end`` hears how it ended. A canceled job raises
    ``JobCanceled``. Outside a job (``task_id`` None, an in-process call) it just works."""
    if task_id is None:
        return await work(None)
    job = await store.start(task_id)
    last_write = 0.0

    async def progress(kind: str, event: dict[str, t.Any]) -> None:
        nonlocal last_write
        if kind == "preview":  # at most one every preview_every steps: each is kept
            await store.record_preview(task_id, event["step"], event["image"])
            return
        if event["step"] < event["total"] and time.monotonic() - last_write < WATCH_S:
            return
        last_write = time.monotonic()
        await store.record_step(task_id, event["step"], event["total"])

    async def ended(status: str, result: BaseModel | None = None, failure: t.Any = None) -> None:
        outcome = result.model_dump(mode="json") if result is not None else failure
        if not await store.end(task_id, status, outcome) and status != CANCELED:
            status = CANCELED  # canceled meanwhile: a cancel that answered holds
        if on_end is not None:
            final = await store.get(task_id) or job
            await on_end(Outcome(final, result if status == COMPLETED else None, failure))
        if status == CANCELED:
            raise JobCanceled(f"task {task_id} was canceled: it has no result")

    if job.status == CANCELED:
        await ended(CANCELED)
    running = asyncio.ensure_future(work(progress))
    try:
        while not (await asyncio.wait({running}, timeout=WATCH_S))[0]:
            if (await store.get(task_id) or job).status == CANCELED:
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running
                logger.info("job %s canceled: its generation stopped", task_id)
                await ended(CANCELED)
        result = running.result()
    except ClientError as exc:
        if isinstance(exc, JobCanceled):
            raise
        await ended(FAILED, failure=exc.body_with_status())
        raise
    except Exception:
        logger.exception("job %s failed", task_id)
        await ended(FAILED, failure=SERVER_FAILURE)
        raise
    finally:
        running.cancel()
    await ended(COMPLETED, result=result)
    return result
