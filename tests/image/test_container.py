"""The CPU image run for real: the whole Bento in one container, then one Service a container."""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from devtools.harness import as_array, decode, encode, free_port, post_generate
from tests.image.containers import IMAGE, MODEL_ARGS, MODEL_MOUNT, Container, engine, running

pytestmark = pytest.mark.image

PHOTO_SIZE = (640, 480)
# Half of the 2.71 GB that BentoML's default Debian template made of the CPU image.
SIZE_BUDGET = 1.35e9
REQUEST = {"prompt": "a house under the sky", "num_inference_steps": 2, "seed": 7}


def photo_like(width: int, height: int) -> Image.Image:
    """A JPEG-ready picture with what photographs have and drawings lack: smooth light,
    soft edges and sensor noise, around a house under the sky."""
    rows = np.linspace(0, 1, height)[:, None, None]
    sky = (1 - rows) * np.array([90, 150, 230]) + rows * np.array([200, 220, 240])
    pixels = np.broadcast_to(sky, (height, width, 3)).copy()
    pixels[int(height * 0.65) :] = [70, 120, 50]  # grass
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    left, top = width // 3, height // 3
    draw.rectangle([left, top, left + width // 4, int(height * 0.7)], fill=(180, 90, 60))
    draw.polygon(
        [(left - 20, top), (left + width // 8, top - height // 6), (left + width // 4 + 20, top)],
        fill=(90, 40, 40),
    )
    draw.ellipse([width - 140, 30, width - 60, 110], fill=(250, 230, 150))
    noise = np.random.default_rng(0).normal(0, 6, (height, width, 3))
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)), dtype=float)
    return Image.fromarray(np.clip(blurred + noise, 0, 255).astype(np.uint8))


def serve(service: str, port: int, *options: str) -> list[str]:
    """The image's command for one Service of the Bento, on loopback."""
    return [
        "start-http-server",
        "--service-name",
        service,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *options,
    ]


@pytest.fixture(scope="module")
def photo() -> bytes:
    return encode(photo_like(*PHOTO_SIZE), "JPEG")


@pytest.fixture(scope="module")
def bento() -> Iterator[Container]:
    """The image as users run it: its default command serves both Services on port 3000."""
    port = free_port()
    with running(port, ["--publish", f"127.0.0.1:{port}:3000", *MODEL_ARGS]) as container:
        yield container


@pytest.fixture
def split() -> Iterator[tuple[Container, Container]]:
    """The GPU Service in one container, the front in another, calling it over HTTP."""
    gpu_port, front_port = free_port(), free_port()
    with (
        running(
            gpu_port,
            ["--network", "host", *MODEL_ARGS],
            serve("SDXLControlNetService", gpu_port),
        ) as gpu,
        running(
            front_port,
            ["--network", "host"],  # no model: the front never loads one
            serve("ControlNet", front_port, "--depends", f"SDXLControlNetService={gpu.url}"),
        ) as front,
    ):
        yield gpu, front


def test_one_container_generates_through_both_services(bento: Container, photo: bytes) -> None:
    response = post_generate(bento.url, photo, REQUEST, "image/jpeg")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = decode(response.content)
    assert (image.size, image.mode) == (PHOTO_SIZE, "RGB")
    assert as_array(image).std() > 0, "the reply is one flat colour"


def test_two_containers_generate_the_same_pixels_as_one(
    bento: Container, split: tuple[Container, Container], photo: bytes
) -> None:
    _, front = split
    response = post_generate(front.url, photo, REQUEST, "image/jpeg")
    assert response.status_code == 200, response.text
    whole = as_array(decode(post_generate(bento.url, photo, REQUEST, "image/jpeg").content))
    np.testing.assert_array_equal(as_array(decode(response.content)), whole)


def test_front_answers_503_when_the_gpu_container_is_gone(
    split: tuple[Container, Container], photo: bytes
) -> None:
    gpu, front = split
    gpu.stop()
    response = post_generate(front.url, photo, REQUEST, "image/jpeg")
    assert response.status_code == 503
    assert "GPU Service is unavailable" in response.json()["error"]


def test_runs_as_non_root_without_secrets_and_reads_the_mounted_model(bento: Container) -> None:
    assert bento.exec("id", "-u").strip() != "0"
    names = [line.split("=", 1)[0] for line in bento.exec("env").splitlines()]
    assert not [name for name in names if re.search("TOKEN|SECRET|PASSWORD|KEY", name)]
    credentials = "~/.cache/huggingface/token $BENTOML_HOME/.yatai.yaml ~/.netrc"
    assert bento.exec("sh", "-c", f"ls {credentials} 2>/dev/null; true") == ""
    # Every file of the mount is readable by the image's user, and none writable.
    assert bento.exec("find", MODEL_MOUNT, "!", "-readable") == ""
    assert bento.exec("find", MODEL_MOUNT, "-writable") == ""


def test_image_fits_its_size_budget() -> None:
    size = int(engine("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    assert size <= SIZE_BUDGET, f"{IMAGE} is {size / 1e9:.2f} GB, over {SIZE_BUDGET / 1e9} GB"


def test_image_has_no_build_tools_apt_cache_or_wheels(bento: Container) -> None:
    def found(command: str) -> list[str]:
        return bento.exec("sh", "-c", f"{command} 2>/dev/null; true").split()

    assert found("command -v gcc cc make curl") == []
    assert found("find /var/lib/apt/lists /var/cache/apt -type f ! -name lock") == []
    assert found("find /app /home/bentoml -name '*.whl'") == []
    # torch is installed once, in the Bento's virtual environment.
    assert found("find / -xdev -name 'torch-*.dist-info'") == [
        "/app/.venv/lib/python3.11/site-packages/torch-2.13.0+cpu.dist-info"
    ]
