"""A GPU Service whose queue is full refuses at once, with a 503 a client can act on,
instead of accepting requests that could only time out."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator

import httpx
import pytest

from devtools.harness import Server, encode, metric, post_generate, serving, shapes_image

pytestmark = pytest.mark.e2e

TIMEOUT_S = 20
IMAGE = encode(shapes_image(64, 64))


@pytest.fixture(scope="module")
def small_queue() -> Iterator[Server]:
    env = {"GENERATION_TIMEOUT_S": str(TIMEOUT_S), "MAX_QUEUE": "2", "MAX_STEPS": "5000"}
    with serving(env) as server:
        yield server


def generate(server: Server, steps: int) -> httpx.Response:
    return post_generate(server.url, IMAGE, {"prompt": "x", "num_inference_steps": steps})


def generation_s(response: httpx.Response) -> float:
    assert response.status_code == 200, response.text
    return float(re.search(r"generate;dur=([\d.]+)", response.headers["server-timing"])[1]) / 1000


def in_background(server: Server, steps: int) -> tuple[threading.Thread, list[httpx.Response]]:
    answers: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answers.append(generate(server, steps)))
    thread.start()
    return thread, answers


def test_a_full_queue_is_refused_at_once_with_retry_after(small_queue: Server) -> None:
    # Steps for a generation of about half the timeout on this machine: a step's time
    # is the difference between two generations, without their fixed costs.
    generate(small_queue, 1)  # the first generation sets up kernels: not timed
    step_s = (generation_s(generate(small_queue, 12)) - generation_s(generate(small_queue, 4))) / 8
    steps = max(int(0.5 * TIMEOUT_S / step_s), 2)
    refused = metric(small_queue, "sdxl_controlnet_refused_busy_total")

    first, answers = in_background(small_queue, steps)
    try:
        threading.Event().wait(2)  # the first has started, and the GPU has timed its steps
        busy = generate(small_queue, 3 * steps)  # could only finish past the timeout
        assert busy.status_code == 503, busy.text
        assert "busy" in busy.json()["error"] and f"{TIMEOUT_S} s timeout" in busy.json()["error"]
        assert int(busy.headers["retry-after"]) >= 1
        assert busy.json()["retry_after_s"] == int(busy.headers["retry-after"])
        assert busy.elapsed.total_seconds() < 5  # at once, not after a wait
        assert metric(small_queue, "sdxl_controlnet_refused_busy_total") == refused + 1

        # A short one is admitted behind the first; a third in flight is past MAX_QUEUE,
        # which BentoML answers with 429: the front passes it on as a 503 too.
        short = [in_background(small_queue, 1) for _ in range(2)]
        for thread, _ in short:
            thread.join()
        full = [a for _, [a] in short if a.status_code == 503]
        assert len(full) == 1, [a.text for _, [a] in short]
        assert "queue is full" in full[0].json()["error"]
    finally:
        first.join()
    assert answers[0].status_code != 503, answers[0].text  # admitted
