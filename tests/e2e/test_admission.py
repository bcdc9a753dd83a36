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
STEP_S = 0.5  # a slow GPU's denoising step (Server.slow_steps): generations of known length
IMAGE = encode(shapes_image(64, 64))


@pytest.fixture(scope="module")
def small_queue() -> Iterator[Server]:
    env = {"GENERATION_TIMEOUT_S": str(TIMEOUT_S), "MAX_QUEUE": "2"}
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
    with small_queue.slow_steps(STEP_S):
        # The queue learns the step time from finished generations (the steps after the
        # first), the lowest of the last few: two, should the first be slow on a busy CPU.
        for _ in range(2):
            assert generation_s(generate(small_queue, 3)) >= 2 * STEP_S
        # A quarter of the timeout: the short requests behind it are admitted even if a busy
        # CPU makes its steps take up to four times STEP_S.
        steps = int(0.25 * TIMEOUT_S / STEP_S)
        refused = metric(small_queue, "sdxl_controlnet_refused_busy_total")

        started = small_queue.generations_started()
        first, answers = in_background(small_queue, steps)
        try:
            small_queue.wait_generating(started)
            busy = generate(small_queue, 8 * steps)  # could only finish past the timeout
            assert busy.status_code == 503, busy.text
            error = busy.json()["error"]
            assert "busy" in error and f"{TIMEOUT_S} s timeout" in error
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
