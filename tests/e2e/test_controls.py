"""Several controls over HTTP, on `bentoml serve` of each configuration: Canny + depth and
a ControlNet Union beside the one Canny ControlNet of the shared server. Every mode and
endpoint takes them, refusals name what the server offers, and docs/api.md's examples run."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from devtools.harness import Server, decode, encode, photo, serving, shapes_image, tiny_controlnets
from tests.e2e.test_clients import ELSEWHERE, section

pytestmark = pytest.mark.e2e

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"
FAST = {"prompt": "a red ball", "num_inference_steps": 2, "seed": 5}


def data_uri(image) -> str:
    return "data:image/png;base64," + base64.b64encode(encode(image)).decode()


DEPTH = data_uri(photo(96, 64).convert("L"))  # a stand-in depth map


@pytest.fixture(scope="module")
def canny_and_depth() -> Iterator[Server]:
    with serving({**tiny_controlnets("canny+depth"), "FRONT_WORKERS": "2"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def union() -> Iterator[Server]:
    with serving(tiny_controlnets("union")) as srv:
        yield srv


def form(params: dict, **pictures) -> dict:
    """A form of the upload, ``pictures`` as file parts of their names, and ``params``."""
    files = {"image": ("photo.png", encode(shapes_image(96, 64)), "image/png")}
    files |= {name: (f"{name}.png", encode(p), "image/png") for name, p in pictures.items()}
    return {"files": files, "data": {"params": json.dumps(params)}}


def batch(server: Server, params: dict, **pictures) -> httpx.Response:
    return httpx.post(f"{server.url}/generate_batch", **form(params, **pictures), timeout=120)


def two_controls(**second: object) -> list[dict]:
    return [{"type": "canny", "scale": 0.6}, {"type": "depth", "image": DEPTH, **second}]


@pytest.mark.parametrize(
    ("mode", "pictures", "fields"),
    [
        ("text-to-image", {}, {}),
        ("image-to-image", {"init_image": photo(96, 64)}, {}),
        ("inpainting", {"mask": shapes_image(96, 64, "L")}, {"strength": 0.9}),
    ],
)
@pytest.mark.parametrize("configuration", ["canny_and_depth", "union"])
def test_every_mode_generates_with_two_controls_and_the_seed_holds(
    request, configuration: str, mode: str, pictures: dict, fields: dict
) -> None:
    server = request.getfixturevalue(configuration)
    params = {**FAST, **fields, "controls": two_controls(scale=0.8)}
    answers = [batch(server, params, **pictures) for _ in range(2)]
    for answer in answers:
        assert answer.status_code == 200, answer.text
    first, again = (answer.json() for answer in answers)
    assert first["params"]["mode"] == mode
    assert [c["type"] for c in first["params"]["controls"]] == ["canny", "depth"]
    assert decode(base64.b64decode(first["images"][0]["image"])).size == (96, 64)
    assert first["images"] == again["images"]
    one = batch(server, {**params, "controls": params["controls"][:1]}, **pictures).json()
    assert one["images"] != first["images"], "the depth control changed nothing"


def test_a_job_and_a_stream_take_controls(canny_and_depth: Server) -> None:
    params = {**FAST, "controls": two_controls()}
    submitted = httpx.post(
        f"{canny_and_depth.url}/generate_task/submit", **form(params), timeout=30
    )
    assert submitted.status_code == 200, submitted.text
    task = submitted.json()["task_id"]
    for _ in range(240):
        status = httpx.get(f"{canny_and_depth.url}/generate_task/status", params={"task_id": task})
        if status.json()["status"] not in ("pending", "in_progress"):
            break
    assert status.json()["status"] == "completed", status.text
    job = httpx.get(f"{canny_and_depth.url}/generate_task/get", params={"task_id": task}).json()
    with httpx.stream(
        "POST", f"{canny_and_depth.url}/generate_stream", **form(params), timeout=120
    ) as stream:
        events = stream.read().decode()
    result = json.loads(re.search(r"event: result\ndata: (.*)", events)[1])
    assert result["images"] == job["images"]


def test_several_controls_may_name_one_file_part(canny_and_depth: Server) -> None:
    # The part is read once: a second read of it was empty, "data URI: not an image".
    shared = {"type": "canny", "image": "shared"}
    params = {**FAST, "controls": [shared, {**shared, "type": "depth"}]}
    answer = batch(canny_and_depth, params, shared=photo(96, 64))
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["images"]) == 1


def test_a_control_image_may_be_a_file_part_past_what_a_text_field_holds(
    canny_and_depth: Server,
) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    depth = Image.fromarray(noise)  # 1.4 MB as a PNG: past a form text field's 1 MiB
    params = {**FAST, "controls": [{"type": "depth", "image": "depth"}]}
    as_part = batch(canny_and_depth, params, depth=depth)
    assert as_part.status_code == 200, as_part.text
    inline = {"controls": [{"type": "depth", "image": data_uri(depth)}]}
    as_uri = batch(canny_and_depth, {**FAST, **inline})
    assert as_uri.status_code == 400
    assert "1024KB" in as_uri.json()["error"]
    unnamed = {**params, "controls": [{"type": "depth", "image": "elsewhere"}]}
    missing = batch(canny_and_depth, unnamed)
    assert missing.status_code == 400
    assert "'elsewhere' is not an https:// URL" in missing.json()["error"]
    # The API's own picture fields are not a control's to take.
    upload = batch(canny_and_depth, {**params, "controls": [{"type": "depth", "image": "image"}]})
    assert upload.status_code == 400
    assert "'image' is not an https:// URL" in upload.json()["error"]


@pytest.mark.parametrize(
    ("params", "said"),
    [
        ({"controls": [{"type": "tile"}]}, "do not serve 'tile'; they serve: canny, depth"),
        (
            {"controls": [{"type": "depth", "preprocessor": "depth"}]},
            "deriving a depth image needs a model of its own",
        ),
        ({"controls": [{"type": "depth", "image": "depth.png"}]}, "params.controls[0].image"),
        (
            {"controls": [{"type": "depth", "image": DEPTH}], "control_guidance_end": 0.5},
            "control_guidance_end: with controls",
        ),
    ],
)
def test_controls_the_server_cannot_honour_are_400s_saying_why(
    canny_and_depth: Server, params: dict, said: str
) -> None:
    answer = batch(canny_and_depth, {**FAST, **params})
    assert answer.status_code == 400, answer.text
    assert said in answer.json()["error"]


def test_the_schema_offers_what_each_server_loads(server, canny_and_depth, union) -> None:
    def offered(srv: Server) -> list[str]:
        schemas = httpx.get(f"{srv.url}/docs.json").json()["components"]["schemas"]
        return schemas["Control"]["properties"]["type"]["enum"]

    assert offered(server) == ["canny"]
    assert offered(canny_and_depth) == ["canny", "depth"]
    assert set(offered(union)) == {
        "canny",
        "depth",
        "pose",
        "lineart",
        "softedge",
        "scribble",
        "normal",
        "segment",
    }
    depth_on_canny = batch(server, {**FAST, "controls": [{"type": "depth", "image": DEPTH}]})
    assert depth_on_canny.status_code == 400
    assert "they serve: canny" in depth_on_canny.json()["error"]
    assert batch(server, {**FAST, "controls": [{"type": "canny"}]}).status_code == 200


def examples() -> tuple[str, str]:
    """The curl and Python examples of docs/api.md's "Several controls", which
    tests/e2e/test_clients.py leaves to this module."""
    text = section(DOCS.read_text(), ELSEWHERE)
    curl, python = re.findall(r"```(?:bash|python)\n(.*?)```", text, re.DOTALL)
    return curl, python


def test_the_docs_examples_run(canny_and_depth: Server, tmp_path: Path) -> None:
    photo(96, 64).convert("RGB").save(tmp_path / "photo.jpg")
    photo(96, 64).convert("L").save(tmp_path / "depth.png")
    curl, python = (
        example.replace("http://localhost:3000", canny_and_depth.url) for example in examples()
    )
    subprocess.run(["bash", "-euc", curl], cwd=tmp_path, check=True, timeout=120)
    assert decode((tmp_path / "two-controls.png").read_bytes()).size == (96, 64)
    ran = subprocess.run(
        [sys.executable, "-c", python], cwd=tmp_path, check=True, capture_output=True, timeout=120
    )
    assert re.fullmatch(r"\[\d+\]\n", ran.stdout.decode())
