"""Jobs as a queue, on the shared `bentoml serve` (two front workers): a burst of jobs waits
for the GPU in line instead of failing, interactive requests are not starved meanwhile, and
the application's own endpoints answer as BentoML's clients expect (retry included)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import bentoml
import httpx
import pytest

from devtools.bentoml_client import let_the_sync_client_submit_tasks
from devtools.harness import Server, serving
from devtools.job_client import ENDED, PICTURE, status, submitted

pytestmark = pytest.mark.e2e

let_the_sync_client_submit_tasks()

QUICK = {"prompt": "a house", "num_inference_steps": 1, "width": 64, "height": 64}


def submit(server: Server, headers: dict | None = None, **params: object) -> httpx.Response:
    return submitted(server, {**QUICK, **params}, headers)


def wait_ended(server: Server, task_ids: list[str], timeout_s: float = 180) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    ended: dict[str, dict] = {}
    while len(ended) < len(task_ids):
        assert time.monotonic() < deadline, f"{len(task_ids) - len(ended)} jobs never ended"
        for task_id in set(task_ids) - set(ended):
            if (now := status(server, task_id))["status"] in ENDED:
                ended[task_id] = now
        time.sleep(0.2)
    return [ended[task_id] for task_id in task_ids]


def test_64_jobs_at_once_wait_in_line_and_all_complete(server: Server) -> None:
    sixty_four_jobs_complete(server)


@pytest.mark.restarts
def test_64_jobs_at_once_all_complete_on_four_front_workers() -> None:
    with serving({"FRONT_WORKERS": "4"}) as four:
        assert len(four.workers("ControlNet")) == 4
        sixty_four_jobs_complete(four)


def sixty_four_jobs_complete(server: Server) -> None:
    # Steps of 1 s while the jobs are submitted and looked at: the line is still there once
    # every submit has answered, however busy the machine. Then the line drains at full speed.
    with server.slow_steps(1.0):
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda seed: submit(server, seed=seed), range(64)))
        assert [a.status_code for a in answers] == [200] * 64, {a.text for a in answers}
        task_ids = [a.json()["task_id"] for a in answers]
        statuses = [status(server, task_id) for task_id in task_ids]
    waiting = [s for s in statuses if s["status"] == "pending"]
    assert waiting, "64 jobs, one GPU slot for jobs: some must wait"
    # Places, read one after another while the line moves: each a place, some far back.
    places = [s["queue"]["position"] for s in waiting]
    assert min(places) >= 1 and max(places) > 1

    start = time.monotonic()
    interactive = httpx.post(
        f"{server.url}/generate",
        files={"image": ("in.png", PICTURE, "image/png")},
        data={"params": json.dumps(QUICK)},
        timeout=60,
    )
    assert interactive.status_code == 200, interactive.text
    assert time.monotonic() - start < 15, "an interactive request waited behind the jobs"

    ended = wait_ended(server, task_ids)
    assert [s["status"] for s in ended] == ["completed"] * 64
    # First in, first out: the jobs started in the order they were taken.
    by_arrival = sorted(ended, key=lambda s: s["created_at"])
    started = [datetime.fromisoformat(s["executed_at"]) for s in by_arrival]
    assert started == sorted(started)


def test_prefer_wait_answers_once_the_job_ended_with_its_result(server: Server) -> None:
    answer = submit(server, headers={"Prefer": "wait=60"}, seed=7)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "completed"
    assert [image["seed"] for image in body["result"]["images"]] == [7]
    quick = submit(server, headers={"Prefer": "wait=0"})
    assert quick.json()["status"] in ("pending", "in_progress")


def test_retry_runs_an_ended_job_again_as_a_new_job(server: Server, tmp_path: Path) -> None:
    photo = tmp_path / "in.png"
    photo.write_bytes(PICTURE)
    with bentoml.SyncHTTPClient(server.url, timeout=120) as client:
        task = client.generate_task.submit(image=photo, params={**QUICK, "seed": 3})
        while task.get_status().value not in ENDED:
            time.sleep(0.1)
        again = task.retry()
        assert again.id != task.id
        while again.get_status().value not in ENDED:
            time.sleep(0.1)
        assert again.get()["images"] == task.get()["images"]


def test_retry_of_a_job_that_has_not_ended_is_a_409(server: Server) -> None:
    task_id = submit(server, num_inference_steps=50).json()["task_id"]
    answer = httpx.post(f"{server.url}/generate_task/retry", params={"task_id": task_id})
    httpx.put(f"{server.url}/generate_task/cancel", params={"task_id": task_id})
    assert answer.status_code == 409
    assert "retry it once it ended" in answer.json()["error"]
    unknown = httpx.post(f"{server.url}/generate_task/retry", params={"task_id": "nope"})
    assert unknown.status_code == 404


def test_a_waiting_job_can_be_canceled_and_never_runs(server: Server) -> None:
    with server.slow_steps(0.3):
        first = submit(server, num_inference_steps=20).json()["task_id"]
        waiting = submit(server).json()["task_id"]
        assert status(server, waiting)["status"] == "pending"
        answer = httpx.put(f"{server.url}/generate_task/cancel", params={"task_id": waiting})
        assert answer.status_code == 200 and answer.json()["status"] == "canceled"
        httpx.put(f"{server.url}/generate_task/cancel", params={"task_id": first})
    time.sleep(1)
    assert status(server, waiting)["status"] == "canceled"
    assert "executed_at" in status(server, waiting) and not status(server, waiting)["executed_at"]
