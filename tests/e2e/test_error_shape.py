"""One error shape: every error answer, on every endpoint, is a JSON object with
``error``, whoever built it (an API, the request guard, or BentoML itself)."""

from __future__ import annotations

import json
import pickle
import time

import httpx
import pytest

from devtools.harness import Server, encode, shapes_image

pytestmark = pytest.mark.e2e

PNG = encode(shapes_image(64, 64))
PARAMS = {"prompt": "x", "num_inference_steps": 1}
ENDPOINTS = ["/generate", "/generate_batch", "/generate_stream", "/canny"]


def params_for(endpoint: str) -> dict:
    return {} if endpoint == "/canny" else PARAMS


BAD_BODIES = {
    "pickle body": lambda endpoint: {
        "content": pickle.dumps({"image": PNG, "params": params_for(endpoint)}),
        "headers": {"content-type": "application/vnd.bentoml+pickle"},
    },
    "unreadable body": lambda endpoint: {
        "content": b"--x\r\nnot a part at all",
        "headers": {"content-type": "multipart/form-data; boundary=x"},
    },
    "truncated image": lambda endpoint: {
        "files": {"image": ("in.png", PNG[:100], "image/png")},
        "data": {"params": json.dumps(params_for(endpoint))},
    },
}


def assert_error_object(response: httpx.Response) -> dict:
    assert 400 <= response.status_code < 600, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert isinstance(body, dict), body
    assert isinstance(body["error"], str) and body["error"]
    return body


@pytest.mark.parametrize("kind", list(BAD_BODIES))
@pytest.mark.parametrize("endpoint", [*ENDPOINTS, "/generate_task/submit"])
def test_a_bad_request_is_answered_with_one_error_object(
    server: Server, endpoint: str, kind: str
) -> None:
    response = httpx.post(f"{server.url}{endpoint}", timeout=60, **BAD_BODIES[kind](endpoint))
    if endpoint == "/generate_task/submit" and kind == "truncated image":
        # Read at submit, decoded when run: the task fails, and its result has the shape.
        task_id = response.json()["task_id"]
        assert_error_object(task_result(server, task_id))
        return
    body = assert_error_object(response)
    assert response.status_code in (400, 415)
    if kind == "pickle body":
        assert response.status_code == 415
        assert "pickle" in body["error"]
    if kind == "truncated image":
        assert "image" in body["error"]


def task_result(server: Server, task_id: str) -> httpx.Response:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = httpx.get(f"{server.url}/generate_task/status", params={"task_id": task_id})
        if status.json()["status"] not in ("pending", "in_progress"):
            break
        time.sleep(0.2)
    assert status.json()["status"] == "failed", status.text
    return httpx.get(f"{server.url}/generate_task/get", params={"task_id": task_id})


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/generate_task/status", 400),  # no task_id
        ("PUT", "/generate_task/cancel?task_id=", 400),  # an empty one
        ("GET", "/generate_task/get?task_id=nope", 404),
        ("PUT", "/generate_task/cancel?task_id=nope", 404),
        ("POST", "/generate_task/retry?task_id=nope", 404),
        ("GET", "/no-such-endpoint", 404),
        ("GET", "/generate", 405),
    ],
)
def test_task_endpoints_and_unknown_routes_answer_one_error_object(
    server: Server, method: str, path: str, status: int
) -> None:
    response = httpx.request(method, f"{server.url}{path}", timeout=30)
    assert response.status_code == status
    assert_error_object(response)
