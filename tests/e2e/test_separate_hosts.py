"""The two Services as two servers, the front pointed at the GPU Service's URL: the
deployment for separate hosts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devtools.harness import Server, decode, encode, generate_calls, post_generate, shapes_image

pytestmark = pytest.mark.e2e

# The command BentoML's container entrypoint runs for `start-http-server`.
START = "bentoml_cli._internal.start"
GPU = "SDXLControlNetService"
FRONT = "ControlNet"


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[Server, Server]]:
    servers: list[Server] = []
    try:
        gpu = Server(["start-http-server", "--service-name", GPU, "."], module=START)
        servers.append(gpu)
        front = Server(
            ["start-http-server", "--service-name", FRONT, "--depends", f"{GPU}={gpu.url}", "."],
            module=START,
        )
        servers.append(front)
        gpu.wait_ready()
        front.wait_ready()
        yield gpu, front
    finally:
        for server in servers:
            server.stop()


def test_a_request_to_the_front_is_generated_by_the_gpu_server(
    hosts: tuple[Server, Server],
) -> None:
    gpu, front = hosts
    before = generate_calls(gpu, GPU)
    response = post_generate(
        front.url, encode(shapes_image(96, 64)), {"prompt": "a house", "num_inference_steps": 2}
    )
    assert response.status_code == 200, response.text
    assert decode(response.content).size == (96, 64)
    assert generate_calls(front, FRONT) >= 1
    assert generate_calls(gpu, GPU) == before + 1
