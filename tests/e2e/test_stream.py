"""The progress stream of a real `bentoml serve`: events in order, and a client
that leaves stops the GPU."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from devtools.harness import Server, decode, encode, serving, shapes_image

pytestmark = pytest.mark.e2e

STEP_S = 0.5  # a slow GPU's denoising step (Server.slow_steps)


def stream(server: Server, params: dict, image: bytes | None = None) -> httpx.Response:
    """The streamed response of /generate_stream, to be used as a context manager."""
    return httpx.stream(
        "POST",
        f"{server.url}/generate_stream",
        files={"image": ("in.png", image or encode(shapes_image(96, 64)), "image/png")},
        data={"params": json.dumps(params)},
        timeout=120,
    )


def events(response: httpx.Response) -> Iterator[tuple[str, dict]]:
    """(event, data) of each server-sent event, as it arrives."""
    event = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield event, json.loads(line.removeprefix("data: "))


def test_progress_counts_every_step_then_the_result_arrives(server: Server) -> None:
    params = {"prompt": "x", "num_inference_steps": 3, "seed": 5, "output_format": "webp"}
    with stream(server, params) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        received = list(events(response))

    *progress, (last, result) = received
    assert [name for name, _ in progress] == ["progress"] * 4 and last == "result"
    assert [data["step"] for _, data in progress] == [0, 1, 2, 3]
    assert {data["total"] for _, data in progress} == {3}
    elapsed = [data["elapsed_s"] for _, data in progress]
    assert elapsed == sorted(elapsed)
    image = decode(base64.b64decode(result["images"][0]["image"]))
    assert image.format == "WEBP" and image.size == (96, 64)
    assert result["images"][0]["seed"] == 5 and result["params"]["width"] == 96


def test_previews_arrive_as_events_at_their_steps_and_leave_the_result_unchanged(
    server: Server,
) -> None:
    params = {"prompt": "x", "num_inference_steps": 5, "seed": 9, "output_format": "png"}
    with stream(server, params) as response:
        plain = list(events(response))
    with stream(server, {**params, "preview_every": 2}) as response:
        watched = list(events(response))

    # Steps 0 (waiting) to 5; a preview after steps 2 and 4, none after the last.
    assert [name for name, _ in watched] == (
        ["progress"] * 3 + ["preview"] + ["progress"] * 2 + ["preview", "progress", "result"]
    )
    previews = [data for name, data in watched if name == "preview"]
    assert [(data["step"], data["total"]) for data in previews] == [(2, 5), (4, 5)]
    for data in previews:
        image = decode(base64.b64decode(data["image"]))
        assert image.format == "WEBP" and image.size == (96, 64)
    assert watched[-1][1]["images"] == plain[-1][1]["images"]  # the same PNG, byte for byte


def test_bad_input_is_a_400_before_the_stream_starts(server: Server) -> None:
    with stream(server, {"prompt": "x", "low_threshold": 200, "high_threshold": 100}) as response:
        response.read()
    assert response.status_code == 400
    assert "low_threshold must not exceed high_threshold" in response.text


def test_a_client_that_leaves_stops_the_generation(server: Server) -> None:
    # On a slow GPU, finishing the abandoned run would delay the next request by half a minute.
    long_run = {"prompt": "x", "num_inference_steps": 100}
    with server.slow_steps(STEP_S):
        with stream(server, long_run) as response:
            for _, data in events(response):
                if data["step"] == 2:
                    break
        left_s = (100 - 2) * STEP_S

        start = time.monotonic()
        with stream(server, {"prompt": "x", "num_inference_steps": 1}) as response:
            assert [name for name, _ in events(response)][-1] == "result"
        waited_s = time.monotonic() - start
    assert waited_s < left_s / 4, (
        f"waited {waited_s:.1f} s; the abandoned run had {left_s:.0f} s left"
    )


# The rule and the pipeline without previews are tests/service/test_previews.py's; this is
# the served configuration without a preview model, beside the shared server's.
@pytest.mark.thorough
def test_without_a_preview_model_previews_are_a_400_and_the_rest_unchanged(server: Server) -> None:
    params = {"prompt": "x", "num_inference_steps": 2, "seed": 3}
    with stream(server, params) as response:
        served_with = list(events(response))[-1][1]["images"]
    with serving({"SDXL_PREVIEW_MODEL": ""}) as without:
        schema = httpx.get(f"{without.url}/docs.json").json()
        field = schema["components"]["schemas"]["Params"]["properties"]["preview_every"]
        assert field["x-available"] is False
        with stream(without, {**params, "preview_every": 1}) as response:
            response.read()
        assert response.status_code == 400
        assert "preview_every: this server makes no previews" in response.text
        assert "SDXL_PREVIEW_MODEL" in response.text
        with stream(without, params) as response:
            received = list(events(response))
    assert [name for name, _ in received] == ["progress"] * 3 + ["result"]
    assert received[-1][1]["images"] == served_with
