"""A job's events (its start, progress and outcome), delivered to the ``params.webhook``
it was submitted with, as the Standard Webhooks specification recommends (https://www.standardwebhooks.com).

- Each message is a POST of JSON signed with the specification's own library
  (``standardwebhooks``): ``webhook-id`` (the same on every try), ``webhook-timestamp`` and
  ``webhook-signature``, with the job's ``params.webhook_secret``, or the server's
  ``WEBHOOK_SECRET``. The secret is held in memory with the message and never logged.
- The job's runner sends them (``job_runner.py``, through ``JobWebhook``), or the cancel of
  a job that had not started, from the worker that ended the job. It goes through
  the webhook policy (``outbound.WEBHOOK_POLICY``), on a task of its own, so no generation
  waits for it.
- A network failure, a timeout, a 408, a 429 or a 5xx is tried again, up to
  ``WEBHOOK_TRIES`` tries, after the receiver's ``Retry-After`` or a random wait up to
  ``WEBHOOK_BACKOFF_S`` × 2^(n − 1) (full jitter), both capped at ``WEBHOOK_MAX_BACKOFF_S``.
  A 410 stops for good; any other answer ends it. A delivery never changes the job.
- At most ``WEBHOOK_MAX_PENDING`` deliveries wait in a worker, and at most
  ``WEBHOOK_MAX_PENDING_PER_HOST`` for one receiving host, each holding its body once. Each
  is kept in the job store's outbox (``outbox.py``) while it is under way: a graceful stop
  releases it, and the deliveries of a worker that died are adopted by another, of any
  replica sharing the store, once their lease lapses.
- A job's ``/status`` shows how its ending's delivery fares (``pending``, ``delivered``,
  ``failed``, ``gone``, ``dropped`` or ``error``), and the metric
  ``sdxl_controlnet_webhook_deliveries`` counts each ending: a dropped or abandoned delivery
  is never silent.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import os
import random
import socket
import time
import typing as t
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import bentoml
from standardwebhooks import Webhook

from .. import logs, outbound
from ..errors import ClientError
from ..metrics import WEBHOOK_DELIVERIES, WEBHOOK_PENDING, WEBHOOK_TRIES
from ..schemas import TaskParams
from ..settings import settings
from . import fetching
from .jobs import COMPLETED, FAILED, SERVER_FAILURE, Job, JobStore
from .outbox import Message, Outbox

logger = logs.logger(__name__)

T = t.TypeVar("T")
# The least time between two progress messages of a job.
PROGRESS_EVERY_S = 2.0
GONE = 410  # the receiver says the endpoint is gone: never try it again
RETRY_STATUSES = frozenset({408, 429})  # and every 5xx


_pending: dict[str, tuple[Message, asyncio.Task[None]]] = {}


@dataclass(frozen=True)
class Outcome:
    """How a job ended, for its webhook."""

    job: Job
    result: t.Any = None  # what /get answers, for a completed job
    failure: dict[str, t.Any] | None = None  # the status and error body, for a failed one


def payload(outcome: Outcome, thin: bool = False) -> dict[str, t.Any]:
    """The message for how a job ended: its id, status and times, and the result ``/get``
    returns (not in a ``thin`` one), or the failure."""
    job = outcome.job
    status = job.status_body()
    data = {key: status[key] for key in ("task_id", "status", "created_at", "completed_at")}
    if outcome.result is not None and not thin:
        data["result"] = outcome.result.model_dump(mode="json")
    elif outcome.failure is not None:
        data["error"] = outcome.failure
    return _message(job.status, data)


def _message(event: str, data: dict[str, t.Any]) -> dict[str, t.Any]:
    """A message as Standard Webhooks shapes it: ``type``, ``timestamp`` and ``data``."""
    return {
        "type": f"generate_task.{event}",
        "timestamp": datetime.now(tz=UTC).isoformat(),
        "data": data,
    }


async def told(params: TaskParams, store: JobStore, work: t.Awaitable[T]) -> T:
    """``work``, a job's body called directly (``POST /generate_task``, as BentoCloud's task
    queue calls it), its outcome delivered to ``params.webhook`` as a queued job's is: under
    the task id BentoML gives the request, or a new one."""
    hook = JobWebhook(params, store)
    request = bentoml.Context().request if params.webhook else None
    task_id = getattr(getattr(request, "state", None), "task_id", None) or uuid.uuid4().hex
    started = time.time()

    def ended(status: str) -> Job:
        return Job(task_id, status, started, started, time.time())

    async def notify(outcome: Outcome) -> None:
        """Tell the webhook; a store that is down fails the telling, never the work."""
        try:
            await hook.ended(outcome)
        except Exception:
            logger.exception("task %s: its webhook could not be told", task_id)

    try:
        result = await work
    except ClientError as exc:
        await notify(Outcome(ended(FAILED), failure=exc.body_with_status()))
        raise
    except Exception:
        await notify(Outcome(ended(FAILED), failure=SERVER_FAILURE))
        raise
    await notify(Outcome(ended(COMPLETED), result))
    return result


# Where a delivery reports its state (a job store's ``record_webhook`` for that job).
Report = t.Callable[[str], t.Awaitable[None]]


class JobWebhook:
    """A job's events, delivered to its ``params.webhook`` where ``params.webhook_events``
    asks for them: ``start`` (each run), ``progress`` (at most one every
    ``PROGRESS_EVERY_S``) and its ending, whose delivery's state ``store`` keeps. Each
    returns at once: the delivery runs on a task of its own."""

    def __init__(self, params: TaskParams, store: JobStore) -> None:
        self.url, self.events = params.webhook, set(params.webhook_events)
        self.thin = params.webhook_payload == "thin"
        given = params.webhook_secret.get_secret_value() if params.webhook_secret else None
        self.secret = given or settings.webhook_secret
        self.store = store
        self.last_progress = 0.0

    def _send(self, message_id: str, body: dict[str, t.Any], report: Report | None) -> bool:
        encoded = json.dumps(body, separators=(",", ":")).encode()
        assert self.url is not None, "sent only where there is a webhook"
        message = Message(message_id, self.url, encoded, self.secret)
        return start(message, self.store.outbox, report)

    def started(self, job: Job) -> None:
        if self.url is not None and "start" in self.events:
            data = {"task_id": job.task_id, "status": job.status, "attempt": job.attempt}
            self._send(f"msg_{job.task_id}_start_{job.attempt}", _message("started", data), None)

    def progressed(self, job: Job, step: int, total: int) -> None:
        if self.url is None or "progress" not in self.events:
            return
        if step < total and time.monotonic() - self.last_progress < PROGRESS_EVERY_S:
            return
        self.last_progress = time.monotonic()
        data = {
            "task_id": job.task_id,
            "status": job.status,
            "progress": {"step": step, "total": total},
        }
        message_id = f"msg_{job.task_id}_progress_{job.attempt}_{step}"
        self._send(message_id, _message("progress", data), None)

    async def ended(self, outcome: Outcome) -> None:
        if self.url is None or outcome.job.status not in self.events:
            return
        message_id = f"msg_{outcome.job.task_id}_{outcome.job.status}"
        report = functools.partial(self.store.record_webhook, outcome.job.task_id)
        delivering = self._send(message_id, payload(outcome, self.thin), report)
        await report("pending" if delivering else "dropped")


def start(message: Message, outbox: Outbox, report: Report | None = None) -> bool:
    """Deliver ``message`` on a task of its own, from its ``next_at``, telling ``report``
    how it ended; False if this worker already holds ``WEBHOOK_MAX_PENDING`` deliveries, or
    ``WEBHOOK_MAX_PENDING_PER_HOST`` for its host (logged and counted as dropped)."""
    receiver = fetching.host(message.url)
    for_host = sum(fetching.host(held.url) == receiver for held, _ in _pending.values())
    if len(_pending) >= settings.webhook_max_pending:
        why = f"{len(_pending)} deliveries already pending (WEBHOOK_MAX_PENDING)"
    elif for_host >= settings.webhook_max_pending_per_host:
        why = f"{for_host} deliveries to its host pending (WEBHOOK_MAX_PENDING_PER_HOST)"
    else:
        why = None
    if why is not None:
        WEBHOOK_DELIVERIES.labels(result="dropped").inc()
        logger.error("webhook %s dropped: %s", message.message_id, why)
        return False
    task = asyncio.create_task(_delivering(message, outbox, report))
    _pending[message.message_id] = (message, task)
    WEBHOOK_PENDING.inc()

    def done(_: asyncio.Task[None]) -> None:
        _pending.pop(message.message_id, None)
        WEBHOOK_PENDING.dec()

    task.add_done_callback(done)
    return True


async def _delivering(message: Message, outbox: Outbox, report: Report | None) -> None:
    """``deliver``, kept in the outbox while it is under way (a worker that dies leaves it
    to another), whatever goes wrong logged, counted and reported: no delivery dies
    silently. An outbox that cannot be written (its store is down) stops no delivery: it
    is only needed should this worker die meanwhile."""
    try:
        await outbox.hold([message], OWNER, settings.job_lease_s)
    except Exception:
        logger.exception("webhook %s: not kept in the outbox; delivered anyway", message.message_id)
    try:
        await asyncio.sleep(max(0.0, message.next_at - time.time()))
        result = await deliver(message)
    except asyncio.CancelledError:
        raise
    except Exception:
        WEBHOOK_DELIVERIES.labels(result="error").inc()
        logger.exception("webhook %s: delivery failed on the server", message.message_id)
        result = "error"
    try:
        await outbox.drop(message.message_id)
        if report is not None:
            await report(result)
    except Exception:
        logger.exception(
            "webhook %s: %s, but the store did not take it", message.message_id, result
        )


def wait_s(tries: int, retry_after: str | None = None) -> float:
    """How long to wait after try ``tries``: the receiver's ``Retry-After`` (seconds or an
    HTTP date) or full jitter over the exponential backoff, capped either way."""
    cap = settings.webhook_max_backoff_s
    if (asked := _seconds(retry_after)) is not None:
        return min(asked, cap)
    return random.uniform(0, min(cap, settings.webhook_backoff_s * 2 ** (tries - 1)))


def _seconds(retry_after: str | None) -> float | None:
    if retry_after is None:
        return None
    text = retry_after.strip()
    if text.isascii() and text.isdigit():  # not "²", which str.isdigit() also takes
        return float(text)
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


def _headers(message: Message) -> dict[str, str]:
    moment = datetime.fromtimestamp(int(time.time()), tz=UTC)
    signature = Webhook(message.secret).sign(message.message_id, moment, message.body.decode())
    return {
        "Content-Type": "application/json",
        "webhook-id": message.message_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": signature,
    }


async def deliver(message: Message) -> str:
    """POST ``message`` until it is taken or retrying cannot help; how it ended:
    ``delivered``, ``failed`` or ``gone``."""
    result, outcome = "failed", "none"
    while message.tries < settings.webhook_tries:
        message.tries += 1
        retry_after = None
        try:
            answer = await fetching.post(message.url, message.body, _headers(message))
        except outbound.Refused as exc:
            outcome, retry = exc.kind, exc.kind in fetching.RETRYABLE
        else:
            status = answer.status
            outcome = str(status) if status in (*RETRY_STATUSES, GONE) else f"{status // 100}xx"
            retry = status in RETRY_STATUSES or status >= 500
            retry_after = answer.headers.get("Retry-After")
            if 200 <= status < 300:
                WEBHOOK_TRIES.labels(outcome=outcome).inc()
                WEBHOOK_DELIVERIES.labels(result="delivered").inc()
                logger.info(
                    "webhook %s: try %d delivered (%d)", message.message_id, message.tries, status
                )
                return "delivered"
            if status == GONE:
                result = "gone"
        WEBHOOK_TRIES.labels(outcome=outcome).inc()
        if not retry or message.tries == settings.webhook_tries:
            break
        wait = wait_s(message.tries, retry_after)
        message.next_at = time.time() + wait
        logger.warning(
            "webhook %s: try %d of %d failed (%s); next in %.3f s%s",
            message.message_id,
            message.tries,
            settings.webhook_tries,
            outcome,
            wait,
            f" (Retry-After: {retry_after})" if retry_after else "",
        )
        await asyncio.sleep(wait)
    WEBHOOK_DELIVERIES.labels(result=result).inc()
    logger.error(
        "webhook %s: not delivered after %d tries (%s)%s",
        message.message_id,
        message.tries,
        outcome,
        "; the receiver is gone, never tried again" if result == "gone" else "",
    )
    return result


# This worker, as the owner of the deliveries it holds.
OWNER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


async def keep_outbox(outbox: Outbox) -> None:
    """Renew this worker's leases and adopt the deliveries of workers that are gone, every
    third of ``JOB_LEASE_S``, for as long as the worker runs."""
    while True:
        try:
            await outbox.renew(OWNER, settings.job_lease_s)
            await resume_pending(outbox)
        except Exception:
            logger.exception("webhooks: the outbox could not be read; trying again")
        await asyncio.sleep(settings.job_lease_s / 3)


async def save_pending(outbox: Outbox) -> int:
    """Stop this worker's deliveries and release them in the outbox, each with its tries
    and next try, for another worker or the next start; how many."""
    held = list(_pending.values())
    for _, task in held:
        task.cancel()
    await asyncio.gather(*(task for _, task in held), return_exceptions=True)
    saved = await outbox.hold([message for message, _ in held], OWNER, 0)
    if saved:
        logger.info("webhooks: %d pending deliveries released to the outbox", saved)
    return saved


async def resume_pending(outbox: Outbox) -> int:
    """Start the deliveries the outbox holds for nobody alive, each at its own next try;
    how many. One this worker has no room for is dropped, as a new one would be."""
    room = settings.webhook_max_pending - len(_pending)
    started = 0
    for message in await outbox.adopt(OWNER, settings.job_lease_s, room):
        if message.message_id in _pending:
            continue
        if start(message, outbox):
            started += 1
        else:
            await outbox.drop(message.message_id)
    if started:
        logger.info("webhooks: %d pending deliveries resumed from the outbox", started)
    return started
