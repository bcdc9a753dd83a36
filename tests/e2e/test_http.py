"""A real `bentoml serve` with both Services, driven over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import bentoml
import httpx
import pytest
from PIL import Image

from tests.conftest import Server, decode, encode, shapes_image

pytestmark = pytest.mark.e2e

FAST = {"num_inference_steps": 2}


def post_generate(server: Server, image: bytes, params: dict, **kwargs) -> httpx.Response:
    return httpx.post(
        f"{server.url}/generate",
        files={"image": ("input.png", image, "image/png")},
        data={"params": json.dumps(params)},
        timeout=120,
        **kwargs,
    )


def test_multipart_post_returns_an_image_of_the_input_size(server: Server) -> None:
    response = post_generate(server, encode(shapes_image(200, 152)), {"prompt": "a house", **FAST})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert decode(response.content).size == (200, 152)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_jpeg_and_webp_uploads(server: Server, fmt: str) -> None:
    response = httpx.post(
        f"{server.url}/generate",
        files={"image": ("in", encode(shapes_image(128, 96), fmt), f"image/{fmt.lower()}")},
        data={"params": json.dumps({"prompt": "x", **FAST})},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert decode(response.content).size == (128, 96)


def test_bentoml_sync_client(server: Server, tmp_path: Path) -> None:
    # The client uploads files: a path, or an image opened from one.
    photo = tmp_path / "photo.jpg"
    shapes_image(96, 64).save(photo)
    with bentoml.SyncHTTPClient(server.url, timeout=120) as client:
        from_path = client.generate(image=photo, params={"prompt": "a red ball", **FAST})
        from_image = client.generate(image=Image.open(photo), params={"prompt": "x", **FAST})
    assert from_path.size == from_image.size == (96, 64)


@pytest.mark.parametrize(
    ("image", "params", "message"),
    [
        (b"not an image at all", {"prompt": "x"}, "not a readable image"),
        (b"", {"prompt": "x"}, "not a readable image"),
        (encode(shapes_image())[:200], {"prompt": "x", **FAST}, "could not"),
        (encode(shapes_image()), {"prompt": ""}, "prompt"),
        (
            encode(shapes_image()),
            {"prompt": "x", "num_inference_steps": 10**6},
            "num_inference_steps",
        ),
        (encode(shapes_image()), {"prompt": "x", "typo": 1}, "typo"),
    ],
)
def test_bad_requests_get_a_400_naming_the_problem(
    server: Server, image: bytes, params: dict, message: str
) -> None:
    response = post_generate(server, image, params)
    assert response.status_code == 400, response.text
    assert message in response.text


def test_server_keeps_serving_after_bad_requests(server: Server) -> None:
    post_generate(server, b"garbage", {"prompt": "x"})
    response = post_generate(server, encode(shapes_image(64, 64)), {"prompt": "x", **FAST})
    assert response.status_code == 200


def test_openapi_documents_the_parameters(server: Server) -> None:
    spec = httpx.get(f"{server.url}/docs.json").json()
    schema = json.dumps(spec)
    assert "/generate" in spec["paths"]
    for field in ("prompt", "controlnet_conditioning_scale", "num_inference_steps"):
        assert field in schema
