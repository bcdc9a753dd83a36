"""A job's outcome, delivered to the ``params.webhook`` it was submitted with.

Each delivery is a POST of JSON, signed as the Standard Webhooks specification says
(https://www.standardwebhooks.com): ``webhook-id`` (the same on every try of one message),
``webhook-timestamp`` and ``webhook-signature: v1,<base64 HMAC-SHA256 of id.timestamp.body>``
with the key in ``WEBHOOK_SECRET``. The job's own body starts it (``jobs.run``), so it is
sent wherever the job runs, BentoCloud's task queue included; it goes through the outbound
policy (``fetching.py``), on a task of its own, so no generation waits for it. A 5xx, a 429,
a timeout or a network failure is tried again, after ``WEBHOOK_BACKOFF_S``, doubling, up to
``WEBHOOK_TRIES`` tries; any other answer ends it. A delivery that fails never changes the
job.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
import typing as t
from datetime import UTC, datetime

from ..metrics import WEBHOOK_DELIVERIES, WEBHOOK_TRIES
from ..settings import settings
from . import fetching
from .jobs import Outcome

logger = logging.getLogger("bentoml").getChild(__name__)

_deliveries: set[asyncio.Task[None]] = set()  # held, so that none is collected mid-flight


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """``webhook-signature`` of ``body``, for ``secret`` as ``whsec_<base64 key>``."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def payload(outcome: Outcome) -> dict[str, t.Any]:
    """The message for how a job ended: its id, status and times, and the result ``/get``
    returns, or the failure."""
    job = outcome.job
    status = job.status_body()
    data = {key: status[key] for key in ("task_id", "status", "created_at", "completed_at")}
    if outcome.result is not None:
        data["result"] = outcome.result.model_dump(mode="json")
    elif outcome.failure is not None:
        data["error"] = outcome.failure
    return {
        "type": f"generate_task.{job.status}",
        "timestamp": datetime.now(tz=UTC).isoformat(),
        "data": data,
    }


def on_job_end(url: str | None, events: t.Collection[str]) -> t.Callable[[Outcome], None]:
    """What a job calls when it ends: start delivering its outcome to ``url`` if its
    state is one of ``events``; returns at once."""

    def ended(outcome: Outcome) -> None:
        if url is None or outcome.job.status not in events:
            return
        body = json.dumps(payload(outcome), separators=(",", ":")).encode()
        message_id = f"msg_{outcome.job.task_id}_{outcome.job.status}"
        delivery = asyncio.create_task(deliver(url, message_id, body))
        _deliveries.add(delivery)
        delivery.add_done_callback(_deliveries.discard)

    return ended


def _retry_after(attempt: int) -> float:
    return settings.webhook_backoff_s * 2 ** (attempt - 1)


async def deliver(url: str, message_id: str, body: bytes) -> bool:
    """POST ``body`` to ``url`` until it is taken or retrying cannot help; whether it was."""
    for attempt in range(1, settings.webhook_tries + 1):
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(settings.webhook_secret, message_id, timestamp, body),
        }
        try:
            status = (await fetching.post(url, body, headers)).status
        except fetching.Refused as exc:
            outcome, retry = exc.kind, exc.kind in fetching.RETRYABLE
        else:
            outcome = "429" if status == 429 else f"{status // 100}xx"
            retry = status == 429 or status >= 500
            if 200 <= status < 300:
                WEBHOOK_TRIES.labels(outcome=outcome).inc()
                WEBHOOK_DELIVERIES.labels(result="delivered").inc()
                logger.info("webhook %s: try %d delivered (%d)", message_id, attempt, status)
                return True
        WEBHOOK_TRIES.labels(outcome=outcome).inc()
        if not retry or attempt == settings.webhook_tries:
            break
        wait_s = _retry_after(attempt)
        logger.warning(
            "webhook %s: try %d of %d failed (%s); next in %g s",
            message_id,
            attempt,
            settings.webhook_tries,
            outcome,
            wait_s,
        )
        await asyncio.sleep(wait_s)
    WEBHOOK_DELIVERIES.labels(result="failed").inc()
    logger.error("webhook %s: not delivered after %d tries (%s)", message_id, attempt, outcome)
    return False
