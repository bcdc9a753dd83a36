"""Webhook deliveries (sdxl_controlnet/front/webhooks.py) against a real loopback receiver:
signatures checked with the Standard Webhooks library, the retry schedule (full jitter,
Retry-After, 408/429/5xx, a 410 that ends it), thin payloads, the cap on pending
deliveries, and the outbox that keeps them across a restart."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError
from standardwebhooks import Webhook, WebhookVerificationError

from devtools.receiver import Receiver, receiving
from sdxl_controlnet import outbound
from sdxl_controlnet.errors import validation_body
from sdxl_controlnet.front import webhooks
from sdxl_controlnet.front.jobs import Job, JobStore
from sdxl_controlnet.front.outbox import Message, Outbox
from sdxl_controlnet.front.webhooks import Outcome
from sdxl_controlnet.schemas import TaskParams
from sdxl_controlnet.settings import Settings

pytestmark = pytest.mark.anyio
JOB_SECRET = "whsec_" + base64.b64encode(b"the job's own key, 26 bytes").decode()
SERVER_SECRET = "whsec_" + base64.b64encode(b"the server's key, 26 bytes!").decode()
BACKOFF_S = 0.2


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Receiver]:
    configure(monkeypatch)
    with receiving() as receiver:
        yield receiver


def configure(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    values = Settings.from_env(
        {
            "WEBHOOK_ALLOW": "127.0.0.1",
            "WEBHOOK_SECRET": SERVER_SECRET,
            "WEBHOOK_BACKOFF_S": str(BACKOFF_S),
            "WEBHOOK_TIMEOUT_S": "2",
            **env,
        }
    )
    monkeypatch.setattr(webhooks, "settings", values)
    monkeypatch.setattr(
        outbound, "WEBHOOK_POLICY", outbound.Policy.from_settings(values, "webhook")
    )
    return values


async def settled(timeout_s: float = 10) -> None:
    """Returns once every delivery started has ended."""
    deadline = time.monotonic() + timeout_s
    while webhooks._pending and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not webhooks._pending


def message(receiver: Receiver, name: str = "a", secret: str = JOB_SECRET) -> Message:
    body = json.dumps({"type": "generate_task.completed", "data": {"task_id": name}}).encode()
    return Message(f"msg_{name}", f"{receiver.url}/hook", body, secret)


class NoJobs:
    """A job store that keeps no job: deliveries report to it, and nothing shows."""

    def __init__(self, outbox: Outbox) -> None:
        self.reports: list[tuple[str, str]] = []
        self.outbox = outbox

    async def record_webhook(self, task_id: str, state: str) -> None:
        self.reports.append((task_id, state))


def verified(delivery: object, secret: str) -> dict:
    return Webhook(secret).verify(delivery.body, delivery.headers)  # type: ignore[attr-defined]


async def test_a_message_is_signed_with_the_job_s_own_secret(receiver: Receiver) -> None:
    assert await webhooks.deliver(message(receiver)) == "delivered"
    (delivery,) = receiver.deliveries
    assert verified(delivery, JOB_SECRET)["data"]["task_id"] == "a"
    with pytest.raises(WebhookVerificationError):
        verified(delivery, SERVER_SECRET)  # the server's key cannot forge it


def test_a_job_s_secret_is_checked_and_never_echoed() -> None:
    with pytest.raises(ValidationError) as refused:
        TaskParams(prompt="x", webhook="https://example.com/h", webhook_secret="whsec_short")
    answered = json.dumps(validation_body(refused.value))  # what the client reads
    assert "webhook_secret: must be whsec_" in answered and "whsec_short" not in answered
    params = TaskParams(prompt="x", webhook="https://example.com/h", webhook_secret=JOB_SECRET)
    assert JOB_SECRET not in params.model_dump_json() and JOB_SECRET not in repr(params)


@pytest.mark.parametrize(
    ("webhook", "error"),
    [
        ("https://[::ffff:127.0.0.1%25]/h", "webhook: not a valid host: a zone id"),
        ("https://10.0.0.1/h", "webhook: refused by the outbound policy: address"),
        ("http://example.com/h", "webhook: refused by the outbound policy: http"),
        ("https://example.com:0/h", "webhook: not a valid port: 0"),
    ],
)
def test_a_receiver_the_webhook_policy_refuses_is_a_validation_error(
    webhook: str, error: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        TaskParams(prompt="x", webhook=webhook, webhook_secret=JOB_SECRET)
    answered = validation_body(refused.value)["error"]
    assert error in answered and "10.0.0.1" not in answered and "example.com" not in answered


SLACK_S = 0.75


async def test_retry_after_is_honoured_and_a_410_ends_it_for_good(receiver: Receiver) -> None:
    receiver.answers = [503, (429, {"Retry-After": "1"}), 408, 410, 200]
    assert await webhooks.deliver(message(receiver)) == "gone"
    deliveries = receiver.deliveries
    assert [d.status for d in deliveries] == [503, 429, 408, 410]  # nothing after the 410
    gaps = [b.at - a.at for a, b in itertools.pairwise(deliveries)]
    # Upper bounds leave a busy machine its scheduling delays; the waits' own law is
    # test_waits_are_full_jitter_and_capped's. Ignoring Retry-After would fail the 1.0 s.
    assert gaps[0] < BACKOFF_S + SLACK_S  # jittered within the first backoff
    assert 1.0 <= gaps[1] < 1.0 + SLACK_S  # the receiver's Retry-After
    assert gaps[2] < 2 * BACKOFF_S + SLACK_S
    assert len({d.headers["webhook-id"] for d in deliveries}) == 1


async def test_other_client_errors_are_not_tried_again(receiver: Receiver) -> None:
    receiver.answers = [400]
    assert await webhooks.deliver(message(receiver)) == "failed"
    assert len(receiver.deliveries) == 1


def test_waits_are_full_jitter_and_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    configure(monkeypatch, WEBHOOK_BACKOFF_S="1", WEBHOOK_MAX_BACKOFF_S="6")
    third = [webhooks.wait_s(3) for _ in range(400)]
    assert all(0 <= w <= 4 for w in third) and min(third) < 0.5 and max(third) > 3.5
    assert all(w <= 6 for w in (webhooks.wait_s(10) for _ in range(400)))
    assert webhooks.wait_s(1, "3") == 3
    assert webhooks.wait_s(1, "86400") == 6  # a receiver cannot stall it past the cap
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 4))
    assert 2.5 < webhooks.wait_s(1, date) <= 4


@pytest.mark.parametrize("retry_after", ["²", "١٢", "１２", "1.5", "-1", "soon", ""])
def test_a_retry_after_that_is_neither_ascii_digits_nor_a_date_counts_as_absent(
    monkeypatch: pytest.MonkeyPatch, retry_after: str
) -> None:
    configure(monkeypatch, WEBHOOK_BACKOFF_S="1", WEBHOOK_MAX_BACKOFF_S="6")
    assert all(0 <= webhooks.wait_s(1, retry_after) <= 1 for _ in range(50))


async def test_an_unreadable_retry_after_leaves_the_delivery_to_its_schedule(
    receiver: Receiver,
) -> None:
    receiver.answers = [(503, {"Retry-After": "²"}), 200]
    assert await webhooks.deliver(message(receiver)) == "delivered"
    assert [d.status for d in receiver.deliveries] == [503, 200]


def test_a_receiver_s_retry_after_is_capped_at_minutes_by_default() -> None:
    assert Settings.from_env({}).webhook_max_backoff_s == 300


def test_a_thin_payload_leaves_the_images_out() -> None:
    class Result(BaseModel):
        images: list[str]

    job = Job("t1", "completed", created_at=0.0, executed_at=1.0, completed_at=2.0)
    outcome = Outcome(job, Result(images=["aGVsbG8="]))
    assert webhooks.payload(outcome)["data"]["result"] == {"images": ["aGVsbG8="]}
    thin = webhooks.payload(outcome, thin=True)
    assert "result" not in thin["data"] and thin["data"]["status"] == "completed"


async def test_pending_deliveries_are_capped_counted_and_kept_across_a_restart(
    receiver: Receiver, store: JobStore, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    outbox = store.outbox
    configure(monkeypatch, WEBHOOK_MAX_PENDING="2")
    later = time.time() + 3600
    first, second, third = (message(receiver, name) for name in "xyz")
    for held in (first, second, third):
        held.next_at = later
    assert webhooks.start(first, outbox) and webhooks.start(second, outbox)
    with caplog.at_level(logging.ERROR):
        assert not webhooks.start(third, outbox)
    assert "msg_z dropped: 2 deliveries already pending" in caplog.text
    assert len(webhooks._pending) == 2

    assert await webhooks.save_pending(outbox) == 2  # a graceful stop
    assert webhooks._pending == {} and receiver.deliveries == []
    for kept in await outbox.adopt("test", 60, 10):
        kept.next_at = time.time()  # due now, to keep the test short
        await outbox.hold([kept], "test", 0)

    await outbox.hold([third], "another worker", 0)  # released by another worker
    assert await webhooks.resume_pending(outbox) == 2  # the next start, up to the cap
    (left,) = await outbox.adopt("test", 60, 10)  # for the next worker to take, not dropped
    assert left.message_id == "msg_z"
    assert await outbox.adopt("test", 60, 10) == []  # taken once: nobody else resumes them
    await settled()
    assert sorted(verified(d, JOB_SECRET)["data"]["task_id"] for d in receiver.deliveries) == [
        "x",
        "y",
    ]


async def test_a_dead_worker_s_deliveries_are_adopted_once_its_leases_lapse(
    receiver: Receiver, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, JOB_LEASE_S="1")
    outbox = store.outbox
    dead = message(receiver, "d")
    dead.tries = 2  # tried twice by the dead worker: its count goes on
    await outbox.hold([dead], "a worker killed mid-delivery", 1)
    assert await webhooks.resume_pending(outbox) == 0  # its lease still runs
    time.sleep(1.1)
    assert await webhooks.resume_pending(outbox) == 1
    assert webhooks._pending["msg_d"][0].tries == 2
    await settled()
    (delivery,) = receiver.deliveries
    assert verified(delivery, JOB_SECRET)["data"]["task_id"] == "d"
    assert delivery.headers["webhook-id"] == "msg_d"  # the id it had: a receiver dedupes
    assert await outbox.adopt("test", 60, 10) == []  # delivered: gone from the outbox


async def test_a_delivery_that_fails_on_the_server_is_logged_not_lost(
    receiver: Receiver, store: JobStore, caplog
) -> None:
    broken = message(receiver, secret="whsec_!!!")  # a key that cannot sign
    with caplog.at_level(logging.ERROR):
        assert webhooks.start(broken, store.outbox)
        while webhooks._pending:
            await asyncio.sleep(0.01)
    assert "webhook msg_a: delivery failed on the server" in caplog.text
    assert JOB_SECRET not in caplog.text


async def test_an_outbox_that_cannot_be_written_stops_no_delivery(
    receiver: Receiver, store: JobStore, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """The store behind the outbox is down: the message is delivered all the same, and
    that it could be neither kept nor reported is logged."""

    async def down(*args: object) -> None:
        raise ConnectionError("the store is down")

    for method in ("hold", "drop"):
        monkeypatch.setattr(store.outbox, method, down)
    with caplog.at_level(logging.ERROR):
        assert webhooks.start(message(receiver), store.outbox)
        await settled()
    (delivery,) = receiver.deliveries
    assert verified(delivery, JOB_SECRET)["data"]["task_id"] == "a"
    assert "webhook msg_a: not kept in the outbox; delivered anyway" in caplog.text
    assert "webhook msg_a: delivered, but the store did not take it" in caplog.text


async def test_a_job_s_webhook_is_signed_with_its_own_secret_and_reports_its_state(
    receiver: Receiver, store: JobStore
) -> None:
    params = TaskParams(prompt="x", webhook=f"{receiver.url}/hook", webhook_secret=JOB_SECRET)
    job = Job("t2", "completed", created_at=0.0, executed_at=1.0, completed_at=2.0)
    reports = NoJobs(store.outbox)
    await webhooks.JobWebhook(params, reports).ended(Outcome(job))  # type: ignore[arg-type]
    await settled()
    (delivery,) = receiver.deliveries
    assert verified(delivery, JOB_SECRET)["data"]["task_id"] == "t2"
    assert reports.reports == [("t2", "pending"), ("t2", "delivered")]


async def test_one_receiving_host_cannot_take_every_pending_place(
    receiver: Receiver, store: JobStore, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    outbox = store.outbox
    configure(monkeypatch, WEBHOOK_MAX_PENDING="3", WEBHOOK_MAX_PENDING_PER_HOST="2")
    stalled = [message(receiver, name) for name in "xyz"]
    for held in stalled:
        held.next_at = time.time() + 3600  # a receiver that asked to be tried in an hour
    assert webhooks.start(stalled[0], outbox) and webhooks.start(stalled[1], outbox)
    with caplog.at_level(logging.ERROR):
        assert not webhooks.start(stalled[2], outbox)
    assert "msg_z dropped: 2 deliveries to its host pending" in caplog.text
    other = message(receiver, "other")
    other.url = other.url.replace("127.0.0.1", "localhost")  # another client's receiver
    assert webhooks.start(other, outbox)
    await webhooks.save_pending(outbox)


async def test_a_job_s_status_says_how_its_webhook_delivery_ended(
    receiver: Receiver, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, WEBHOOK_MAX_PENDING="1")
    params = TaskParams(prompt="x", webhook=f"{receiver.url}/hook", webhook_secret=JOB_SECRET)
    receiver.answers = [400]
    for task_id in ("failed", "dropped"):
        await store.submit(task_id, b"{}", None)
        await store.claim("runner")
        await store.end(task_id, "runner", "completed")
    stalled = message(receiver, "stalled")
    stalled.next_at = time.time() + 3600
    ended = webhooks.JobWebhook(params, store).ended
    await ended(Outcome(await store.get("failed")))
    await settled()
    assert webhooks.start(stalled, store.outbox)  # the one place is taken
    await ended(Outcome(await store.get("dropped")))
    for task_id in ("failed", "dropped"):
        assert (await store.get(task_id)).status_body()["webhook"] == {"state": task_id}
    await webhooks.save_pending(store.outbox)
