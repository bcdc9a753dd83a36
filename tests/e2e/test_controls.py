"""Several controls over HTTP, on `bentoml serve` of each configuration: Canny + depth and
a ControlNet Union (`thorough`: `make test-tooling`) beside the one Canny ControlNet of the
shared server. Every mode and endpoint takes them, refusals name what the server offers,
and docs/api.md's examples run."""

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

from devtools.harness import (
    Server,
    decode,
    encode,
    photo,
    serving,
    shapes_image,
    tiny_controlnets,
)
from tests.e2e.test_clients import ELSEWHERE, section

pytestmark = pytest.mark.e2e

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"
FAST = {"prompt": "a red ball", "num_inference_steps": 2, "seed": 5}


def data_uri(image) -> str:
    return "data:image/png;base64," + base64.b64encode(encode(image)).decode()


DEPTH = data_uri(photo(96, 64).convert("L"))  # a stand-in depth map


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
@pytest.mark.parametrize(
    "configuration", ["canny_and_depth", pytest.param("union", marks=pytest.mark.thorough)]
)
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


def offered(srv: Server) -> list[str]:
    schemas = httpx.get(f"{srv.url}/docs.json").json()["components"]["schemas"]
    return schemas["Control"]["properties"]["type"]["enum"]


@pytest.mark.thorough
def test_the_schema_of_a_union_offers_its_modes(union) -> None:
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


def test_the_schema_offers_what_each_server_loads(server, canny_and_depth) -> None:
    assert offered(server) == ["canny"]
    assert offered(canny_and_depth) == ["canny", "depth", "image_prompt"]
    depth_on_canny = batch(server, {**FAST, "controls": [{"type": "depth", "image": DEPTH}]})
    assert depth_on_canny.status_code == 400
    assert "they serve: canny" in depth_on_canny.json()["error"]
    assert batch(server, {**FAST, "controls": [{"type": "canny"}]}).status_code == 200


def image_prompt(colour: str, **settings: object) -> dict:
    picture = data_uri(Image.new("RGB", (80, 80), colour))
    return {"type": "image_prompt", "image": picture, "scale": 0.8, **settings}


def test_an_image_prompt_steers_beside_depth_at_every_endpoint(canny_and_depth: Server) -> None:
    depth = {"type": "depth", "image": DEPTH}
    red, blue = (
        batch(canny_and_depth, {**FAST, "controls": [depth, image_prompt(colour)]})
        for colour in ("red", "blue")
    )
    assert red.status_code == blue.status_code == 200, red.text
    (red_image,), (blue_image,) = (
        [decode(base64.b64decode(i["image"])) for i in r.json()["images"]] for r in (red, blue)
    )
    # Two steps of the tiny model: a small change, but a change.
    assert np.abs(np.asarray(red_image, int) - np.asarray(blue_image, int)).mean() > 0.1
    assert red.json()["params"]["controls"][1]["type"] == "image_prompt"
    # The edge map answered is a ControlNet's image, even with the image prompt listed first.
    first = batch(canny_and_depth, {**FAST, "controls": [image_prompt("red"), depth]})
    assert first.status_code == 200, first.text
    assert first.json()["edge_map"] == red.json()["edge_map"]
    # A file part, as a job: the same picture, the same seed, the same bytes.
    params = {**FAST, "controls": [depth, {**image_prompt("red"), "image": "look"}]}
    submitted = httpx.post(
        f"{canny_and_depth.url}/generate_task/submit",
        **form(params, look=Image.new("RGB", (80, 80), "red")),
        headers={"Prefer": "wait=60"},
        timeout=90,
    )
    assert submitted.status_code == 200, submitted.text
    task = httpx.get(
        f"{canny_and_depth.url}/generate_task/get", params={"task_id": submitted.json()["task_id"]}
    )
    assert task.json()["images"][0]["image"] == red.json()["images"][0]["image"]


@pytest.mark.parametrize(
    ("controls", "said"),
    [
        ([image_prompt("red")], "an image_prompt goes beside at least one ControlNet control"),
        (
            [{"type": "canny"}, image_prompt("red"), image_prompt("blue")],
            "at most one image_prompt per request",
        ),
        ([{"type": "canny"}, image_prompt("red", preprocessor="canny")], "takes its picture as"),
    ],
)
def test_image_prompts_a_server_cannot_honour_are_400s(
    canny_and_depth: Server, controls: list, said: str
) -> None:
    answer = batch(canny_and_depth, {**FAST, "controls": controls})
    assert answer.status_code == 400, answer.text
    assert said in answer.json()["error"]


def test_a_server_without_an_ip_adapter_refuses_image_prompts_naming_its_types(server) -> None:
    answer = batch(server, {**FAST, "controls": [{"type": "canny"}, image_prompt("red")]})
    assert answer.status_code == 400, answer.text
    assert "do not serve 'image_prompt'; they serve: canny" in answer.json()["error"]


def examples() -> list[tuple[str, str]]:
    """The curl and Python examples of docs/api.md's "Several controls" and its "Image
    prompts", which tests/e2e/test_clients.py leaves to this module."""
    text = section(DOCS.read_text(), ELSEWHERE)
    blocks = re.findall(r"```(?:bash|python)\n(.*?)```", text, re.DOTALL)
    return list(zip(blocks[::2], blocks[1::2], strict=True))


@pytest.mark.parametrize(
    ("example", "output"), [(0, "two-controls.png"), (1, "depth-and-look.png")]
)
def test_the_docs_examples_run(
    canny_and_depth: Server, tmp_path: Path, example: int, output: str
) -> None:
    photo(96, 64).convert("RGB").save(tmp_path / "photo.jpg")
    photo(96, 64).convert("L").save(tmp_path / "depth.png")
    shapes_image(80, 80).save(tmp_path / "style.png")
    curl, python = (
        code.replace("http://localhost:3000", canny_and_depth.url) for code in examples()[example]
    )
    subprocess.run(["bash", "-euc", curl], cwd=tmp_path, check=True, timeout=120)
    assert decode((tmp_path / output).read_bytes()).size == (96, 64)
    ran = subprocess.run(
        [sys.executable, "-c", python], cwd=tmp_path, check=True, capture_output=True, timeout=120
    )
    assert re.fullmatch(r"\[\d+\]\n", ran.stdout.decode())
