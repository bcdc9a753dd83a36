"""Jobs (``/generate_task/…``) as data: each job is stored once, with the input it needs to
run again, and moves through the store's queue; no job belongs to the process that
accepted it, and any worker of any replica sharing the store answers for it.

- ``submit`` stores a job ``pending``, behind the jobs before it (first in, first out), or
  refuses it: ``QueueFull`` past ``JOB_QUEUE_MAX`` waiting jobs, ``StoreFull`` past
  ``JOB_STORE_MAX_BYTES`` of inputs and results.
- A runner (``job_runner.py``, in every front worker) ``claim``s the oldest waiting job when
  fewer than ``JOB_CONCURRENCY`` run, across every worker sharing the store. The claim is a
  lease of ``JOB_LEASE_S``, which the runner renews while it works (``watch``). A lease that
  lapses (its worker died) puts the job back at the head of the line, or fails it once it
  has run ``JOB_MAX_ATTEMPTS`` times; a worker that stops gracefully hands its jobs back.
- A job's status moves from ``pending`` or ``in_progress`` to ``completed``, ``failed`` or
  ``canceled`` once, in one atomic step that checks the status it leaves: a cancel and a
  finishing run cannot both win.
- Ended jobs are kept ``RETENTION_S``, then removed with their input and secret.

``JobStore`` is the interface the endpoints and the runner use. ``stores/`` holds its
engines, chosen by ``JOB_STORE_URL``: the embedded one-host store, and the store shared by
every replica on Redis or Valkey.
"""

from __future__ import annotations

import abc
import typing as t
from dataclasses import dataclass
from datetime import UTC, datetime

from ..errors import QueueFull, StoreFull
from .outbox import Outbox

# BentoML's words for a task's status (``_bentoml_impl.tasks.ResultStatus``), which its
# clients parse.
PENDING, IN_PROGRESS = "pending", "in_progress"
COMPLETED, FAILED, CANCELED = "completed", "failed", "canceled"
ENDED = (COMPLETED, FAILED, CANCELED)
# A finished job is kept as long as BentoML's local task store keeps a result (24 h).
RETENTION_S = 24 * 3600
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
    """Where jobs live: what the endpoints and the runners of every worker share, with the
    outbox of their webhooks' deliveries."""

    outbox: Outbox
    # What this process does once it has stored a job: its runner sets it to wake itself
    # (job_runner.JobRunner.start), so that the job starts without waiting for a poll.
    on_submit: t.Callable[[], None] = staticmethod(lambda: None)

    @abc.abstractmethod
    def open(self) -> None:
        """Make the store ready once, before the workers start: create it where there is
        none, or check that it can be reached. Raises ``StoreUnavailable`` with a message
        that names the setting to fix."""

    @abc.abstractmethod
    async def counts(self) -> tuple[int, int]:
        """How many jobs wait, and how many run, in the whole store."""

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


class StoreUnavailable(RuntimeError):
    """The job store cannot be opened; the message says which setting to fix."""


def queue_full(waiting: int, queue_max: int) -> QueueFull | None:
    """The refusal of a submit while ``waiting`` jobs wait, if that is ``JOB_QUEUE_MAX``."""
    if waiting < queue_max:
        return None
    return QueueFull(
        f"{waiting} jobs already wait for the GPU, the most this server queues "
        f"(JOB_QUEUE_MAX); retry in {QUEUE_RETRY_AFTER_S} s",
        retry_after_s=QUEUE_RETRY_AFTER_S,
    )


def store_full() -> StoreFull:
    return StoreFull("the job store is full: this server holds all the jobs it can; retry later")


def lapsed_failure(max_attempts: int) -> dict[str, t.Any]:
    """How a job ends whose worker died during each of its ``max_attempts`` runs."""
    return {
        "status": 500,
        "error": f"the job's worker stopped during each of its {max_attempts} runs "
        "(JOB_MAX_ATTEMPTS); see the server log",
    }
