"""What a client sends is read only as the API documents it, and costs memory in proportion
to what it sent: no spelling of a foreign media type gets its body read (BentoML would
unpickle one), and no picture's aspect ratio makes the front build an array larger than
the picture or the output."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from devtools.harness import Server, encode, shapes_image

pytestmark = pytest.mark.e2e


class _TouchesMarker:
    """A pickle that creates ``path`` when it is loaded: proof that a body was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


# Every route of the front that reads a body, with the method it takes.
ROUTES = [
    ("POST", "/generate"),
    ("POST", "/generate_batch"),
    ("POST", "/generate_stream"),
    ("POST", "/canny"),
    ("POST", "/generate_task"),
    ("POST", "/generate_task/submit"),
    ("POST", "/generate_task/retry?task_id=x"),
    ("PUT", "/generate_task/cancel?task_id=x"),
]
PICKLE = b"application/vnd.bentoml+pickle"
ONE_CONTENT_TYPE = "send one Content-Type header, not several"
# The pickle media type as clients may spell it: around it whatever str.strip() removes
# (non-breaking space, NEL, the information separators), other cases, parameters.
SPELLINGS = [
    PICKLE,
    b"\xa0" + PICKLE,
    b"\x85" + PICKLE,
    *(bytes([c]) + PICKLE for c in range(0x1C, 0x20)),
    PICKLE + b"\xa0",
    b" \t" + PICKLE + b" ",
    PICKLE.upper(),
    PICKLE + b"; charset=utf-8",
    PICKLE + b";",
    b"\xa0" + PICKLE + b"\xa0; boundary=x",
    b"application/octet-stream",
    b"text/plain",
    b"application/json\xa0",
    b"\xa0application/json",
    b"application/ json",
]


def raw_request(
    server: Server, method: str, path: str, headers: list[bytes], body: bytes
) -> tuple[int, bytes]:
    """The status and body of a request sent byte for byte as given: HTTP clients would
    clean up or refuse the header values under test."""
    head = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
    head += [f"Content-Length: {len(body)}".encode(), *headers]
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status, _, rest = answer.partition(b"\r\n")
    return int(status.split(b" ", 2)[1]), rest.partition(b"\r\n\r\n")[2]


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("unpickled") / "marker"
    yield path
    assert not path.exists(), "a request body was unpickled on the server"


@pytest.mark.parametrize("spelling", SPELLINGS, ids=ascii)
@pytest.mark.parametrize(("method", "path"), ROUTES, ids=lambda value: value)
def test_no_spelling_of_a_foreign_media_type_is_read(
    server: Server, marker: Path, method: str, path: str, spelling: bytes
) -> None:
    body = pickle.dumps(_TouchesMarker(marker))
    status, answer = raw_request(server, method, path, [b"Content-Type: " + spelling], body)
    assert status == 415, (spelling, status, answer)
    assert b"Content-Type" in answer
    assert not marker.exists()


@pytest.mark.parametrize(("method", "path"), ROUTES[:2] + ROUTES[5:6])
def test_two_content_types_are_refused_whichever_comes_first(
    server: Server, marker: Path, method: str, path: str
) -> None:
    body = pickle.dumps(_TouchesMarker(marker))
    for first, second in [(PICKLE, b"application/json"), (b"application/json", PICKLE)]:
        headers = [b"Content-Type: " + first, b"Content-Type: " + second]
        status, answer = raw_request(server, method, path, headers, body)
        assert (status, json.loads(answer)["error"]) == (400, ONE_CONTENT_TYPE)
    assert not marker.exists()


def form(params: dict, boundary: bytes) -> bytes:
    """A multipart body with a 64² picture as ``image`` and ``params``."""
    return b"".join(
        [
            b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; '
            b'filename="in.png"\r\nContent-Type: image/png\r\n\r\n',
            encode(shapes_image(64, 64)),
            b"\r\n--" + boundary + b'\r\nContent-Disposition: form-data; name="params"\r\n\r\n',
            json.dumps(params).encode(),
            b"\r\n--" + boundary + b"--\r\n",
        ]
    )


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/canny", {"width": 64, "height": 64}),
        ("/generate", {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 1}),
    ],
)
def test_a_documented_media_type_is_read_in_any_case_and_with_parameters(
    server: Server, path: str, params: dict
) -> None:
    spelled = [b"Content-Type: \tMultipart/Form-Data ; boundary=b0undary"]
    status, answer = raw_request(server, "POST", path, spelled, form(params, b"b0undary"))
    assert status == 200, answer
    assert Image.open(io.BytesIO(answer)).size == (64, 64)


# Thin pictures: before they were cropped first, a 1×N picture covering W×H was resized to
# W×(N·W) and then cropped, and a 73-byte PNG could take a front worker's whole memory.
THIN = [(1, 256), (1, 4096), (1, 16384), (16384, 1)]
MAX_GROWTH = 200 * 2**20
# How far past its size at the test's start a front worker may map memory: a regression
# then fails one request instead of taking the machine's memory.
ADDRESS_SPACE_HEADROOM = 2**30


def thin_png(width: int, height: int, field: str) -> bytes:
    """White, with a black half where it is a picture (a mask repaints where it is white)."""
    pixels = Image.new("RGB", (width, height), "white")
    if field != "mask":
        pixels.paste((0, 0, 0), (0, 0, max(1, width // 2), max(1, height // 2)))
    return encode(pixels)


@contextlib.contextmanager
def bounded_fronts(server: Server) -> Iterator[list[psutil.Process]]:
    """The front workers, each with an address-space limit near its size and its peak
    resident memory reset; the limits are lifted afterwards."""
    fronts = server.workers("ControlNet")
    assert len(fronts) >= 2
    limits = {}
    for front in fronts:
        limits[front] = front.rlimit(psutil.RLIMIT_AS)
        bound = front.memory_info().vms + ADDRESS_SPACE_HEADROOM
        front.rlimit(psutil.RLIMIT_AS, (bound, limits[front][1]))
        Path(f"/proc/{front.pid}/clear_refs").write_text("5")
    try:
        yield fronts
    finally:
        for front, limit in limits.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                front.rlimit(psutil.RLIMIT_AS, limit)


def peak_growth(front: psutil.Process, start_rss: int) -> int:
    status = Path(f"/proc/{front.pid}/status").read_text()
    peak_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    return peak_kb * 1024 - start_rss


def thin_request(field: str, picture: bytes) -> tuple[str, dict]:
    """A request carrying ``picture`` in ``field``, the rest ordinary, at a set size."""
    params = {"prompt": "x", "num_inference_steps": 2, "width": 256, "height": 256}
    files = {"image": ("in.png", encode(shapes_image(256, 256)), "image/png")}
    if field == "canny":
        params = {"width": 1024, "height": 1024}
        files["image"] = ("thin.png", picture, "image/png")
        return "/canny", {"files": files, "data": {"params": json.dumps(params)}}
    if field == "control":
        params["controls"] = [{"type": "canny", "image": "thin"}]
    files[{"control": "thin"}.get(field, field)] = ("thin.png", picture, "image/png")
    return "/generate", {"files": files, "data": {"params": json.dumps(params)}}


@pytest.mark.parametrize("field", ["canny", "image", "init_image", "mask", "control"])
def test_a_thin_picture_costs_no_more_memory_than_its_size(server: Server, field: str) -> None:

    with bounded_fronts(server) as fronts, httpx.Client(base_url=server.url, timeout=120) as c:
        start = {front: front.memory_info().rss for front in fronts}
        for width, height in THIN:
            path, request = thin_request(field, thin_png(width, height, field))
            answer = c.post(path, **request)
            assert answer.status_code in (200, 400), (width, height, answer.text)
            if answer.status_code == 400:
                assert "image" in answer.json()["error"] or "mask" in answer.json()["error"]
        growth = {front.pid: peak_growth(front, rss) for front, rss in start.items()}
    assert all(front.is_running() for front in fronts)
    assert max(growth.values()) <= MAX_GROWTH, {p: g / 2**20 for p, g in growth.items()}


def peak_rss(front: psutil.Process) -> int:
    return peak_growth(front, 0)


def test_concurrent_large_transparent_pictures_stay_within_a_worker_s_budget(
    server: Server,
) -> None:
    """12 concurrent /canny of 4096² RGBA pictures: each front worker stays well under
    1.5 GB (each took 1.3 GB when every picture was decoded at once into four full RGBA
    copies), and every answer is a 200, or a 429 or 503 that says when to retry."""
    picture = encode(shapes_image(4096, 4096, "RGBA"))
    with bounded_fronts(server) as fronts, ThreadPoolExecutor(12) as pool:
        answers = list(
            pool.map(
                lambda _: httpx.post(
                    f"{server.url}/canny",
                    files={"image": ("big.png", picture, "image/png")},
                    timeout=120,
                ),
                range(12),
            )
        )
        peaks = [peak_rss(front) for front in fronts]
    assert {a.status_code for a in answers} <= {200, 429, 503}, [a.text for a in answers]
    assert any(a.status_code == 200 for a in answers)
    assert all("retry-after" in a.headers for a in answers if a.status_code != 200)
    assert max(peaks) < 1.1 * 2**30, [p / 2**20 for p in peaks]
