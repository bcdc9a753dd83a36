"""What the front fetches and delivers, on a real `bentoml serve` allowed to reach a loopback
receiver (URL_FETCH_ALLOW): images by URL at every endpoint that takes one, refusals of the
outbound policy as the client sees them, and jobs' webhooks, signed (checked with the
Standard Webhooks reference library) and retried (a short backoff, WEBHOOK_BACKOFF_S)."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import sqlite3
import time
from collections.abc import Iterator
from urllib.parse import quote, quote_plus

import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from devtools.harness import Server, decode, encode, metric, serving, shapes_image
from devtools.receiver import Receiver, receiving

pytestmark = pytest.mark.e2e

FETCH_TIMEOUT_S = 3
FAST = {"prompt": "a house", "num_inference_steps": 2}
SECRET = "whsec_" + base64.b64encode(b"a test key, not a secret!!").decode()
JOB_SECRET = "whsec_" + base64.b64encode(b"one job's key, not a secret").decode()
BACKOFF_S = 0.2
TRIES = 5


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with receiving(encode(shapes_image(96, 64))) as receiver:
        yield receiver


@pytest.fixture(scope="module")
def outbound_server() -> Iterator[Server]:
    env = {
        "URL_FETCH_ALLOW": "127.0.0.1",
        "WEBHOOK_ALLOW": "127.0.0.1",
        "URL_FETCH_TIMEOUT_S": str(FETCH_TIMEOUT_S),
        "WEBHOOK_SECRET": SECRET,
        "WEBHOOK_BACKOFF_S": str(BACKOFF_S),
        "WEBHOOK_TRIES": str(TRIES),
        "FRONT_WORKERS": "2",  # a job's webhook leaves from whichever worker ran it
    }
    with serving(env) as srv:
        yield srv


def test_an_image_by_url_on_an_allowed_host(outbound_server: Server, receiver: Receiver) -> None:
    fetched = len(receiver.fetches)
    response = httpx.post(
        f"{outbound_server.url}/generate",
        files={"image": (None, f"{receiver.url}/picture"), "params": (None, json.dumps(FAST))},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert decode(response.content).size == (96, 64)
    assert receiver.fetches[fetched:] == ["/picture"]  # once, by the front's own fetcher


def test_every_picture_by_url_in_a_json_body(outbound_server: Server, receiver: Receiver) -> None:
    body = {
        "image": f"{receiver.url}/picture",
        "init_image": f"{receiver.url}/picture",
        "mask": f"{receiver.url}/picture",
        "params": FAST,
    }
    response = httpx.post(f"{outbound_server.url}/generate_batch", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["params"]["mode"] == "inpainting"


def test_a_job_fetches_its_image_once(outbound_server: Server, receiver: Receiver) -> None:
    fetched = len(receiver.fetches)
    submitted = httpx.post(
        f"{outbound_server.url}/generate_task/submit",
        json={"image": f"{receiver.url}/picture", "params": FAST},
        timeout=30,
    )
    assert submitted.status_code == 200, submitted.text
    task_id = submitted.json()["task_id"]
    deadline = time.monotonic() + 120
    while (status := task_status(outbound_server, task_id)["status"]) in ("pending", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status == "completed"
    assert receiver.fetches[fetched:] == ["/picture"]  # at submit; the run reuses it


def task_status(server: Server, task_id: str) -> dict:
    answer = httpx.get(f"{server.url}/generate_task/status", params={"task_id": task_id})
    return answer.json()


@pytest.mark.parametrize(
    ("path", "error"),
    [
        (
            "/redirect?to=http://169.254.169.254/latest/meta-data/",
            "image: URL not fetched: redirected: refused by the outbound policy: address",
        ),
        ("/huge", "image: URL not fetched: too large: over 33554432 bytes"),
        ("/silent", f"image: URL not fetched: timed out after {FETCH_TIMEOUT_S} s"),
        ("/text", "image: URL not fetched: not an image, whatever its Content-Type"),
    ],
)
def test_refusals_are_400s_naming_the_field_within_the_time_cap(
    outbound_server: Server, receiver: Receiver, path: str, error: str
) -> None:
    start = time.monotonic()
    response = httpx.post(
        f"{outbound_server.url}/generate",
        json={"image": f"{receiver.url}{path}", "params": FAST},
        timeout=60,
    )
    assert time.monotonic() - start < FETCH_TIMEOUT_S + 2
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(error)


@pytest.mark.parametrize(
    ("params", "error"),
    [
        (
            json.dumps({**FAST, "num_inference_steps": 10**6}).encode(),
            "params: num_inference_steps",
        ),
        (b'{"prompt": "' + b"x" * 1024 * 1024 + b'"}', "params: over 1048576 bytes"),
        (b"\xff\xfe", "params: not UTF-8 text"),
    ],
)
def test_params_sent_as_a_file_part_is_checked_as_the_text_field_before_any_fetch(
    outbound_server: Server, receiver: Receiver, params: bytes, error: str
) -> None:
    fetched = len(receiver.fetches)
    response = httpx.post(
        f"{outbound_server.url}/generate",
        files={
            "image": (None, f"{receiver.url}/picture"),
            "params": ("params.json", params, "application/json"),
        },
        timeout=60,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(error)
    assert len(receiver.fetches) == fetched


def test_params_sent_twice_is_refused(outbound_server: Server) -> None:
    response = httpx.post(
        f"{outbound_server.url}/generate",
        files=[
            ("image", ("in.png", encode(shapes_image(64, 64)), "image/png")),
            ("params", (None, json.dumps(FAST))),
            ("params", ("params.json", json.dumps(FAST).encode(), "application/json")),
        ],
        timeout=60,
    )
    assert response.status_code == 400
    assert response.json()["error"] == "params: sent more than once: send one params field"


def test_params_as_a_file_part_generates_as_the_text_field_does(
    outbound_server: Server, receiver: Receiver
) -> None:
    as_part = httpx.post(
        f"{outbound_server.url}/generate",
        files={
            "image": (None, f"{receiver.url}/picture"),
            "params": ("params.json", json.dumps({**FAST, "seed": 3}).encode(), "text/plain"),
        },
        timeout=120,
    )
    as_text = httpx.post(
        f"{outbound_server.url}/generate",
        files={
            "image": (None, f"{receiver.url}/picture"),
            "params": (None, json.dumps({**FAST, "seed": 3})),
        },
        timeout=120,
    )
    assert as_part.status_code == 200, as_part.text
    assert as_part.content == as_text.content


def test_loopback_other_than_the_allowed_address_is_refused(outbound_server: Server) -> None:
    # 127.0.0.1 is allowed (and any name that resolves there); 127.0.0.2 is not.
    response = httpx.post(
        f"{outbound_server.url}/canny",
        files={"image": (None, f"http://127.0.0.2:{outbound_server.port}/livez")},
        timeout=30,
    )
    assert response.status_code == 400
    assert "image: URL not fetched: refused by the outbound policy: address" in response.text
    assert "127.0.0.2" not in response.text
    assert metric(outbound_server, "bentoml_service_request_total", http_response_code="500") == 0
    refused = metric(
        outbound_server, "sdxl_controlnet_outbound_failures_total", use="fetch", kind="policy"
    )
    assert refused >= 1
    assert "fetch of 127.0.0.2 refused (policy): 127.0.0.2:" in outbound_server.log.read_text()


def submit(server: Server, receiver: Receiver, **params: object) -> str:
    files = {"image": ("in.png", receiver.picture, "image/png")}
    params = {**FAST, "webhook": f"{receiver.url}/hook", **params}
    answer = httpx.post(
        f"{server.url}/generate_task/submit",
        files=files,
        data={"params": json.dumps(params)},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["task_id"]


def wait_finished(server: Server, task_id: str) -> str:
    deadline = time.monotonic() + 120
    while (status := task_status(server, task_id)["status"]) in ("pending", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return status


def test_a_completed_job_is_delivered_signed(outbound_server: Server) -> None:
    with receiving(encode(shapes_image(96, 64))) as receiver:
        submitted = time.monotonic()
        task_id = submit(outbound_server, receiver, seed=5)
        (delivery,) = receiver.wait_for(1)
    message = Webhook(SECRET).verify(delivery.body, delivery.headers)
    assert delivery.headers["webhook-signature"].startswith("v1,")
    assert message["type"] == "generate_task.completed"
    data = message["data"]
    assert (data["task_id"], data["status"]) == (task_id, "completed")
    assert data["created_at"] <= data["completed_at"]
    result = httpx.get(f"{outbound_server.url}/generate_task/get", params={"task_id": task_id})
    assert data["result"] == result.json()
    assert data["result"]["images"][0]["seed"] == 5
    print(f"submit → delivered: {delivery.at - submitted:.2f} s")


def test_a_failing_receiver_is_retried_with_jitter_and_retry_after(
    outbound_server: Server,
) -> None:
    tries_before = metric(outbound_server, "sdxl_controlnet_webhook_tries_total", outcome="5xx")
    with receiving(encode(shapes_image(96, 64))) as receiver:
        receiver.answers = [503, (429, {"Retry-After": "1"}), 500]
        submitted = time.monotonic()
        task_id = submit(outbound_server, receiver)
        deliveries = receiver.wait_for(4)
        # The job was complete at the first try: no delivery holds it.
        assert task_status(outbound_server, task_id)["status"] == "completed"
    assert [d.status for d in deliveries] == [503, 429, 500, 200]
    assert len({d.headers["webhook-id"] for d in deliveries}) == 1
    for delivery in deliveries:
        Webhook(SECRET).verify(delivery.body, delivery.headers)
    gaps = [b.at - a.at for a, b in itertools.pairwise(deliveries)]
    # The upper bounds leave a busy machine a second of scheduling delay; ignoring
    # Retry-After would fail its lower bound.
    assert gaps[0] < BACKOFF_S + 1.0, gaps  # full jitter: anywhere in [0, backoff]
    assert 1.0 <= gaps[1] < 2.0, gaps  # the receiver's Retry-After
    assert gaps[2] < 4 * BACKOFF_S + 1.0, gaps
    tries_after = metric(outbound_server, "sdxl_controlnet_webhook_tries_total", outcome="5xx")
    assert tries_after - tries_before == 2
    at = ", ".join(f"{d.at - submitted:.2f} s ({d.status})" for d in deliveries)
    print(f"submit → tries at {at}")


def test_a_410_ends_the_delivery_and_events_are_chosen(outbound_server: Server) -> None:
    gone_before = metric(outbound_server, "sdxl_controlnet_webhook_deliveries_total", result="gone")
    with receiving(encode(shapes_image(96, 64))) as receiver:
        receiver.answers = [410]
        wait_finished(outbound_server, submit(outbound_server, receiver))
        receiver.wait_for(1)
        ignored = submit(outbound_server, receiver, webhook_events=["failed", "canceled"])
        assert wait_finished(outbound_server, ignored) == "completed"
        time.sleep(BACKOFF_S * 4)
        assert [d.status for d in receiver.deliveries] == [410]
    gone = metric(outbound_server, "sdxl_controlnet_webhook_deliveries_total", result="gone")
    assert gone - gone_before == 1


def test_a_job_s_own_secret_signs_a_thin_message(outbound_server: Server) -> None:
    with receiving(encode(shapes_image(96, 64))) as receiver:
        task_id = submit(
            outbound_server, receiver, webhook_secret=JOB_SECRET, webhook_payload="thin"
        )
        (delivery,) = receiver.wait_for(1)
    data = Webhook(JOB_SECRET).verify(delivery.body, delivery.headers)["data"]
    assert (data["task_id"], data["status"]) == (task_id, "completed")
    assert "result" not in data  # no images: fetched from /get
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(delivery.body, delivery.headers)
    result = httpx.get(f"{outbound_server.url}/generate_task/get", params={"task_id": task_id})
    assert result.status_code == 200 and JOB_SECRET not in result.text
    assert JOB_SECRET not in outbound_server.log.read_text()
    # The job store keeps the job's input without the secret, and the secret in its own field.
    stored, kept = stored_job(outbound_server, task_id)
    assert json.loads(stored)["params"]["webhook_payload"] == "thin"
    assert b"whsec_" not in stored and kept == JOB_SECRET


def stored_job(server: Server, task_id: str) -> tuple[bytes, str | None]:
    """The input and the webhook secret the job store keeps for ``task_id``."""
    home = server.log.parent / f"bentoml-home-{server.port}"
    with contextlib.closing(sqlite3.connect(home / "sdxl_controlnet_jobs.db")) as db:
        query = "SELECT input, secret FROM job WHERE task_id = ?"
        return db.execute(query, (task_id,)).fetchone()


def test_a_secret_in_a_url_encoded_job_rests_nowhere_and_its_delivery_shows(
    outbound_server: Server,
) -> None:
    # Percent-encoded, its + / = escaped the search for it in the raw body.
    key = JOB_SECRET.removeprefix("whsec_")
    with receiving(encode(shapes_image(96, 64))) as receiver:
        params = {**FAST, "webhook": f"{receiver.url}/hook", "webhook_secret": JOB_SECRET}
        answer = httpx.post(
            f"{outbound_server.url}/generate_task/submit",
            data={"image": f"{receiver.url}/picture", "params": json.dumps(params)},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        task_id = answer.json()["task_id"]
        (delivery,) = receiver.wait_for(1)
    assert Webhook(JOB_SECRET).verify(delivery.body, delivery.headers)["data"]["task_id"] == task_id
    stored, kept = stored_job(outbound_server, task_id)
    assert kept == JOB_SECRET
    for spelled in (key, quote_plus(key), quote(key, safe="")):
        assert spelled.encode() not in stored
    deadline = time.monotonic() + 10
    while task_status(outbound_server, task_id).get("webhook") != {"state": "delivered"}:
        assert time.monotonic() < deadline, task_status(outbound_server, task_id)
        time.sleep(0.1)


def test_start_and_progress_are_delivered_when_asked_progress_at_most_every_2_s(
    outbound_server: Server,
) -> None:
    events = ["start", "progress", "completed"]
    with receiving(encode(shapes_image(96, 64))) as receiver, outbound_server.slow_steps(0.4):
        task_id = submit(outbound_server, receiver, num_inference_steps=16, webhook_events=events)
        assert wait_finished(outbound_server, task_id) == "completed"
        time.sleep(BACKOFF_S * 4)
        deliveries = receiver.deliveries
    messages = [Webhook(SECRET).verify(d.body, d.headers) for d in deliveries]
    types = [m["type"].removeprefix("generate_task.") for m in messages]
    assert types[0] == "started" and types[-1] == "completed", types
    progress = [m["data"]["progress"] for m in messages if m["type"].endswith("progress")]
    assert 2 <= len(progress) <= 5, progress  # 6.4 s of steps: not one per step
    assert progress[-1] == {"step": 16, "total": 16}
    arrivals = [d.at for d, t in zip(deliveries, types, strict=True) if t == "progress"]
    assert all(b - a >= 1.9 for a, b in itertools.pairwise(arrivals[:-1]))
    assert len({d.headers["webhook-id"] for d in deliveries}) == len(deliveries)


def test_a_job_called_directly_delivers_its_webhook_too(outbound_server: Server) -> None:
    # As BentoCloud's task queue calls it: POST /generate_task, the result in the answer.
    with receiving(encode(shapes_image(96, 64))) as receiver:
        params = {**FAST, "webhook": f"{receiver.url}/hook", "webhook_secret": JOB_SECRET}
        answer = httpx.post(
            f"{outbound_server.url}/generate_task",
            files={"image": ("in.png", receiver.picture, "image/png")},
            data={"params": json.dumps(params)},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        (delivery,) = receiver.wait_for(1)
    data = Webhook(JOB_SECRET).verify(delivery.body, delivery.headers)["data"]
    assert data["status"] == "completed"
    assert data["result"]["images"] == answer.json()["images"]


def test_a_job_canceled_while_it_waits_is_delivered_as_canceled(outbound_server: Server) -> None:
    with receiving(encode(shapes_image(96, 64))) as receiver, outbound_server.slow_steps(0.5):
        first = submit(outbound_server, receiver, num_inference_steps=100)
        waiting = submit(outbound_server, receiver)
        assert task_status(outbound_server, waiting)["status"] == "pending"
        for task_id in (waiting, first):
            canceled = httpx.put(
                f"{outbound_server.url}/generate_task/cancel", params={"task_id": task_id}
            )
            assert canceled.status_code == 200
        deliveries = receiver.wait_for(2)
    statuses = {
        (data := Webhook(SECRET).verify(d.body, d.headers)["data"])["task_id"]: data["status"]
        for d in deliveries
    }
    assert statuses == {waiting: "canceled", first: "canceled"}


def test_a_canceled_job_is_delivered_as_canceled(outbound_server: Server) -> None:
    with receiving(encode(shapes_image(96, 64))) as receiver, outbound_server.slow_steps(0.5):
        started = outbound_server.generations_started()
        task_id = submit(outbound_server, receiver, num_inference_steps=100)
        outbound_server.wait_generating(started)
        cancel = httpx.put(
            f"{outbound_server.url}/generate_task/cancel", params={"task_id": task_id}
        )
        assert cancel.status_code == 200
        (delivery,) = receiver.wait_for(1)
    data = Webhook(SECRET).verify(delivery.body, delivery.headers)["data"]
    assert (data["task_id"], data["status"]) == (task_id, "canceled")
    assert "result" not in data and data["completed_at"]


def test_a_failed_job_is_delivered_with_its_error(outbound_server: Server) -> None:
    with receiving(encode(shapes_image(8000, 8))) as receiver:
        task_id = submit(outbound_server, receiver)
        (delivery,) = receiver.wait_for(1)
    data = Webhook(SECRET).verify(delivery.body, delivery.headers)["data"]
    assert (data["task_id"], data["status"]) == (task_id, "failed")
    assert data["error"]["status"] == 400
    assert "aspect ratio 8000:8 is too extreme" in data["error"]["error"]


@pytest.mark.parametrize(
    ("webhook", "error"),
    [
        (
            "https://169.254.169.254/hook",
            "params: webhook: refused by the outbound policy: address",
        ),
        ("http://10.0.0.1/hook", "params: webhook: refused by the outbound policy: address"),
        ("https://[::ffff:127.0.0.1%25]/hook", "params: webhook: not a valid host: a zone id"),
        ("https://0x7f.1/hook", "params: webhook: not a valid host: an IPv4 address is written"),
    ],
)
def test_a_webhook_the_policy_refuses_is_a_400_at_submit(
    outbound_server: Server, webhook: str, error: str
) -> None:
    answer = httpx.post(
        f"{outbound_server.url}/generate_task/submit",
        files={"image": ("in.png", encode(shapes_image(96, 64)), "image/png")},
        data={"params": json.dumps({**FAST, "webhook": webhook})},
        timeout=30,
    )
    assert answer.status_code == 400
    assert answer.json()["error"].startswith(error)


@pytest.mark.restarts
def test_a_pending_delivery_survives_a_graceful_restart(tmp_path) -> None:
    env = {
        "WEBHOOK_ALLOW": "127.0.0.1",
        "WEBHOOK_SECRET": SECRET,
        "BENTOML_HOME": str(tmp_path / "home"),  # the same home, hence outbox, for both
    }
    with receiving(encode(shapes_image(96, 64))) as receiver:
        receiver.answers = [(503, {"Retry-After": "5"})]
        with serving(env) as first:
            submitted = time.monotonic()
            submit(first, receiver)
            receiver.wait_for(1)
            assert metric(first, "sdxl_controlnet_webhook_pending") == 1
        stopped = time.monotonic()  # a graceful stop: the delivery went to the outbox
        with serving(env) as second:
            (_, resumed) = receiver.wait_for(2, timeout_s=30)
            assert metric(second, "sdxl_controlnet_webhook_pending") == 0
        deliveries = receiver.deliveries
    assert resumed.at > stopped
    assert [d.status for d in deliveries] == [503, 200]
    assert deliveries[0].headers["webhook-id"] == resumed.headers["webhook-id"]
    assert Webhook(SECRET).verify(resumed.body, resumed.headers)["data"]["status"] == "completed"
    at = ", ".join(f"{d.at - submitted:.2f} s ({d.status})" for d in deliveries)
    print(f"submit → tries at {at}; stopped at {stopped - submitted:.2f} s")
