"""The job endpoints in process, on a job store of their own: a stored job that this server no
longer accepts (a limit narrowed, say, between its submit and now) is canceled as any other,
and a retry of it is the 400 a submit of it would get, never a 500."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest

import service
from devtools.harness import encode, shapes_image
from sdxl_controlnet.front.job_endpoints import JobEndpoints
from sdxl_controlnet.front.stores.sqlite_store import SQLiteJobStore
from sdxl_controlnet.settings import settings

pytestmark = pytest.mark.anyio


async def not_for_bentoml(scope: dict, receive: object, send: object) -> None:
    raise AssertionError(f"{scope['path']} reached BentoML's routes")


async def test_a_job_this_server_no_longer_accepts_cancels_and_its_retry_is_a_400(
    tmp_path: Path,
) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.db")
    store.open()
    endpoints = JobEndpoints(not_for_bentoml, service.ControlNet, "generate_task", store)
    picture = base64.b64encode(encode(shapes_image(64, 64))).decode()
    params = {"prompt": "x", "num_inference_steps": settings.max_steps + 1}
    stored = {"params": params, "pictures": {"image": picture}}
    await store.submit("taken-before", json.dumps(stored).encode(), None)
    transport = httpx.ASGITransport(app=endpoints)
    async with httpx.AsyncClient(transport=transport, base_url="http://front") as client:
        canceled = await client.put("/generate_task/cancel", params={"task_id": "taken-before"})
        retried = await client.post("/generate_task/retry", params={"task_id": "taken-before"})
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["status"] == "canceled"
    assert retried.status_code == 400, retried.text
    assert retried.json()["error"].startswith("params.num_inference_steps:")
