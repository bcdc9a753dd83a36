"""The clients the README shows, run against a real `bentoml serve`: the Python client,
and the README's own curl commands."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import pytest

from devtools.harness import ROOT, Server, decode, encode, shapes_image
from sdxl_controlnet.client import AsyncClient, Client

pytestmark = pytest.mark.e2e

FAST = {"num_inference_steps": 2}


def test_client_generates_from_a_path_and_from_bytes(server: Server, tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    shapes_image(96, 64).save(photo)
    with Client(server.url) as client:
        from_path = client.generate(photo, prompt="a house", seed=1, **FAST)
        from_bytes = client.generate(photo.read_bytes(), prompt="a house", seed=1, **FAST)
        webp = client.generate(str(photo), prompt="a house", output_format="webp", **FAST)
    assert decode(from_path).size == (96, 64)
    assert from_path == from_bytes
    assert decode(webp).format == "WEBP"


@pytest.mark.anyio
async def test_async_client_generates(server: Server) -> None:
    async with AsyncClient(server.url) as client:
        image = await client.generate(encode(shapes_image(64, 64)), prompt="x", **FAST)
    assert decode(image).size == (64, 64)


def test_client_error_carries_the_services_message(server: Server) -> None:
    with Client(server.url) as client, pytest.raises(httpx.HTTPStatusError) as error:
        client.generate(encode(shapes_image()), prompt="x", num_inference_steps=0)
    assert error.value.response.status_code == 400
    assert "num_inference_steps" in str(error.value)


def readme_curl_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    return [block for block in blocks if block.startswith("curl")]


@pytest.mark.parametrize("command", readme_curl_commands())
def test_readme_curl_example_runs(server: Server, tmp_path: Path, command: str) -> None:
    shapes_image(128, 96).save(tmp_path / "photo.jpg")
    command = command.replace("http://localhost:3000", server.url)
    subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, check=True)
    for output in re.findall(r"-o (\S+)", command):
        assert decode((tmp_path / output).read_bytes()).size == (128, 96)


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
