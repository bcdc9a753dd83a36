"""Generation jobs (``@bentoml.task``) on a real `bentoml serve`, driven by BentoML's
own client: submit, poll, get, cancel, and the failures of each."""

from __future__ import annotations

import base64
import json
import re
import time
from datetime import datetime
from pathlib import Path

import bentoml
import httpx
import pytest
from bentoml.exceptions import BentoMLException

from devtools.bentoml_client import let_the_sync_client_submit_tasks
from devtools.harness import Server, decode, encode, shapes_image

pytestmark = pytest.mark.e2e

let_the_sync_client_submit_tasks()

FAST = {"prompt": "a house", "num_inference_steps": 2}
# On a slow GPU (Server.slow_steps) this job holds it for 50 s: long enough to be canceled
# mid-generation, well within the timeout, so the queue admits it.
STEP_S = 0.5
LONG = {"prompt": "x", "num_inference_steps": 100}


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    path.write_bytes(encode(shapes_image(96, 64)))
    return path


@pytest.fixture
def client(server: Server):
    with bentoml.SyncHTTPClient(server.url, timeout=120) as client:
        yield client


def wait_until_ended(task, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while (status := task.get_status().value) in ("pending", "in_progress"):
        assert time.monotonic() < deadline, "task still waiting or running"
        time.sleep(0.2)
    return status


def test_submit_poll_and_get_the_batch_result(client, photo: Path) -> None:
    task = client.generate_task.submit(image=photo, params={**FAST, "num_images": 2, "seed": 4})
    assert wait_until_ended(task) == "completed"
    result = task.get()
    assert [image["seed"] for image in result["images"]] == [4, 5]
    assert decode(base64.b64decode(result["images"][0]["image"])).size == (96, 64)
    assert result["params"]["width"] == 96


@pytest.mark.anyio
async def test_the_async_client_runs_jobs_too(server: Server, photo: Path) -> None:
    async with bentoml.AsyncHTTPClient(server.url, timeout=120) as client:
        task = await client.generate_task.submit(image=photo, params=FAST)
        while (await task.get_status()).value in ("pending", "in_progress"):
            time.sleep(0.2)
        assert len((await task.get())["images"]) == 1


def test_bad_input_is_refused_at_submit_as_generate_batch_refuses_it(
    server: Server, client, photo: Path
) -> None:
    params = {"prompt": "x", "num_inference_steps": 0}
    with pytest.raises(BentoMLException) as refused:
        client.generate_task.submit(image=photo, params=params)
    assert refused.value.error_code == 400
    assert "params.num_inference_steps" in str(refused.value)

    files = {"image": ("in.png", photo.read_bytes(), "image/png")}
    answers = [
        httpx.post(f"{server.url}{path}", files=files, data={"params": '{"prompt": 5}'})
        for path in ("/generate_task/submit", "/generate_batch")
    ]
    assert [a.status_code for a in answers] == [400, 400]
    assert answers[0].json() == answers[1].json()
    assert answers[0].json()["error"] == "params.prompt: Input should be a valid string"


def test_a_failed_task_reports_its_status_and_message(client, tmp_path: Path) -> None:
    # Valid as a request, so accepted; found impossible only once the job runs.
    sliver = tmp_path / "sliver.png"
    sliver.write_bytes(encode(shapes_image(8000, 8)))
    task = client.generate_task.submit(image=sliver, params=FAST)
    assert wait_until_ended(task) == "failed"
    with pytest.raises(BentoMLException) as failure:
        task.get()
    assert failure.value.error_code == 409
    assert f"task {task.id} failed: image aspect ratio 8000:8 is too extreme" in str(failure.value)


def test_cancel_stops_the_generation_and_frees_the_gpu(server: Server, client, photo: Path) -> None:
    with server.slow_steps(STEP_S):
        started = server.generations_started()
        task = client.generate_task.submit(image=photo, params=LONG)
        server.wait_generating(started)  # into its denoising steps
        if task.get_status().value != "in_progress":
            task.get()  # raises with the reason
        assert task.get_status().value == "in_progress"
        task.cancel()
        assert task.get_status().value == "canceled"

        start = time.monotonic()
        quick = client.generate_task.submit(image=photo, params={**FAST, "num_inference_steps": 1})
        assert wait_until_ended(quick) == "completed"
        waited_s = time.monotonic() - start
    held_s = LONG["num_inference_steps"] * STEP_S
    assert waited_s < held_s / 4, f"the canceled generation still held the GPU: {waited_s:.1f} s"
    assert task.get_status().value == "canceled"  # and it stays so
    answer = httpx.get(f"{server.url}/generate_task/get", params={"task_id": task.id})
    assert answer.status_code == 409
    assert answer.json() == {
        "error": f"task {task.id} was canceled: it has no result",
        "task_status": "canceled",
    }


def test_a_running_job_reports_its_progress(server: Server, client, photo: Path) -> None:
    with server.slow_steps(0.3):
        task = client.generate_task.submit(
            image=photo, params={"prompt": "x", "num_inference_steps": 8}
        )
        steps = set()
        while (status := status_of(server, task.id))["status"] in ("pending", "in_progress"):
            if "progress" in status:
                assert status["progress"]["total"] == 8
                steps.add(status["progress"]["step"])
            time.sleep(0.1)
    assert status["status"] == "completed" and "progress" not in status
    assert len(steps) >= 3 and max(steps) <= 8, steps
    early = httpx.get(f"{server.url}/generate_task/get", params={"task_id": "x" * 32})
    assert early.status_code == 404


def test_a_running_job_shows_its_latest_preview(server: Server, client, photo: Path) -> None:
    params = {"prompt": "x", "num_inference_steps": 8, "preview_every": 2}
    with server.slow_steps(0.3):
        task = client.generate_task.submit(image=photo, params=params)
        previews = {}
        while (status := status_of(server, task.id))["status"] in ("pending", "in_progress"):
            if "preview" in status:
                previews[status["preview"]["step"]] = status["preview"]["image"]
            time.sleep(0.1)
    assert status["status"] == "completed" and "preview" not in status
    assert previews and set(previews) <= {2, 4, 6}, previews
    for image in previews.values():
        preview = decode(base64.b64decode(image))
        assert preview.format == "WEBP" and preview.size == (96, 64)


def status_of(server: Server, task_id: str) -> dict:
    answer = httpx.get(f"{server.url}/generate_task/status", params={"task_id": task_id})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_get_of_a_running_job_says_it_is_running(server: Server, client, photo: Path) -> None:
    with server.slow_steps(0.3):
        task = client.generate_task.submit(
            image=photo, params={"prompt": "x", "num_inference_steps": 6}
        )
        answer = httpx.get(f"{server.url}/generate_task/get", params={"task_id": task.id})
        assert answer.status_code == 409
        assert re.match(f"task {task.id} is (pending|in_progress): ", answer.json()["error"])
        task.cancel()


def test_a_job_stored_by_an_idle_front_starts_at_once_not_at_the_next_idle_poll(
    server: Server, client, photo: Path
) -> None:
    """The worker that stores a job wakes its runner; without that, a job would wait for a
    runner's next idle poll (IDLE_POLL_S, 1 s): about 0.8 s each here, measured."""
    waits = []
    for _ in range(6):
        task = client.generate_task.submit(image=photo, params=FAST)
        assert wait_until_ended(task) == "completed"
        body = status_of(server, task.id)
        started, stored = (datetime.fromisoformat(body[k]) for k in ("executed_at", "created_at"))
        waits.append((started - stored).total_seconds())
    assert sorted(waits)[-2] < 0.3, waits  # all but the slowest


def test_cancel_answers_for_unknown_and_finished_tasks(server: Server, client, photo) -> None:
    unknown = httpx.put(f"{server.url}/generate_task/cancel", params={"task_id": "nope"})
    assert unknown.status_code == 404 and "not found" in unknown.json()["error"]

    task = client.generate_task.submit(image=photo, params=FAST)
    wait_until_ended(task)
    finished = httpx.put(f"{server.url}/generate_task/cancel", params={"task_id": task.id})
    assert finished.status_code == 409 and "completed" in finished.json()["error"]


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/generate_task/submit", "params: webhook: this server has no WEBHOOK_SECRET"),
        ("/generate_batch", "params: webhook: only jobs deliver webhooks"),
        ("/generate", "params: webhook: only jobs deliver webhooks"),
    ],
)
def test_a_webhook_without_a_secret_or_outside_a_job_is_a_400(
    server: Server, photo: Path, path: str, error: str
) -> None:
    params = {**FAST, "webhook": "https://example.com/hook"}
    answer = httpx.post(
        f"{server.url}{path}",
        files={"image": ("in.png", photo.read_bytes(), "image/png")},
        data={"params": json.dumps(params)},
        timeout=30,
    )
    assert answer.status_code == 400
    assert answer.json()["error"].startswith(error)
