"""Hostile input, faults and load against a real `bentoml serve`: every bad
request gets a 4xx that says why, faults give a clear 5xx, and the server keeps
serving everyone else."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import struct
import time
import zlib
from collections.abc import Iterator

import httpx
import psutil
import pytest

from devtools.harness import Server, decode, encode, post_generate, serving, shapes_image

pytestmark = pytest.mark.e2e

LIMITS = {
    "MAX_UPLOAD_BYTES": str(1024 * 1024),
    "MAX_INPUT_PIXELS": str(1000 * 1000),
}
FAST = {"prompt": "x", "num_inference_steps": 2}
# On a slow GPU (Server.slow_steps) this generation holds it for 50 s, at any size.
STEP_S = 0.5
LONG = {"prompt": "x", "num_inference_steps": 100}


@pytest.fixture(scope="module")
def strict_server() -> Iterator[Server]:
    """Both Services with small upload limits, so limit tests stay quick."""
    with serving(LIMITS) as srv:
        yield srv


def post(server: Server, files: dict, **kwargs: object) -> httpx.Response:
    return httpx.post(f"{server.url}/generate", files=files, timeout=120, **kwargs)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares a huge image: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


GOOD_IMAGE = ("in.png", encode(shapes_image(64, 64)), "image/png")
GOOD_PARAMS = (None, json.dumps(FAST))


@pytest.mark.parametrize(
    ("files", "status", "message"),
    [
        (
            {"image": ("a.png", b"hello", "image/png"), "params": GOOD_PARAMS},
            400,
            "not a readable image",
        ),
        (
            {"image": ("a.png", b"", "image/png"), "params": GOOD_PARAMS},
            400,
            "not a readable image",
        ),
        (
            {"image": ("a.png", GOOD_IMAGE[1][:100], "image/png"), "params": GOOD_PARAMS},
            400,
            "image",
        ),
        (
            {"image": ("a.png", png_header_only(5000, 5000), "image/png"), "params": GOOD_PARAMS},
            400,
            "at most 1000000 pixels",
        ),
        (
            {"image": ("a.png", png_header_only(60000, 60000), "image/png"), "params": GOOD_PARAMS},
            400,
            "decompression bomb",
        ),
        ({"params": GOOD_PARAMS}, 400, "image"),
        ({"image": GOOD_IMAGE}, 400, "params"),
        ({"image": GOOD_IMAGE, "params": (None, "{not json")}, 400, "params"),
        ({"image": GOOD_IMAGE, "params": (None, '{"prompt": "x", "steps": 5}')}, 400, "steps"),
        (
            {"image": GOOD_IMAGE, "params": (None, json.dumps({"prompt": "x" * 5000}))},
            400,
            "prompt",
        ),
        (
            {"image": GOOD_IMAGE, "params": (None, '{"prompt": "x", "guidance_scale": NaN}')},
            400,
            "guidance_scale",
        ),
        (
            {
                "image": GOOD_IMAGE,
                "params": (None, '{"prompt": "x", "num_inference_steps": 1000000}'),
            },
            400,
            "num_inference_steps",
        ),
        (
            {"image": GOOD_IMAGE, "params": (None, '{"prompt": "x", "num_images": 50}')},
            400,
            "num_images",
        ),
        (
            {
                "image": GOOD_IMAGE,
                "params": (None, '{"prompt": "x", "width": 4096, "height": 4096}'),
            },
            400,
            "width",
        ),
    ],
)
def test_hostile_input_gets_a_400_that_says_why(
    strict_server: Server, files: dict, status: int, message: str
) -> None:
    response = post(strict_server, files)
    assert response.status_code == status, response.text
    assert message in response.text


def multipart(*parts: bytes, boundary: str = "b") -> dict:
    """A hand-written multipart body, for shapes no HTTP client sends."""
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    return {
        "content": body + b"--" + boundary.encode() + b"--\r\n",
        "headers": {"content-type": f"multipart/form-data; boundary={boundary}"},
    }


def form(image: tuple = GOOD_IMAGE, params: object = GOOD_PARAMS) -> dict:
    return {"files": {"image": image, "params": params}}


# Requests that break while BentoML reads them, before any validation: by kind, each
# with the field the 400 names and what it says. Upstream answers each with a 500.
HOSTILE_KINDS = {
    "content type Pillow has no plugin for": (
        form(image=("a.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml")),
        "image: not a readable image",
    ),
    "form field over the parser's part limit": (
        form(params=(None, "x" * (1024 * 1024 + 1))),
        "params: Part exceeded maximum size of 1024KB",
    ),
    "image sent as a text field": (
        form(image=(None, "just some text")),
        "image: sent as a text field",
    ),
    "image sent as a URL that cannot be fetched": (
        form(image=(None, "https://unreachable.invalid/photo.png")),
        "image: URL not fetched: could not be reached",
    ),
    "JSON nested past the recursion limit": (
        form(params=(None, "[" * 100_000 + "]" * 100_000)),
        "params: JSON nested too deeply",
    ),
    "params file that is not UTF-8": (
        form(params=("params.json", b'{"prompt": "\xff\xfe"}', "application/json")),
        "params: not UTF-8 text",
    ),
    "integer too long to convert": (
        form(params=(None, '{"prompt": "x", "seed": ' + "9" * 5000 + "}")),
        "params: not valid JSON: Exceeds the limit",
    ),
    "multipart part without a name": (
        multipart(b"Content-Disposition: form-data\r\n\r\nhello"),
        'body: malformed multipart/form-data: The Content-Disposition header field "name"',
    ),
    "multipart body without boundaries": (
        {"content": b"no boundary here", "headers": multipart()["headers"]},
        "body: malformed multipart/form-data: Invalid multipart data",
    ),
    "urlencoded form": (
        {"data": {"image": "abc", "params": '{"prompt": "x"}'}},
        "image: sent as a text field",
    ),
    "JSON body with the image as a string": (
        {"json": {"image": "aGVsbG8=", "params": {"prompt": "x"}}},
        "image: send the image as a file",
    ),
    "JSON body with wrong types": (
        {"json": {"image": 5, "params": ["x"]}},
        "image: send the image as a file",
    ),
    "JSON body that is not UTF-8": (
        {"content": b'{"params": "\xff"}', "headers": {"content-type": "application/json"}},
        "json_invalid",
    ),
    "JSON body nested past the recursion limit": (
        {"content": b"[" * 100_000, "headers": {"content-type": "application/json"}},
        "recursion limit",
    ),
}


@pytest.mark.parametrize(
    ("request_kwargs", "message"), list(HOSTILE_KINDS.values()), ids=list(HOSTILE_KINDS)
)
def test_a_request_that_breaks_while_read_gets_a_400_naming_the_field(
    server: Server, request_kwargs: dict, message: str
) -> None:
    # The suite's server: its upload limit leaves room for a part over the parser's.
    logged = server.log.stat().st_size
    response = httpx.post(f"{server.url}/generate", timeout=30, **request_kwargs)
    assert response.status_code == 400, response.text
    body = response.json()
    assert message in body["error"] or message in json.dumps(body["detail"])
    with server.log.open() as log:
        log.seek(logged)
        assert "Traceback" not in log.read()


def test_a_body_over_the_limit_is_refused_before_it_is_read(strict_server: Server) -> None:
    response = post(strict_server, {"image": ("big.png", b"\0" * (2 * 1024 * 1024), "image/png")})
    assert response.status_code == 413
    assert "at most 1048576" in response.json()["error"]


def multipart_body(boundary: bytes, image: bytes, params: dict = FAST) -> bytes:
    return b"".join(
        [
            b"--" + boundary + b'\r\nContent-Disposition: form-data; name="params"\r\n\r\n',
            json.dumps(params).encode(),
            b"\r\n--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; ',
            b'filename="in.png"\r\nContent-Type: image/png\r\n\r\n',
            image,
            b"\r\n--" + boundary + b"--\r\n",
        ]
    )


def in_chunks(body: bytes, size: int = 16 * 1024) -> Iterator[bytes]:
    """A body sent with Transfer-Encoding: chunked, as a streaming client sends it."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_a_chunked_upload_is_served(strict_server: Server) -> None:
    response = httpx.post(
        f"{strict_server.url}/generate",
        content=in_chunks(multipart_body(b"x", GOOD_IMAGE[1])),
        headers={"content-type": "multipart/form-data; boundary=x"},
        timeout=120,
    )
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.request.headers
    assert response.status_code == 200, response.text
    assert decode(response.content).size == (64, 64)


def test_a_chunked_upload_past_the_limit_is_refused_as_it_arrives(strict_server: Server) -> None:
    body = multipart_body(b"x", GOOD_IMAGE[1] + b"\0" * (1024 * 1024))
    response = httpx.post(
        f"{strict_server.url}/generate",
        content=in_chunks(body),
        headers={"content-type": "multipart/form-data; boundary=x"},
        timeout=60,
    )
    assert response.status_code == 413
    assert response.json() == {
        "error": "request body is over 1048576 bytes, the most this server reads"
    }


def test_a_chunked_upload_that_also_declares_a_length_is_counted(strict_server: Server) -> None:
    # The server reads the chunks, whatever Content-Length says: the length passed the
    # check, and 300 MiB of chunks were read before.
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(part), part)
        for part in (multipart_body(b"x", GOOD_IMAGE[1] + b"\0" * (2 * 1024 * 1024)),)
    )
    head = (
        b"POST /generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 0\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=60) as sock:
        # Past the limit, and no further: the server answers and closes as soon as it is.
        sock.sendall(head + chunks[: 1536 * 1024])
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]


def test_the_boundary_parameter_is_read_whatever_its_case(strict_server: Server) -> None:
    response = httpx.post(
        f"{strict_server.url}/generate",
        content=multipart_body(b"X", GOOD_IMAGE[1]),
        headers={"content-type": "multipart/form-data; BOUNDARY=X"},
        timeout=120,
    )
    assert response.status_code == 200, response.text


def test_a_wrong_content_type_is_refused(strict_server: Server) -> None:
    response = httpx.post(
        f"{strict_server.url}/generate", content=b"<xml/>", headers={"content-type": "text/xml"}
    )
    assert 400 <= response.status_code < 500


def test_the_server_still_serves_after_all_that(strict_server: Server) -> None:
    response = post(strict_server, {"image": GOOD_IMAGE, "params": GOOD_PARAMS})
    assert response.status_code == 200
    assert decode(response.content).size == (64, 64)


def gpu_worker(server: Server) -> psutil.Process:
    (worker,) = [
        proc
        for proc in server.process_info().children(recursive=True)
        if "SDXLControlNetService" in " ".join(proc.cmdline())
    ]
    return worker


def test_a_gpu_worker_dying_mid_request_gives_a_503_then_recovers(strict_server: Server) -> None:
    async def scenario() -> tuple[httpx.Response, float]:
        async with httpx.AsyncClient(timeout=120) as client:
            started = strict_server.generations_started()
            request = asyncio.create_task(
                client.post(
                    f"{strict_server.url}/generate",
                    files={"image": GOOD_IMAGE, "params": (None, json.dumps(LONG))},
                )
            )
            await asyncio.to_thread(strict_server.wait_generating, started)
            gpu_worker(strict_server).kill()
            start = time.monotonic()
            response = await request
            return response, time.monotonic() - start

    with strict_server.slow_steps(STEP_S):
        response, waited = asyncio.run(scenario())
    assert response.status_code == 503
    assert "GPU Service is unavailable" in response.json()["error"]
    assert waited < 10  # a clear answer, not a hang

    # The front stays alive meanwhile, and BentoML restarts the GPU worker.
    assert httpx.get(f"{strict_server.url}/livez", timeout=5).status_code == 200
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        response = post(strict_server, {"image": GOOD_IMAGE, "params": GOOD_PARAMS})
        if response.status_code == 200:
            break
        time.sleep(0.3)
    assert response.status_code == 200


def test_a_client_that_disconnects_stops_its_generation(strict_server: Server) -> None:
    """An abandoned generation must not hold the GPU: a request sent right after it is
    answered long before the abandoned one could have finished."""

    async def abandon() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            started = strict_server.generations_started()
            request = asyncio.create_task(
                client.post(
                    f"{strict_server.url}/generate",
                    files={"image": GOOD_IMAGE, "params": (None, json.dumps(LONG))},
                )
            )
            await asyncio.to_thread(strict_server.wait_generating, started)
            request.cancel()  # the connection closes mid-generation
            with pytest.raises(asyncio.CancelledError):
                await request

    quick = {"image": GOOD_IMAGE, "params": (None, json.dumps(FAST))}
    with strict_server.slow_steps(STEP_S):
        asyncio.run(abandon())
        start = time.monotonic()
        response = post(strict_server, quick)
        waited_s = time.monotonic() - start
    assert response.status_code == 200
    held_s = LONG["num_inference_steps"] * STEP_S
    assert waited_s < held_s / 4, f"waited {waited_s:.1f} s behind the abandoned generation"
    assert "generation canceled" in strict_server.log.read_text()


@pytest.mark.restarts
def test_a_request_in_flight_finishes_when_the_server_is_stopped() -> None:
    params = {"prompt": "x", "num_inference_steps": 6, "width": 256, "height": 256}
    with (
        serving() as srv,
        srv.slow_steps(STEP_S),
        concurrent.futures.ThreadPoolExecutor() as pool,
    ):
        started = srv.generations_started()
        in_flight = pool.submit(post_generate, srv.url, GOOD_IMAGE[1], params)
        srv.wait_generating(started)
        srv.process_info().terminate()  # what `docker stop` or Kubernetes sends
        response = in_flight.result()
    assert response.status_code == 200
    assert decode(response.content).size == (256, 256)
