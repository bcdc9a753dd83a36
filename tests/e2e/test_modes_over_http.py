"""Image-to-image and inpainting over HTTP, at every endpoint of a real `bentoml serve`:
multipart uploads of a start picture and a mask, the mode and strength reported back, the
steps that run counted in the progress, and bad pictures refused naming their field."""

from __future__ import annotations

import base64
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from devtools.harness import Server, as_array, decode, encode, photo, shapes_image
from sdxl_controlnet.front import preprocessing
from sdxl_controlnet.settings import settings

pytestmark = pytest.mark.e2e

PARAMS = {"prompt": "a watercolor house", "num_inference_steps": 4, "seed": 3}
TOO_WIDE = settings.max_input_pixels // 1000 + 1  # × 1000: one column too many


def uploads(params: dict, **pictures: bytes) -> dict:
    """Multipart fields: the control image, the parameters, and any pictures."""
    files = {"image": ("in.png", encode(shapes_image(96, 64)), "image/png")}
    files |= {name: (f"{name}.png", data, "image/png") for name, data in pictures.items()}
    return {"files": files, "data": {"params": json.dumps(params)}}


def right_half_mask() -> bytes:
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (48, 0, 96, 64))
    return encode(mask)


INPAINTING = {"init_image": encode(photo(120, 80)), "mask": right_half_mask()}
# The start picture as the server sizes it for the 96×64 output.
SIZED_START = preprocessing.start_picture(photo(120, 80), (96, 64), "crop_and_resize")
KEPT = slice(0, 48 - 4)  # the left half, short of the default mask_blur's fade


def keeps_the_unmasked_pixels(png: bytes) -> bool:
    return np.array_equal(as_array(decode(png))[:, KEPT], SIZED_START[:, KEPT])


def test_generate_inpaints_and_says_so(server: Server) -> None:
    response = httpx.post(f"{server.url}/generate", **uploads(PARAMS, **INPAINTING), timeout=120)
    assert response.status_code == 200, response.text
    assert decode(response.content).size == (96, 64)
    used = json.loads(response.headers["X-Params"])
    assert (used["mode"], used["strength"]) == ("inpainting", 1.0)
    assert keeps_the_unmasked_pixels(response.content)
    # The same request again: the same bytes.
    again = httpx.post(f"{server.url}/generate", **uploads(PARAMS, **INPAINTING), timeout=120)
    assert again.content == response.content


def test_generate_batch_restyles_the_upload_itself(server: Server) -> None:
    params = {**PARAMS, "strength": 0.5, "num_images": 2}
    response = httpx.post(f"{server.url}/generate_batch", **uploads(params), timeout=120)
    assert response.status_code == 200, response.text
    result = response.json()
    assert (result["params"]["mode"], result["params"]["strength"]) == ("image-to-image", 0.5)
    assert len(result["images"]) == 2


def test_the_stream_counts_the_steps_strength_leaves(server: Server) -> None:
    params = {**PARAMS, "strength": 0.5}
    request = uploads(params, init_image=encode(photo(96, 64)))
    with httpx.stream("POST", f"{server.url}/generate_stream", **request, timeout=120) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line.removeprefix("data: ")) for line in lines]
    progress = [(e["step"], e["total"]) for e in events[:-1]]
    assert progress == [(0, 2), (1, 2), (2, 2)]
    assert events[-1]["params"]["mode"] == "image-to-image"


def test_a_task_inpaints_too(server: Server) -> None:
    submitted = httpx.post(
        f"{server.url}/generate_task/submit", **uploads(PARAMS, **INPAINTING), timeout=30
    )
    assert submitted.status_code == 200, submitted.text
    task_id = submitted.json()["task_id"]
    deadline = time.monotonic() + 120
    while (status := _status(server, task_id)) in ("pending", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status == "completed"
    result = httpx.get(f"{server.url}/generate_task/get", params={"task_id": task_id}).json()
    assert result["params"]["mode"] == "inpainting"
    assert keeps_the_unmasked_pixels(base64.b64decode(result["images"][0]["image"]))


def _status(server: Server, task_id: str) -> str:
    answer = httpx.get(f"{server.url}/generate_task/status", params={"task_id": task_id})
    return answer.json()["status"]


BAD_PICTURES = [
    (b"not an image at all", "not a readable image"),
    (encode(Image.new("L", (TOO_WIDE, 1000))), f"at most {settings.max_input_pixels} pixels"),
]
TRUNCATED = (encode(shapes_image(96, 64))[:120], "could not be decoded")


@pytest.mark.parametrize("field", ["init_image", "mask"])
@pytest.mark.parametrize(
    ("endpoint", "data", "message"),
    [(endpoint, *bad) for endpoint in ("/generate", "/generate_batch") for bad in BAD_PICTURES]
    # A job's upload is read at submit, but only decoded when it runs.
    + [("/generate_task/submit", *bad) for bad in BAD_PICTURES]
    + [("/generate", *TRUNCATED), ("/generate_batch", *TRUNCATED)],
)
def test_a_bad_picture_is_a_400_naming_its_field(
    server: Server, field: str, data: bytes, message: str, endpoint: str
) -> None:
    response = httpx.post(f"{server.url}{endpoint}", **uploads(PARAMS, **{field: data}))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert field in error and message in error


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"strength": 0}, "params.strength: Input should be greater than 0"),
        ({"strength": 1.5}, "params.strength: Input should be less than or equal to 1"),
        ({"strength": 0.1}, "0.1 × 4 makes none"),
        ({"mode": "image-to-image"}, "make text-to-image, not image-to-image"),
    ],
)
def test_a_strength_or_mode_that_cannot_run_is_a_400(
    server: Server, params: dict, message: str
) -> None:
    response = httpx.post(f"{server.url}/generate", **uploads({**PARAMS, **params}))
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_an_all_black_mask_is_a_400(server: Server) -> None:
    black = encode(Image.new("L", (96, 64), 0))
    response = httpx.post(f"{server.url}/generate", **uploads(PARAMS, mask=black))
    assert response.status_code == 400
    assert "mask: it is all black" in response.json()["error"]
