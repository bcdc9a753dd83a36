"""The clients the docs show, run against a real `bentoml serve`: BentoML's own clients
for every endpoint, and every curl command and Python example in README.md and docs/."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
from bentoml.exceptions import BentoMLException
from PIL import Image

from devtools.bentoml_client import let_the_sync_client_submit_tasks
from devtools.harness import ROOT, Server, as_array, decode, encode, shapes_image
from devtools.harness import photo as photo_of

pytestmark = pytest.mark.e2e

let_the_sync_client_submit_tasks()

FAST = {"num_inference_steps": 2}
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
IMAGE_SUFFIXES = {".png", ".jpg", ".webp"}


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.jpg"
    shapes_image(96, 64).save(path)
    return path


def test_sync_client_calls_every_endpoint(server: Server, photo: Path) -> None:
    params = {"prompt": "a house", "seed": 1, **FAST}
    with bentoml.SyncHTTPClient(server.url, timeout=120) as client:
        image = client.generate(image=photo, params=params)
        opened = client.generate(image=Image.open(photo), params=params)
        batch = client.generate_batch(image=photo, params={**params, "num_images": 2})
        events = "".join(client.generate_stream(image=photo, params=params))
        edges = client.canny(image=photo, params={"low_threshold": 50})
        task = client.generate_task.submit(image=photo, params=params)
        while task.get_status().value in ("pending", "in_progress"):
            pass
        job = task.get()
    assert image.size == opened.size == edges.size == (96, 64)
    assert [picture["seed"] for picture in batch["images"]] == [1, 2]
    assert "event: progress" in events and "event: result" in events
    # Same seed, same image; a batch of two need not match one image to the last bit.
    assert np.array_equal(
        as_array(decode(base64.b64decode(job["images"][0]["image"]))), as_array(image)
    )


@pytest.mark.anyio
async def test_async_client_calls_every_endpoint(server: Server, photo: Path) -> None:
    async with bentoml.AsyncHTTPClient(server.url, timeout=120) as client:
        image = await client.generate(image=photo, params={"prompt": "x", **FAST})
        batch = await client.generate_batch(image=photo, params={"prompt": "x", **FAST})
        chunks = [
            chunk
            async for chunk in client.generate_stream(image=photo, params=FAST | {"prompt": "x"})
        ]
        edges = await client.canny(image=photo)
        task = await client.generate_task.submit(image=photo, params={"prompt": "x", **FAST})
        while (await task.get_status()).value in ("pending", "in_progress"):
            pass
        job = await task.get()
    assert image.size == edges.size == (96, 64)
    assert len(batch["images"]) == len(job["images"]) == 1
    assert "event: result" in "".join(chunks)


def test_client_error_carries_the_services_message(server: Server, photo: Path) -> None:
    with bentoml.SyncHTTPClient(server.url) as client, pytest.raises(BentoMLException) as error:
        client.generate(image=photo, params={"prompt": "x", "num_inference_steps": 0})
    assert error.value.error_code == 400
    assert "params.num_inference_steps" in str(error.value)


def test_the_original_contracts_requests_still_work(server: Server, photo: Path) -> None:
    """As the original example documented them: negative_prompt was Optional[str]."""
    params = {
        "prompt": "a watercolor house by a lake",
        "negative_prompt": None,
        "controlnet_conditioning_scale": 0.5,
        "num_inference_steps": 2,
    }
    with bentoml.SyncHTTPClient(server.url, timeout=120) as client:
        assert client.generate(image=photo, params=params).size == (96, 64)
    response = httpx.post(
        f"{server.url}/generate",
        files={"image": ("photo.jpg", photo.read_bytes(), "image/jpeg")},
        data={
            "params": '{"prompt": "x", "negative_prompt": null, "prompt_2": null, '
            '"scheduler": null, "seed": null, "num_inference_steps": 2}'
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text


# Its examples need a server with a depth ControlNet: tests/e2e/test_controls.py runs them.
ELSEWHERE = "## Several controls"


def section(text: str, heading: str) -> str:
    """The section of ``text`` under ``heading``, up to the next of its level."""
    return text.split(heading, 1)[1].split("\n## ", 1)[0] if heading in text else ""


def code_blocks(language: str, docs: list[Path] = DOCS) -> list[tuple[str, str]]:
    """(where, code) of each ```language block of ``docs``, but those run elsewhere."""
    return [
        (f"{doc.name}#{number}", block)
        for doc in docs
        for number, block in enumerate(
            re.findall(
                rf"```{language}\n(.*?)```",
                doc.read_text().replace(section(doc.read_text(), ELSEWHERE), ""),
                re.DOTALL,
            )
        )
    ]


CURL = [(where, block) for where, block in code_blocks("bash") if "curl " in block]
PYTHON = code_blocks("python")


def in_docs_folder(tmp_path: Path, server: Server, code: str) -> str:
    """``code`` for ``server``, with the pictures the docs take as given beside it."""
    shapes_image(128, 96).save(tmp_path / "photo.jpg")
    shapes_image(128, 96).convert("L").save(tmp_path / "edges.png")
    photo_of(256, 192).save(tmp_path / "start.jpg")
    mask = Image.new("L", (256, 192))
    mask.paste(255, (128, 0, 256, 192))
    mask.save(tmp_path / "mask.png")
    return code.replace("http://localhost:3000", server.url)


@pytest.mark.parametrize("command", [block for _, block in CURL], ids=[w for w, _ in CURL])
def test_docs_curl_example_runs(server: Server, tmp_path: Path, command: str) -> None:
    command = in_docs_folder(tmp_path, server, command)
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, check=True, timeout=300
    )
    for output in re.findall(r"-o (\S+)", command):
        data = (tmp_path / output).read_bytes()
        if Path(output).suffix in IMAGE_SUFFIXES:
            assert decode(data).size == (128, 96)
        else:
            assert data and b'"error"' not in data


@pytest.mark.parametrize("code", [block for _, block in PYTHON], ids=[w for w, _ in PYTHON])
def test_docs_python_example_runs(server: Server, tmp_path: Path, code: str) -> None:
    code = in_docs_folder(tmp_path, server, code)
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_example_http_generate_request_runs(server: Server, tmp_path: Path) -> None:
    """Sends example.http's first request as its REST client would."""
    text = (ROOT / "example.http").read_text().replace("{{host}}", server.url)
    request = text.split("###")[1]
    head, body = request.split("\n\n", 1)
    method, url = head.splitlines()[1].split()
    headers = dict(line.split(": ", 1) for line in head.splitlines()[2:])
    photo = encode(shapes_image(128, 96), "JPEG")
    body = body.strip().replace("\n", "\r\n").encode().replace(b"< ./photo.jpg", photo)
    response = httpx.request(method, url, headers=headers, content=body, timeout=120)
    assert response.status_code == 200, response.text
    assert decode(response.content).size == (128, 96)
