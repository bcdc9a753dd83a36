"""LoRA adapters through a real `bentoml serve`, declared with LORA_ADAPTERS as an operator
would (tests/conftest.py declares the tiny random adapters for the suite's server)."""

from __future__ import annotations

import contextlib
import json
import time

import httpx
import numpy as np
import pytest

from devtools.harness import Server, as_array, decode, encode, post_generate, shapes_image

pytestmark = pytest.mark.e2e

PHOTO = encode(shapes_image(96, 64))
FAST = {"prompt": "a house", "num_inference_steps": 2, "seed": 3}


def generate(server: Server, **params) -> httpx.Response:
    response = post_generate(server.url, PHOTO, {**FAST, **params})
    assert response.status_code == 200, response.text
    return response


def pixels(server: Server, **params) -> np.ndarray:
    return as_array(decode(generate(server, **params).content))


def test_adapters_are_chosen_per_request_and_the_base_comes_back(server: Server) -> None:
    base = pixels(server)
    style = pixels(server, loras=[{"name": "style"}])
    both = pixels(server, loras=[{"name": "style"}, {"name": "detail", "scale": -1}])
    assert not np.array_equal(style, base) and not np.array_equal(both, style)
    assert np.array_equal(pixels(server, loras=[{"name": "detail", "scale": 0}]), base)
    assert np.array_equal(pixels(server), base)


def test_a_few_step_preset_shows_in_x_params_unless_overridden(server: Server) -> None:
    used = json.loads(generate(server, loras=[{"name": "fast"}]).headers["x-params"])
    del used["seed"]
    assert {k: used[k] for k in ("scheduler", "num_inference_steps", "guidance_scale")} == {
        "scheduler": "euler_trailing",
        "num_inference_steps": 2,  # FAST sets it: the request's own value wins
        "guidance_scale": 0,
    }
    response = post_generate(server.url, PHOTO, {"prompt": "x", "loras": [{"name": "fast"}]})
    assert json.loads(response.headers["x-params"])["num_inference_steps"] == 4


@pytest.mark.parametrize(
    ("loras", "message"),
    [
        (
            [{"name": "lightning"}],
            "params.loras.0.name: unknown adapter 'lightning'; this "
            "server has: detail, fast, style",
        ),
        ([{"name": "style", "scale": 3}], "params.loras.0.scale: Input should be less than or"),
        ("style", "params.loras: Input should be a valid list"),
    ],
)
def test_bad_adapter_choices_are_a_400_naming_the_field(server: Server, loras, message) -> None:
    response = post_generate(server.url, PHOTO, {**FAST, "loras": loras})
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_the_openapi_schema_lists_the_adapters(server: Server) -> None:
    spec = httpx.get(f"{server.url}/docs.json", timeout=10).json()
    text = json.dumps(spec)
    assert '"enum": ["detail", "fast", "style"]' in text
    assert '"x-presets"' in text


# The message is tests/service/test_adapters_in_process.py's; a start that fails never gets
# ready is the wrong revision's in make test (tests/packaging/test_model_references.py).
@pytest.mark.thorough
def test_a_missing_adapter_stops_start_up_naming_it(tmp_path) -> None:
    """The GPU worker fails to start, naming the adapter, so the server never gets ready."""
    declared = {"gone": {"model": str(tmp_path / "no-such-adapter")}}
    server = Server(["serve", "."], env={"LORA_ADAPTERS": json.dumps(declared)})
    try:
        deadline = time.monotonic() + 120
        while "LoRA adapter 'gone'" not in server.log.read_text():
            assert time.monotonic() < deadline, f"no error naming the adapter in {server.log}"
            time.sleep(0.5)
        with contextlib.suppress(httpx.TransportError):
            assert httpx.get(f"{server.url}/readyz", timeout=5).status_code != 200
    finally:
        server.stop()
    assert "no such file; check LORA_ADAPTERS" in server.log.read_text()
