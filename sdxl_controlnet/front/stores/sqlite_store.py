"""The embedded job store: the jobs of one host in an SQLite file, shared by the front
workers of that host and kept across restarts, with the webhook outbox in a file beside it.
Both files are readable by the server's user only: they hold the jobs' webhook secrets.
What ``JOB_STORE_URL`` left empty gives (``make serve``, one host).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
import typing as t
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from ...settings import settings
from ..jobs import (
    IN_PROGRESS,
    PENDING,
    RETENTION_S,
    Claimed,
    Job,
    JobStore,
    StoreUnavailable,
    lapsed_failure,
    queue_full,
    store_full,
)
from ..outbox import Message, Outbox

# Writers from every front worker queue on SQLite's lock for up to this long.
BUSY_TIMEOUT_S = 5.0


# PRAGMA user_version: a store of version 2 gains outcome_bytes; one of another starts empty.
_SCHEMA_VERSION = 3
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
    outcome_bytes INTEGER NOT NULL DEFAULT 0,
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


def create_private(path: Path) -> None:
    """Create the file ``path``, readable by the server's user only, where there is none:
    the job store and the webhook outbox hold signing secrets."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


@contextlib.contextmanager
def connected(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection of its own to the file ``path``, in autocommit, waiting up to
    ``BUSY_TIMEOUT_S`` for the other workers' writes; closed afterwards."""
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        yield db
    finally:
        db.close()


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
        self.outbox = SQLiteOutbox(path.with_name("sdxl_controlnet_webhook_outbox.db"))

    def open(self) -> None:
        """Create the store and its outbox where there are none, for the server's user
        only; a store left by another version of this schema starts empty."""
        try:
            create_private(self.path)
            self.outbox.open()
            with connected(self.path) as db:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version == 2:  # outcome's size, kept beside it: length() reads all of a text
                    db.execute(
                        "ALTER TABLE job ADD COLUMN outcome_bytes INTEGER NOT NULL DEFAULT 0"
                    )
                    db.execute(
                        "UPDATE job SET outcome_bytes = length(CAST(outcome AS BLOB)) "
                        "WHERE outcome IS NOT NULL"
                    )
                elif version != _SCHEMA_VERSION:
                    db.execute("DROP TABLE IF EXISTS job")
                    db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
                db.execute("PRAGMA journal_mode=WAL")
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(
                f"the job store {self.path} cannot be opened ({exc}): set JOB_STORE_PATH to a "
                "file the server can write, or JOB_STORE_URL to a Redis"
            ) from exc

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with connected(self.path) as db:
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
            with connected(self.path) as db:
                return db.execute(sql, args).rowcount

        return await self._in_thread(write)

    @staticmethod
    def _job(db: sqlite3.Connection, task_id: str) -> Job | None:
        row = db.execute(f"SELECT {_JOB} FROM job WHERE task_id = ?", (task_id,)).fetchone()
        return None if row is None else Job(*row)

    async def submit(self, task_id: str, input: bytes, secret: str | None) -> Job:
        def submit() -> Job:
            with self._transaction() as db:
                # Stamped holding the write lock, as Redis stamps it in its script: the line is
                # ordered by created_at, and a job stamped before waiting for the lock would
                # join it behind one a runner has already taken.
                now = time.time()
                db.execute("DELETE FROM job WHERE completed_at < ?", (now - RETENTION_S,))
                (waiting,) = db.execute("SELECT count(*) FROM job WHERE status = 'pending'")
                if refusal := queue_full(waiting[0], settings.job_queue_max):
                    raise refusal
                (held,) = db.execute(
                    # A blob's length is in its header; the outcome's is kept beside it.
                    "SELECT coalesce(sum(length(input) + outcome_bytes), 0) FROM job"
                )
                if held[0] + len(input) > settings.job_store_max_bytes:
                    raise store_full()
                db.execute(
                    "INSERT INTO job (task_id, status, created_at, input, secret) "
                    "VALUES (?, 'pending', ?, ?, ?)",
                    (task_id, now, input, secret),
                )
                job = self._job(db, task_id)
            assert job is not None, "inserted above"
            return job

        return await self._in_thread(submit)

    async def counts(self) -> tuple[int, int]:
        def count() -> tuple[int, int]:
            with connected(self.path) as db:
                rows = dict(db.execute("SELECT status, count(*) FROM job GROUP BY status"))
            return rows.get(PENDING, 0), rows.get(IN_PROGRESS, 0)

        return await self._in_thread(count)

    async def get(self, task_id: str) -> Job | None:
        def read() -> Job | None:
            with connected(self.path) as db:
                return self._job(db, task_id)

        return await self._in_thread(read)

    async def source(self, task_id: str) -> Claimed | None:
        def read() -> Claimed | None:
            with connected(self.path) as db:
                row = db.execute(
                    "SELECT input, secret FROM job WHERE task_id = ?", (task_id,)
                ).fetchone()
                job = self._job(db, task_id)
            return None if row is None or job is None else Claimed(job, *row)

        return await self._in_thread(read)

    async def claim(self, owner: str) -> tuple[Claimed | None, list[Claimed]]:
        def claim() -> tuple[Claimed | None, list[Claimed]]:
            now = time.time()
            with connected(self.path) as db:  # most polls find nothing: a read decides
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
        failure = json.dumps(lapsed_failure(settings.job_max_attempts))
        lapsed = "status = 'in_progress' AND lease_until < ?"
        failed = db.execute(
            f"UPDATE job SET status = 'failed', completed_at = ?, outcome = ?, outcome_bytes = ?, "
            f"owner = NULL, preview = NULL WHERE {lapsed} AND attempt >= ? RETURNING task_id",
            (now, failure, len(failure.encode()), now, settings.job_max_attempts),
        ).fetchall()
        db.execute(
            f"UPDATE job SET status = 'pending', owner = NULL, lease_until = NULL WHERE {lapsed}",
            (now,),
        )
        return [task_id for (task_id,) in failed]

    async def watch(self, task_id: str, owner: str, renew: bool) -> str | None:
        def watch() -> str | None:
            with connected(self.path) as db:
                if renew:
                    db.execute(
                        "UPDATE job SET lease_until = ? WHERE task_id = ? AND owner = ? "
                        "AND status = 'in_progress'",
                        (time.time() + settings.job_lease_s, task_id, owner),
                    )
                row = db.execute(
                    "SELECT status, owner FROM job WHERE task_id = ?", (task_id,)
                ).fetchone()
            if row is None or (row[0] in (PENDING, IN_PROGRESS) and row[1] != owner):
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
        encoded = None if outcome is None else json.dumps(outcome, separators=(",", ":"))
        moved = await self._write(
            "UPDATE job SET status = ?, completed_at = ?, outcome = ?, outcome_bytes = ?, "
            "preview = NULL, owner = NULL WHERE task_id = ? AND owner = ? "
            "AND status = 'in_progress'",
            status,
            time.time(),
            encoded,
            0 if encoded is None else len(encoded.encode()),
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


class SQLiteOutbox(Outbox):
    """The deliveries of one host's workers, in an SQLite file beside its job store."""

    _VERSION = 2  # PRAGMA user_version: an outbox of another version starts empty

    def __init__(self, path: Path) -> None:
        self.path = path

    def open(self) -> None:
        """Create the outbox where there is none, once, with the job store."""
        create_private(self.path)
        with connected(self.path) as db:
            if db.execute("PRAGMA user_version").fetchone()[0] != self._VERSION:
                db.execute("DROP TABLE IF EXISTS outbox")
                db.execute(f"PRAGMA user_version = {self._VERSION}")
            db.execute(
                "CREATE TABLE IF NOT EXISTS outbox (message_id TEXT PRIMARY KEY, url TEXT, "
                "body BLOB, secret TEXT, tries INTEGER, next_at REAL, owner TEXT, "
                "lease_until REAL)"
            )

    async def _run(self, sql: str, *args: t.Any, many: bool = False) -> list[t.Any]:
        def run() -> list[t.Any]:
            with connected(self.path) as db:
                if many:
                    db.executemany(sql, args[0])
                    return []
                return db.execute(sql, args).fetchall()

        return await asyncio.to_thread(run)

    async def hold(self, messages: t.Sequence[Message], owner: str, lease_s: float) -> int:
        until = time.time() + lease_s if lease_s else 0.0
        rows = [(*asdict(m).values(), owner, until) for m in messages]
        await self._run(
            "INSERT OR REPLACE INTO outbox VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows, many=True
        )
        return len(rows)

    async def drop(self, message_id: str) -> None:
        await self._run("DELETE FROM outbox WHERE message_id = ?", message_id)

    async def renew(self, owner: str, lease_s: float) -> None:
        await self._run(
            "UPDATE outbox SET lease_until = ? WHERE owner = ?", time.time() + lease_s, owner
        )

    async def adopt(self, owner: str, lease_s: float, limit: int) -> list[Message]:
        now = time.time()
        rows = await self._run(
            "UPDATE outbox SET owner = ?, lease_until = ? WHERE message_id IN "
            "(SELECT message_id FROM outbox WHERE lease_until < ? ORDER BY next_at LIMIT ?) "
            "RETURNING message_id, url, body, secret, tries, next_at",
            owner,
            now + lease_s,
            now,
            limit,
        )
        return [Message(*row) for row in rows]
