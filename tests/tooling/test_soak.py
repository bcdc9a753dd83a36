"""Minutes of mixed traffic against `bentoml serve` with two front workers, as users run
it: four clients mixing text-to-image, image-to-image, inpainting, streams, jobs (some
canceled), `/canny` and bad uploads. No answer may be a 5xx or a dropped connection.
Each process's memory at the start and the end is printed, to read a leak from.

``SOAK_S`` sets the duration (300 s by default, as `make test-tooling` runs it)."""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from devtools.harness import Server, encode, photo, serving, shapes_image

pytestmark = pytest.mark.e2e

SOAK_S = float(os.environ.get("SOAK_S", "300"))
CLIENTS = 4
CONTROL = encode(shapes_image(96, 64))
START = encode(photo(96, 64))
MASK = encode(shapes_image(96, 64, mode="L"))


@pytest.fixture(scope="module")
def soak_server() -> Iterator[Server]:
    with serving({"FRONT_WORKERS": "2"}) as srv:
        yield srv


def memory_mb(server: Server) -> dict[str, float]:
    """Resident memory of each process of the server, by its role."""
    processes = [server.process_info(), *server.process_info().children(recursive=True)]
    sizes: dict[str, float] = {}
    for process in processes:
        args = process.cmdline()
        role = args[args.index("--service-name") + 1] if "--service-name" in args else "serve"
        if "--worker-id" in args:
            role += f"#{args[args.index('--worker-id') + 1]}"
        sizes[role] = round(process.memory_info().rss / 2**20, 1)
    return sizes


def post(client: httpx.Client, path: str, params: dict, **pictures: bytes) -> httpx.Response:
    files = {"image": ("in.png", CONTROL, "image/png")}
    files |= {name: (f"{name}.png", data, "image/png") for name, data in pictures.items()}
    return client.post(path, files=files, data={"params": json.dumps(params)})


def job(client: httpx.Client, rng: random.Random) -> httpx.Response:
    submitted = post(
        client, "/generate_task/submit", {"prompt": "a house", "num_inference_steps": 4}
    )
    if submitted.status_code != 200:
        return submitted
    task_id = submitted.json()["task_id"]
    if rng.random() < 0.3:
        return client.put("/generate_task/cancel", params={"task_id": task_id})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = client.get("/generate_task/status", params={"task_id": task_id})
        if status.status_code != 200 or status.json()["status"] not in ("pending", "in_progress"):
            break
        time.sleep(0.2)
    return client.get("/generate_task/get", params={"task_id": task_id})


def stream(client: httpx.Client) -> httpx.Response:
    files = {"image": ("in.png", CONTROL, "image/png")}
    params = {"prompt": "a house", "num_inference_steps": 3}
    with client.stream(
        "POST", "/generate_stream", files=files, data={"params": json.dumps(params)}
    ) as answer:
        body = answer.read().decode()
    assert answer.status_code != 200 or "event: result" in body or "event: error" in body
    return answer


REQUESTS: dict[str, Callable[[httpx.Client, random.Random], httpx.Response]] = {
    "text-to-image": lambda c, _: post(c, "/generate", {"prompt": "x", "num_inference_steps": 3}),
    "image-to-image": lambda c, _: post(
        c, "/generate_batch", {"prompt": "x", "num_inference_steps": 4, "strength": 0.5}
    ),
    "inpainting": lambda c, _: post(
        c, "/generate", {"prompt": "x", "num_inference_steps": 3}, init_image=START, mask=MASK
    ),
    "stream": lambda c, _: stream(c),
    "job": job,
    "canny": lambda c, _: post(c, "/canny", {"low_threshold": 50}),
    "bad upload": lambda c, _: c.post(
        "/generate",
        files={"image": ("in.png", b"not a picture", "image/png")},
        data={"params": "{}"},
    ),
}


def test_minutes_of_mixed_traffic_get_no_5xx(soak_server: Server) -> None:
    before = memory_mb(soak_server)
    deadline = time.monotonic() + SOAK_S
    outcomes: Counter[tuple[str, int]] = Counter()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=soak_server.url, timeout=120) as http:
            while time.monotonic() < deadline:
                kind = rng.choice(list(REQUESTS))
                outcomes[kind, REQUESTS[kind](http, rng).status_code] += 1

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))
    after = memory_mb(soak_server)

    print(f"\n{sum(outcomes.values())} requests from {CLIENTS} clients in {SOAK_S:.0f} s:")
    for (kind, status), count in sorted(outcomes.items()):
        print(f"  {kind:15} {status}: {count}")
    print("memory (MB), start -> end:")
    for role in sorted(before):
        print(f"  {role:28} {before[role]:8.1f} -> {after.get(role, 0):8.1f}")
    failures = {key: count for key, count in outcomes.items() if key[1] >= 500}
    assert not failures, failures
    assert psutil.pid_exists(soak_server.process.pid)
