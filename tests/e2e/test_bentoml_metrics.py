"""BentoML's /metrics on a real `bentoml serve`: each Service's requests, counted and timed."""

from __future__ import annotations

import pytest

from devtools.harness import Server, encode, generate_calls, metric, post_generate, shapes_image

pytestmark = pytest.mark.e2e

SERVICES = ("ControlNet", "SDXLControlNetService")


def test_metrics_count_and_time_the_requests_of_both_services(server: Server) -> None:
    def timed(service: str) -> float:
        return metric(
            server,
            "bentoml_service_request_duration_seconds_count",
            service_name=service,
            endpoint="/generate",
        )

    calls = {service: generate_calls(server, service) for service in SERVICES}
    timings = {service: timed(service) for service in SERVICES}
    response = post_generate(
        server.url, encode(shapes_image(64, 64)), {"prompt": "x", "num_inference_steps": 2}
    )
    assert response.status_code == 200, response.text
    for service in SERVICES:
        assert generate_calls(server, service) == calls[service] + 1
        assert timed(service) == timings[service] + 1


def test_the_gpu_service_records_its_own_metrics(server: Server) -> None:
    images = metric(server, "sdxl_controlnet_images_generated_total")
    waits = metric(server, "sdxl_controlnet_queue_wait_seconds_count")
    generations = metric(server, "sdxl_controlnet_generation_seconds_count")
    turns_s = metric(server, "sdxl_controlnet_generation_seconds_sum")
    pipeline_s = metric(server, "sdxl_controlnet_pipeline_seconds_sum")
    params = {"prompt": "x", "num_inference_steps": 2, "num_images": 2}
    image = encode(shapes_image(64, 64))
    response = post_generate(server.url, image, params, endpoint="/generate_batch")
    assert response.status_code == 200, response.text
    assert metric(server, "sdxl_controlnet_images_generated_total") == images + 2
    assert metric(server, "sdxl_controlnet_queue_wait_seconds_count") == waits + 1
    assert metric(server, "sdxl_controlnet_generation_seconds_count") == generations + 1
    # The pipeline's call, timed on its thread, lies within the GPU turn.
    turn_s = metric(server, "sdxl_controlnet_generation_seconds_sum") - turns_s
    call_s = metric(server, "sdxl_controlnet_pipeline_seconds_sum") - pipeline_s
    assert 0 < call_s <= turn_s
