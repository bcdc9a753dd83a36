"""A bounded load test on loopback: 100 requests at concurrency 16 through both
Services, every one answered, none lost, no 5xx, health checks answering."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from devtools.harness import ROOT, Server, encode, shapes_image

pytestmark = pytest.mark.e2e

REQUESTS = 100
CONCURRENCY = 16


async def run_load(server: Server) -> dict:
    image = encode(shapes_image(64, 64))
    params = json.dumps({"prompt": "x", "num_inference_steps": 2})
    limit = asyncio.Semaphore(CONCURRENCY)
    statuses: list[int] = []
    health_s: list[float] = []
    peak_rss = {proc.pid: 0 for proc in server.process_info().children(recursive=True)}

    async with httpx.AsyncClient(timeout=120) as client:

        async def one() -> None:
            async with limit:
                response = await client.post(
                    f"{server.url}/generate",
                    files={"image": ("in.png", image, "image/png")},
                    data={"params": params},
                )
                statuses.append(response.status_code)

        async def watch() -> None:
            while len(statuses) < REQUESTS:
                start = time.monotonic()
                assert (await client.get(f"{server.url}/livez")).status_code == 200
                health_s.append(time.monotonic() - start)
                for proc in server.process_info().children(recursive=True):
                    peak_rss[proc.pid] = max(peak_rss.get(proc.pid, 0), proc.memory_info().rss)
                await asyncio.sleep(0.2)

        start = time.monotonic()
        await asyncio.gather(watch(), *(one() for _ in range(REQUESTS)))
        elapsed = time.monotonic() - start

    names = {
        proc.pid: next(
            arg for arg in proc.cmdline() if arg in ("ControlNet", "SDXLControlNetService")
        )
        for proc in server.process_info().children(recursive=True)
    }
    return {
        "requests": REQUESTS,
        "concurrency": CONCURRENCY,
        "seconds": round(elapsed, 2),
        "requests_per_s": round(REQUESTS / elapsed, 2),
        "statuses": {str(code): statuses.count(code) for code in set(statuses)},
        "max_health_check_s": round(max(health_s), 3),
        "peak_rss_mb": {
            f"{names[pid]}:{pid}": round(rss / 2**20)
            for pid, rss in peak_rss.items()
            if pid in names
        },
    }


def test_every_request_is_answered_under_load(server: Server) -> None:
    report = asyncio.run(run_load(server))
    (ROOT / "test-artifacts" / "load-test.json").write_text(json.dumps(report, indent=2))
    assert report["statuses"] == {"200": REQUESTS}, report
    assert report["max_health_check_s"] < 2, report
    # The CPU tier stays small: no torch in the front's workers.
    front = [mb for name, mb in report["peak_rss_mb"].items() if name.startswith("ControlNet:")]
    assert front and max(front) < 300, report
