"""What the front fetches and delivers, on a real `bentoml serve` allowed to reach a loopback
receiver (URL_FETCH_ALLOW): images by URL at every endpoint that takes one, and refusals
of the outbound policy as the client sees them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from devtools.harness import Server, decode, encode, metric, serving, shapes_image
from devtools.receiver import Receiver, receiving

pytestmark = pytest.mark.e2e

FETCH_TIMEOUT_S = 3
FAST = {"prompt": "a house", "num_inference_steps": 2}


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with receiving(encode(shapes_image(96, 64))) as receiver:
        yield receiver


@pytest.fixture(scope="module")
def outbound_server() -> Iterator[Server]:
    env = {"URL_FETCH_ALLOW": "127.0.0.1", "URL_FETCH_TIMEOUT_S": str(FETCH_TIMEOUT_S)}
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
    while (status := task_status(outbound_server, task_id)["status"]) == "in_progress":
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
            "image: URL not fetched: redirected to http://169.254.169.254/latest/meta-data/: "
            "address refused: 169.254.169.254 is a link-local address",
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


def test_loopback_other_than_the_allowed_host_is_refused(outbound_server: Server) -> None:
    # 127.0.0.1 is allowed by name; localhost is not, though it resolves there.
    response = httpx.post(
        f"{outbound_server.url}/canny",
        files={"image": (None, f"https://localhost:{outbound_server.port}/livez")},
        timeout=30,
    )
    assert response.status_code == 400
    assert "image: URL not fetched: address refused: localhost (127.0.0.1)" in response.text
    assert metric(outbound_server, "bentoml_service_request_total", http_response_code="500") == 0
