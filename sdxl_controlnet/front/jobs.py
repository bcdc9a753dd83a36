"""Jobs (``/generate_task/…``) as data: each job is stored once, with the input it needs to
run again, and moves through the store's queue; no job belongs to the process that
accepted it.

- ``submit`` stores a job ``pending``, behind the jobs before it (first in, first out), or
  refuses it: ``QueueFull`` past ``JOB_QUEUE_MAX`` waiting jobs, ``StoreFull`` past
  ``JOB_STORE_MAX_BYTES`` of inputs.
- A runner (``job_runner.py``, in every front worker) ``claim``s the oldest waiting job when
  fewer than ``JOB_CONCURRENCY`` run, across every worker sharing the store. The claim is a
  lease of ``JOB_LEASE_S``, which the runner renews while it works (``watch``). A lease that
  lapses (its worker died) puts the job back at the head of the line, or fails it once it
  has run ``JOB_MAX_ATTEMPTS`` times; a worker that stops gracefully hands its jobs back.
- A job's status moves from ``pending`` or ``in_progress`` to ``completed``, ``failed`` or
  ``canceled`` once, in one statement that checks the status it leaves: a cancel and a
  finishing run cannot both win.
- Ended jobs are kept ``RETENTION_S``, then removed with their input and secret.

``JobStore`` is the interface the endpoints and the runner use; ``SQLiteJobStore`` is the
embedded one-host store: one file (0600: it holds the jobs' webhook secrets), shared by
the front workers of a host, and kept across restarts.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import os
import sqlite3
import time
import typing as t
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..errors import QueueFull, StoreFull
from ..settings import settings

# BentoML's words for a task's status (``_bentoml_impl.tasks.ResultStatus``), which its
# clients parse.
PENDING, IN_PROGRESS = "pending", "in_progress"
COMPLETED, FAILED, CANCELED = "completed", "failed", "canceled"
ENDED = (COMPLETED, FAILED, CANCELED)
# A finished job is kept as long as BentoML's local task store keeps a result (24 h).
RETENTION_S = 24 * 3600
# Writers from every front worker queue on SQLite's lock for up to this long.
BUSY_TIMEOUT_S = 5.0
# When a refused submit may try again: about the time a job takes to leave the line.
QUEUE_RETRY_AFTER_S = 5
# What a failure other than a client's error is reported as; the log says more.
SERVER_FAILURE = {"status": 500, "error": "the task failed on the server; see its log"}


def _iso(moment: float | None) -> str | None:
    return None if moment is None else datetime.fromtimestamp(moment, tz=UTC).isoformat()


@dataclass(frozen=True)
class Job:
    task_id: str
    status: str
    created_at: float
    executed_at: float | None = None
    completed_at: float | None = None
    attempt: int = 0  # runs started, this one included
    position: int | None = None  # a pending job's place in line, from 1
    step: int | None = None
    total: int | None = None
    preview_step: int | None = None
    preview: str | None = None  # the latest preview: a WebP, base64-encoded
    outcome: str | None = None  # JSON: a completed job's result, or a failed one's failure
    webhook: str | None = None  # the state of its webhook's delivery (webhooks.py)

    def status_body(self) -> dict[str, t.Any]:
        """What ``/status`` answers: BentoML's fields, a waiting job's place in line, a
        running job's ``progress`` and latest ``preview``, and how its webhook fared."""
        body: dict[str, t.Any] = {
            "task_id": self.task_id,
            "status": self.status,
            "created_at": _iso(self.created_at),
            "executed_at": _iso(self.executed_at),
            "completed_at": _iso(self.completed_at),
        }
        if self.attempt:
            body["attempt"] = self.attempt
        if self.status == PENDING and self.position is not None:
            body["queue"] = {"position": self.position}
        if self.status == IN_PROGRESS and self.total is not None:
            body["progress"] = {"step": self.step or 0, "total": self.total}
        if self.status == IN_PROGRESS and self.preview is not None:
            body["preview"] = {"step": self.preview_step, "image": self.preview}
        if self.webhook is not None:
            body["webhook"] = {"state": self.webhook}
        return body


@dataclass(frozen=True)
class Claimed:
    """A job a runner holds the lease of: what it needs to run it."""

    job: Job
    input: bytes  # job_input.encode's bytes
    secret: str | None  # the job's own webhook secret


class JobStore(abc.ABC):
    """Where jobs live: what the endpoints and the runners of every worker share."""

    @abc.abstractmethod
    async def submit(self, task_id: str, input: bytes, secret: str | None) -> Job:
        """Store a new job, waiting; raises ``QueueFull`` or ``StoreFull``."""

    @abc.abstractmethod
    async def get(self, task_id: str) -> Job | None: ...

    @abc.abstractmethod
    async def source(self, task_id: str) -> Claimed | None:
        """A job with its input and secret (for ``/retry``)."""

    @abc.abstractmethod
    async def claim(self, owner: str) -> tuple[Claimed | None, list[Claimed]]:
        """The oldest waiting job, leased to ``owner``, if fewer than ``JOB_CONCURRENCY``
        jobs run; and the jobs failed as lapsed leases were settled first (their last
        attempt's worker died), for their webhooks."""

    @abc.abstractmethod
    async def watch(self, task_id: str, owner: str, renew: bool) -> str | None:
        """The job's status, its lease renewed if ``renew``; None once ``owner`` has lost
        it (it lapsed, and the job went to another runner)."""

    @abc.abstractmethod
    async def record_step(self, task_id: str, step: int, total: int) -> None: ...

    @abc.abstractmethod
    async def record_preview(self, task_id: str, step: int, image: str) -> None: ...

    @abc.abstractmethod
    async def record_webhook(self, task_id: str, state: str) -> None: ...

    @abc.abstractmethod
    async def end(self, task_id: str, owner: str, status: str, outcome: t.Any = None) -> bool:
        """Move ``owner``'s running job to ``status``; False if it was no longer running
        (canceled, or taken over)."""

    @abc.abstractmethod
    async def requeue(self, task_id: str, owner: str, counted: bool = False) -> bool:
        """Put ``owner``'s running job back at the head of the line, this run not counted
        (the GPU was busy, or the worker is stopping), or ``counted`` among its attempts
        (the GPU Service could not be reached: it may be what the job does to it)."""

    @abc.abstractmethod
    async def cancel(self, task_id: str) -> tuple[Job | None, str | None]:
        """Cancel a waiting or running job: the job as it is afterwards and the status it
        had before (None, None for a job the store does not know)."""


_SCHEMA_VERSION = 2  # PRAGMA user_version: a store of another version starts empty
_SCHEMA = """CREATE TABLE IF NOT EXISTS job (
    task_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    executed_at REAL,
    completed_at REAL,
    attempt INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    lease_until REAL,
    step INTEGER,
    total INTEGER,
    preview_step INTEGER,
    preview TEXT,
    outcome TEXT,
    webhook TEXT,
    input BLOB NOT NULL,
    secret TEXT
);
CREATE INDEX IF NOT EXISTS job_line ON job (status, created_at);
"""
# Job's fields, as the columns that hold them; a pending job's position is counted.
_JOB = (
    "task_id, status, created_at, executed_at, completed_at, attempt, "
    "CASE WHEN status = 'pending' THEN (SELECT count(*) FROM job AS ahead WHERE "
    "ahead.status = 'pending' AND ahead.created_at <= job.created_at) END, "
    "step, total, preview_step, preview, outcome, webhook"
)
SUBMIT_TOO_LARGE = "the job store is full: this server holds all the jobs it can; retry later"


def create_private(path: Path) -> None:
    """Create the file ``path``, readable by the server's user only, where there is none:
    the job store and the webhook outbox hold signing secrets."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def default_path() -> Path:
    """``JOB_STORE_PATH``, or beside BentoML's own task store, in ``$BENTOML_HOME``."""
    if settings.job_store_path:
        return Path(settings.job_store_path)
    home = os.environ.get("BENTOML_HOME") or "~/bentoml"
    return Path(home).expanduser() / "sdxl_controlnet_jobs.db"


class SQLiteJobStore(JobStore):
    """The jobs of one host, in an SQLite file (WAL: readers never wait for the writer).
    Each call opens its own connection on a worker thread and runs in autocommit or one
    ``BEGIN IMMEDIATE`` transaction: connections are cheap, none is shared between
    coroutines or threads, and no lock is held from one call to the next."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def open(self) -> None:
        """Create the store where there is none, for the server's user only; a store left
        by another version of this schema starts empty."""
        create_private(self.path)
        with self._connection() as db:
            if db.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
                db.execute("DROP TABLE IF EXISTS job")
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            db.execute("PRAGMA journal_mode=WAL")

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    async def _in_thread(self, work: t.Callable[[], t.Any]) -> t.Any:
        return await asyncio.to_thread(work)

    async def _write(self, sql: str, *args: t.Any) -> int:
        def write() -> int:
            with self._connection() as db:
                return db.execute(sql, args).rowcount

        return await self._in_thread(write)

    @staticmethod
    def _job(db: sqlite3.Connection, task_id: str) -> Job | None:
        row = db.execute(f"SELECT {_JOB} FROM job WHERE task_id = ?", (task_id,)).fetchone()
        return None if row is None else Job(*row)

    async def submit(self, task_id: str, input: bytes, secret: str | None) -> Job:
        def submit() -> Job:
            now = time.time()
            with self._transaction() as db:
                db.execute("DELETE FROM job WHERE completed_at < ?", (now - RETENTION_S,))
                (waiting,) = db.execute("SELECT count(*) FROM job WHERE status = 'pending'")
                if waiting[0] >= settings.job_queue_max:
                    raise QueueFull(
                        f"{waiting[0]} jobs already wait for the GPU, the most this server "
                        f"queues (JOB_QUEUE_MAX); retry in {QUEUE_RETRY_AFTER_S} s",
                        retry_after_s=QUEUE_RETRY_AFTER_S,
                    )
                (held,) = db.execute("SELECT coalesce(sum(length(input)), 0) FROM job")
                if held[0] + len(input) > settings.job_store_max_bytes:
                    raise StoreFull(SUBMIT_TOO_LARGE)
                db.execute(
                    "INSERT INTO job (task_id, status, created_at, input, secret) "
                    "VALUES (?, 'pending', ?, ?, ?)",
                    (task_id, now, input, secret),
                )
                job = self._job(db, task_id)
            assert job is not None, "inserted above"
            return job

        return await self._in_thread(submit)

    async def get(self, task_id: str) -> Job | None:
        def read() -> Job | None:
            with self._connection() as db:
                return self._job(db, task_id)

        return await self._in_thread(read)

    async def source(self, task_id: str) -> Claimed | None:
        def read() -> Claimed | None:
            with self._connection() as db:
                row = db.execute(
                    "SELECT input, secret FROM job WHERE task_id = ?", (task_id,)
                ).fetchone()
                job = self._job(db, task_id)
            return None if row is None or job is None else Claimed(job, *row)

        return await self._in_thread(read)

    async def claim(self, owner: str) -> tuple[Claimed | None, list[Claimed]]:
        def claim() -> tuple[Claimed | None, list[Claimed]]:
            now = time.time()
            with self._connection() as db:  # most polls find nothing: a read decides
                (due,) = db.execute(
                    "SELECT count(*) FROM job WHERE status = 'pending' OR "
                    "(status = 'in_progress' AND lease_until < ?)",
                    (now,),
                )
            if not due[0]:
                return None, []
            with self._transaction() as db:
                failed = [self._claimed(db, task_id) for task_id in self._settle_lapsed(db, now)]
                (running,) = db.execute("SELECT count(*) FROM job WHERE status = 'in_progress'")
                row = db.execute(
                    "SELECT task_id FROM job WHERE status = 'pending' ORDER BY created_at LIMIT 1"
                ).fetchone()
                if running[0] >= settings.job_concurrency or row is None:
                    return None, failed
                db.execute(
                    "UPDATE job SET status = 'in_progress', owner = ?, lease_until = ?, "
                    "attempt = attempt + 1, executed_at = ?, step = NULL, total = NULL, "
                    "preview = NULL WHERE task_id = ?",
                    (owner, now + settings.job_lease_s, now, row[0]),
                )
                return self._claimed(db, row[0]), failed

        return await self._in_thread(claim)

    @classmethod
    def _claimed(cls, db: sqlite3.Connection, task_id: str) -> Claimed:
        job = cls._job(db, task_id)
        row = db.execute("SELECT input, secret FROM job WHERE task_id = ?", (task_id,))
        assert job is not None, "a job the caller just found"
        return Claimed(job, *row.fetchone())

    @staticmethod
    def _settle_lapsed(db: sqlite3.Connection, now: float) -> list[str]:
        """Jobs whose runner died: back to the head of the line, or failed after their
        last attempt (their ids returned)."""
        failure = json.dumps(
            {
                "status": 500,
                "error": f"the job's worker stopped during each of its {settings.job_max_attempts}"
                " runs (JOB_MAX_ATTEMPTS); see the server log",
            }
        )
        lapsed = "status = 'in_progress' AND lease_until < ?"
        failed = db.execute(
            f"UPDATE job SET status = 'failed', completed_at = ?, outcome = ?, owner = NULL, "
            f"preview = NULL WHERE {lapsed} AND attempt >= ? RETURNING task_id",
            (now, failure, now, settings.job_max_attempts),
        ).fetchall()
        db.execute(
            f"UPDATE job SET status = 'pending', owner = NULL, lease_until = NULL WHERE {lapsed}",
            (now,),
        )
        return [task_id for (task_id,) in failed]

    async def watch(self, task_id: str, owner: str, renew: bool) -> str | None:
        def watch() -> str | None:
            with self._connection() as db:
                if renew:
                    db.execute(
                        "UPDATE job SET lease_until = ? WHERE task_id = ? AND owner = ? "
                        "AND status = 'in_progress'",
                        (time.time() + settings.job_lease_s, task_id, owner),
                    )
                row = db.execute(
                    "SELECT status, owner FROM job WHERE task_id = ?", (task_id,)
                ).fetchone()
            if row is None or (row[0] == IN_PROGRESS and row[1] != owner):
                return None
            return row[0]

        return await self._in_thread(watch)

    async def record_step(self, task_id: str, step: int, total: int) -> None:
        await self._write(
            "UPDATE job SET step = ?, total = ? WHERE task_id = ? AND status = 'in_progress'",
            step,
            total,
            task_id,
        )

    async def record_preview(self, task_id: str, step: int, image: str) -> None:
        """Keep the latest preview only: a job's row never grows with its steps."""
        await self._write(
            "UPDATE job SET preview_step = ?, preview = ? WHERE task_id = ? "
            "AND status = 'in_progress'",
            step,
            image,
            task_id,
        )

    async def record_webhook(self, task_id: str, state: str) -> None:
        await self._write("UPDATE job SET webhook = ? WHERE task_id = ?", state, task_id)

    async def end(self, task_id: str, owner: str, status: str, outcome: t.Any = None) -> bool:
        # An ended job's status shows no preview: its row lets go of the last one.
        moved = await self._write(
            "UPDATE job SET status = ?, completed_at = ?, outcome = ?, preview = NULL, "
            "owner = NULL WHERE task_id = ? AND owner = ? AND status = 'in_progress'",
            status,
            time.time(),
            None if outcome is None else json.dumps(outcome, separators=(",", ":")),
            task_id,
            owner,
        )
        return moved == 1

    async def requeue(self, task_id: str, owner: str, counted: bool = False) -> bool:
        moved = await self._write(
            "UPDATE job SET status = 'pending', owner = NULL, lease_until = NULL, "
            "attempt = attempt - ?, step = NULL, total = NULL, preview = NULL "
            "WHERE task_id = ? AND owner = ? AND status = 'in_progress'",
            0 if counted else 1,
            task_id,
            owner,
        )
        return moved == 1

    async def cancel(self, task_id: str) -> tuple[Job | None, str | None]:
        def cancel() -> tuple[Job | None, str | None]:
            with self._transaction() as db:
                before = db.execute("SELECT status FROM job WHERE task_id = ?", (task_id,))
                row = before.fetchone()
                db.execute(
                    "UPDATE job SET status = 'canceled', completed_at = ?, preview = NULL, "
                    "owner = NULL WHERE task_id = ? AND status IN ('pending', 'in_progress')",
                    (time.time(), task_id),
                )
                return self._job(db, task_id), None if row is None else row[0]

        return await self._in_thread(cancel)
