"""Figures from a real `bentoml serve` of both Services on the tiny model."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime

import httpx

from bench.inprocess import file_bytes
from bench.report import Row, interleaved, timed_ms
from devtools.harness import Server, free_port, metric, photo, stop_process_tree, wait_until_ready
from sdxl_controlnet.front import preprocessing
from sdxl_controlnet.gpu.pipeline import ControlNetPipeline
from sdxl_controlnet.schemas import GenerationParams, GPURequest, Params

FAST = {"prompt": "bench", "num_inference_steps": 2, "seed": 1}
BURSTS = {1: 8, 4: 8, 16: 32}  # requests per burst, by concurrency


def start_server() -> tuple[Server, Row]:
    """A server, and the seconds from `bentoml serve` to a ready /readyz."""
    server = Server(["serve", "."], fault_hooks=False)
    try:
        return server, Row("cold start", "`bentoml serve` to ready", "s", [server.wait_ready()])
    except Exception:
        server.stop()
        raise


@contextlib.contextmanager
def shared_server(store_url: str) -> Iterator[Server]:
    """A second server, ready, whose jobs live in the Redis at ``store_url``."""
    server = Server(["serve", "."], env={"JOB_STORE_URL": store_url}, fault_hooks=False)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def bare_http() -> Iterator[str]:
    """The URL of `bench.bare_http`, ready: the floor under an HTTP hop."""
    url = f"http://127.0.0.1:{free_port()}"
    server = subprocess.Popen([sys.executable, "-m", "bench.bare_http", url.rpartition(":")[2]])
    try:
        wait_until_ready(url, lambda: server.poll() is None, lambda: f"exit {server.returncode}")
        yield url
    finally:
        stop_process_tree(server)


async def _post(client: httpx.AsyncClient, upload: bytes) -> httpx.Response:
    return await client.post(
        "/generate",
        files={"image": ("input.jpg", upload, "image/jpeg")},
        data={"params": json.dumps(FAST)},
    )


def _server_timing(response: httpx.Response) -> dict[str, float]:
    stages = (part.split(";dur=") for part in response.headers["server-timing"].split(", "))
    return {name: float(ms) for name, ms in stages}


# The GPU Service's own timers, on /metrics: waiting for the GPU, holding it, and the
# pipeline's call within that.
GPU_STAGES = {
    "queue wait": "sdxl_controlnet_queue_wait_seconds_sum",
    "turn": "sdxl_controlnet_generation_seconds_sum",
    "pipeline": "sdxl_controlnet_pipeline_seconds_sum",
}


def overhead_rows(server: Server, pipeline: ControlNetPipeline, runs: int) -> list[Row]:
    """A 512² request through both Services, against the pipeline called directly, interleaved;
    its overhead over the pipeline's call inside the GPU Service, and where that goes, stage
    by stage: the front's (Server-Timing), the GPU Service's (its /metrics, read between
    requests), and what lies between them. The two HTTP hops each have, as a baseline, as
    many bytes sent to and answered by a bare uvicorn (`bench.bare_http`): what is left above
    it is BentoML's and this application's."""
    image = photo(512, 512)
    upload = file_bytes(image, "JPEG")
    edges = preprocessing.edge_map(image, Params(**FAST))
    params = GenerationParams(**FAST)
    served, direct, overhead = [], [], []
    stages: dict[str, list[float]] = {}
    floors: dict[str, list[float]] = {FRONT_HOP: [], GPU_HOP: []}

    def gpu_timers() -> dict[str, float]:
        return {stage: metric(server, name) * 1000 for stage, name in GPU_STAGES.items()}

    async def measure(bare: str) -> None:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=300) as client,
            httpx.AsyncClient(base_url=bare, timeout=300) as floor,
        ):
            response = await _post(client, upload)  # warm both Services up, and the rest
            response.raise_for_status()
            pipeline.generate(GPURequest.of(params, edges))
            images_bytes = 3 * edges.size  # what the GPU Service answers: H×W×3 pixels
            hops = {
                FRONT_HOP: (_form(upload), len(response.content)),
                GPU_HOP: (bytes(edges.size), images_bytes),  # the edge map goes, pixels return
            }
            for _ in range(runs):
                before = gpu_timers()
                start = time.perf_counter()
                response = await _post(client, upload)
                served.append((time.perf_counter() - start) * 1000)
                response.raise_for_status()
                gpu = {stage: ms - before[stage] for stage, ms in gpu_timers().items()}
                overhead.append(served[-1] - gpu["pipeline"])
                for stage, ms in _stages(served[-1], _server_timing(response), gpu):
                    stages.setdefault(stage, []).append(ms)
                direct.append(timed_ms(lambda: pipeline.generate(GPURequest.of(params, edges))))
                for hop, (sent, answered) in hops.items():
                    start = time.perf_counter()
                    (await floor.post(f"/?answer={answered}", content=sent)).raise_for_status()
                    floors[hop].append((time.perf_counter() - start) * 1000)

    with bare_http() as bare:
        asyncio.run(measure(bare))
    return [
        Row("end to end", "512² steps=2 request (baseline: pipeline call)", "ms", served, direct),
        Row(
            "end to end",
            "512² overhead over the pipeline call inside the GPU Service",
            "ms",
            overhead,
            target=15,
            target_is_ratio=False,
        ),
        *(
            Row("overhead by stage", f"512²: {stage}", "ms", ms, floors.get(stage))
            for stage, ms in stages.items()
        ),
    ]


# The stages that are an HTTP hop, each measured beside its floor.
FRONT_HOP = "HTTP to and from the front (baseline: bare uvicorn)"
GPU_HOP = "call to the GPU Service and back (baseline: bare uvicorn)"


def _form(upload: bytes) -> bytes:
    """The multipart body `_post` sends."""
    request = httpx.Request(
        "POST",
        "http://front/generate",
        files={"image": ("input.jpg", upload, "image/jpeg")},
        data={"params": json.dumps(FAST)},
    )
    return request.read()


def _stages(
    served: float, front: dict[str, float], gpu: dict[str, float]
) -> list[tuple[str, float]]:
    """One request's overhead, split so that the stages add up to it: the HTTP exchange with
    the front (the client's side, the front's parse and answer), the front's stages but its
    GPU call, the call to the GPU Service and back (serialisation, transport), the GPU
    Service's queue, and its turn outside the pipeline's call (the worker, the thread hop)."""
    call = front.pop("generate")
    return [
        (FRONT_HOP, served - call - sum(front.values())),
        *((f"front: {name}", ms) for name, ms in front.items()),
        (GPU_HOP, call - gpu["queue wait"] - gpu["turn"]),
        ("GPU queue wait", gpu["queue wait"]),
        ("GPU turn outside the pipeline", gpu["turn"] - gpu["pipeline"]),
    ]


def throughput_rows(server: Server, pipeline: ControlNetPipeline, rounds: int) -> list[Row]:
    """Requests/s at concurrency 1, 4 and 16, against the pipeline's own rate (256², steps=2).

    Each round runs every concurrency once, with the pipeline's rate measured
    just before each burst, so a busy neighbour weighs on both alike."""
    image = photo(256, 256)
    upload = file_bytes(image, "JPEG")
    edges = preprocessing.edge_map(image, Params(**FAST))
    params = GenerationParams(**FAST)
    served: dict[int, list[float]] = {c: [] for c in BURSTS}
    direct: dict[int, list[float]] = {c: [] for c in BURSTS}
    failures = dict.fromkeys(BURSTS, 0)

    async def burst(concurrency: int) -> tuple[float, int]:
        """Requests/s with ``concurrency`` requests in flight, and how many failed."""
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:
            gate = asyncio.Semaphore(concurrency)

            async def one() -> bool:
                async with gate:
                    return (await _post(client, upload)).is_success

            start = time.perf_counter()
            ok = await asyncio.gather(*(one() for _ in range(BURSTS[concurrency])))
            return len(ok) / (time.perf_counter() - start), ok.count(False)

    # Warm-up, not counted: the first call at a new size sets up kernels.
    pipeline.generate(GPURequest.of(params, edges))
    asyncio.run(burst(1))
    front_cpu = _front_cpu_seconds(server)
    for _ in range(rounds):
        for concurrency in BURSTS:
            direct[concurrency].append(
                1000 / timed_ms(lambda: pipeline.generate(GPURequest.of(params, edges)))
            )
            rate, failed = asyncio.run(burst(concurrency))
            served[concurrency].append(rate)
            failures[concurrency] += failed

    requests = rounds * sum(BURSTS.values())
    front_ms = (_front_cpu_seconds(server) - front_cpu) * 1000 / requests
    pipeline_ms = [1000 / rate for rates in direct.values() for rate in rates]
    # CPU time is what the front spends, whatever else runs on the machine.
    rows = [
        Row(
            "throughput",
            "front CPU per request (baseline: pipeline call)",
            "ms",
            [front_ms],
            pipeline_ms,
        )
    ]
    for concurrency in BURSTS:
        name = f"concurrency {concurrency}"
        row = Row("throughput", name, "req/s", served[concurrency], direct[concurrency])
        row.note = f"pipeline busy {row.ratio:.0%}"
        if concurrency == 16:
            row.target, row.target_is_minimum = 0.9, True
        fails = [failures[concurrency]]
        rows += [
            row,
            Row(
                "throughput", f"{name}: failed", "requests", fails, target=0, target_is_ratio=False
            ),
        ]
    return rows


def _front_cpu_seconds(server: Server) -> float:
    """CPU seconds used so far by the front Service's worker processes."""
    processes = server.process_info().children(recursive=True)
    workers = [p for p in processes if "ControlNet" in p.cmdline()]  # --service-name ControlNet
    return sum(sum(p.cpu_times()[:2]) for p in workers)


JOB = {"prompt": "bench", "num_inference_steps": 4, "seed": 1, "width": 256, "height": 256}
WAITING = 64  # jobs submitted at once for the queue's rows
JOB_UPLOAD = file_bytes(photo(256, 256), "JPEG")


def job_rows(server: Server, shared: Server, runs: int, rounds: int) -> list[Row]:
    """What a job costs over the same work as ``/generate_batch`` (interleaved; the job
    answered through ``Prefer: wait``); and the queue with 64 jobs waiting, in the embedded
    store of ``server`` against the Redis of ``shared``, in alternate rounds: how long a
    submit takes to answer, and how long the next job takes to start once one has ended."""
    job_ms, batch_ms = interleaved(
        runs,
        lambda: _post_job(server, "/generate_task/submit", JOB, {"Prefer": "wait=60"}),
        lambda: _post_job(server, "/generate_batch", JOB),
    )
    overhead = Row("jobs", "a job, against /generate_batch", "ms", job_ms, batch_ms)
    overhead.target = 1.05
    submits: dict[Server, list[float]] = {server: [], shared: []}
    gaps: dict[Server, list[float]] = {server: [], shared: []}
    for _ in range(rounds):
        for served in (server, shared):
            more_submits, more_gaps = _queue_figures(served)
            submits[served] += more_submits
            gaps[served] += more_gaps
    return [
        overhead,
        Row(
            "jobs",
            f"submit, up to {WAITING} waiting: Redis (baseline: embedded store)",
            "ms",
            submits[shared],
            submits[server],
        ),
        Row(
            "jobs",
            f"next job's start after one ends, {WAITING} waiting: Redis (baseline: embedded)",
            "ms",
            gaps[shared],
            gaps[server],
        ),
    ]


def _post_job(
    server: Server, path: str, params: dict, headers: dict | None = None
) -> httpx.Response:
    files = {"image": ("input.jpg", JOB_UPLOAD, "image/jpeg")}
    data = {"params": json.dumps(params)}
    answer = httpx.post(f"{server.url}{path}", files=files, data=data, headers=headers)
    answer.raise_for_status()
    return answer


def _queue_figures(server: Server) -> tuple[list[float], list[float]]:
    """``WAITING`` quick jobs submitted at once: each submit's time to answer, and the gaps
    between one job's end and the next one's start, in milliseconds."""
    quick = {**JOB, "num_inference_steps": 1, "width": 64, "height": 64}
    submits: list[float] = []
    task_ids: list[str] = []
    for _ in range(WAITING):
        start = time.perf_counter()
        task_ids.append(_post_job(server, "/generate_task/submit", quick).json()["task_id"])
        submits.append((time.perf_counter() - start) * 1000)
    ended = [_ended(server, task_id) for task_id in task_ids]
    by_start = sorted(ended, key=lambda status: status["executed_at"])
    gaps = [
        (_moment(after["executed_at"]) - _moment(before["completed_at"])) * 1000
        for before, after in itertools.pairwise(by_start)
    ]
    return submits, gaps


def _ended(server: Server, task_id: str) -> dict:
    while True:
        status = httpx.get(f"{server.url}/generate_task/status", params={"task_id": task_id})
        if status.json()["status"] in ("completed", "failed", "canceled"):
            return status.json()
        time.sleep(0.1)


def _moment(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()
