"""A real `bentoml serve` with both Services, driven over HTTP."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import bentoml
import httpx
import pytest
from PIL import Image

from devtools.harness import Server, decode, encode, post_generate, shapes_image

pytestmark = pytest.mark.e2e

FAST = {"num_inference_steps": 2}


def test_multipart_post_returns_an_image_of_the_input_size(server: Server) -> None:
    response = post_generate(
        server.url, encode(shapes_image(200, 152)), {"prompt": "a house", **FAST}
    )
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
    response = post_generate(server.url, image, params)
    assert response.status_code == 400, response.text
    assert message in response.text


def test_generate_reports_the_seed_and_settings(server: Server) -> None:
    response = post_generate(
        server.url, encode(shapes_image(96, 64)), {"prompt": "x", "seed": 42, **FAST}
    )
    assert response.headers["x-seed"] == "42"
    assert json.loads(response.headers["x-params"])["width"] == 96


def test_canny_returns_the_edge_map_without_the_gpu(server: Server) -> None:
    response = httpx.post(
        f"{server.url}/canny",
        files={"image": ("in.png", encode(shapes_image(160, 120)), "image/png")},
        data={"params": json.dumps({"low_threshold": 50, "high_threshold": 100})},
    )
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    edges = decode(response.content)
    assert edges.mode == "L" and edges.size == (160, 120)


def test_generate_batch_returns_json_with_every_image(server: Server) -> None:
    params = {"prompt": "x", "num_images": 2, "seed": 9, "output_format": "webp", **FAST}
    response = httpx.post(
        f"{server.url}/generate_batch",
        files={"image": ("in.png", encode(shapes_image(96, 96)), "image/png")},
        data={"params": json.dumps(params)},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert [image["seed"] for image in result["images"]] == [9, 10]
    assert decode(base64.b64decode(result["images"][0]["image"])).format == "WEBP"
    assert decode(base64.b64decode(result["edge_map"])).size == (96, 96)


@pytest.mark.parametrize(
    "url", ["https://127.0.0.1/", "https://localhost:3000/", "http://169.254.169.254/latest/"]
)
@pytest.mark.parametrize("field", ["image", "init_image", "mask"])
def test_image_urls_to_private_addresses_are_refused_naming_the_rule_only(
    server: Server, field: str, url: str
) -> None:
    files = {"image": ("in.png", encode(shapes_image(64, 64)), "image/png")}
    files |= {field: (None, url), "params": (None, '{"prompt": "x"}')}
    response = httpx.post(f"{server.url}/generate", files=files, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error.startswith(f"{field}: URL not fetched: refused by the outbound policy: address")
    assert "127.0.0.1" not in error and "169.254" not in error  # addresses go to the log only


def test_an_image_as_a_data_uri_in_a_json_body(server: Server) -> None:
    uri = "data:image/png;base64," + base64.b64encode(encode(shapes_image(96, 64))).decode()
    body = {"image": uri, "params": {"prompt": "x", **FAST}}
    response = httpx.post(f"{server.url}/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert decode(response.content).size == (96, 64)


def test_the_public_entry_point_refuses_pickle(server: Server) -> None:
    response = httpx.post(
        f"{server.url}/generate",
        content=b"\x80\x04N.",  # pickle of None: never unpickled
        headers={"content-type": "application/vnd.bentoml+pickle"},
    )
    assert response.status_code == 415


def test_an_unreadable_image_is_a_field_error_naming_image(server: Server) -> None:
    response = post_generate(server.url, b"not an image", {"prompt": "x"})
    assert response.status_code == 400
    (error,) = response.json()["detail"]
    assert error["loc"][-1] == "image" and "not a readable image" in error["msg"]


def test_server_keeps_serving_after_bad_requests(server: Server) -> None:
    post_generate(server.url, b"garbage", {"prompt": "x"})
    response = post_generate(server.url, encode(shapes_image(64, 64)), {"prompt": "x", **FAST})
    assert response.status_code == 200


def test_openapi_documents_the_parameters(server: Server) -> None:
    spec = httpx.get(f"{server.url}/docs.json").json()
    schema = json.dumps(spec)
    assert "/generate" in spec["paths"]
    for field in ("prompt", "controlnet_conditioning_scale", "num_inference_steps"):
        assert field in schema
