"""The job endpoints as the tests that stop, kill and share servers call them: over plain
HTTP, with one small picture, each answer checked."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import typing as t

import httpx
import psutil

from devtools.harness import Server, encode, shapes_image

PICTURE = encode(shapes_image(64, 64))
ENDED = ("completed", "failed", "canceled")


class Served(t.Protocol):
    """A server under test, or a Compose project's front: what answers at ``url``."""

    url: str


def submitted(
    server: Served, params: dict, headers: dict | None = None, timeout_s: float = 90
) -> httpx.Response:
    """The answer to a submit of ``params`` with the small picture, whatever it is."""
    return httpx.post(
        f"{server.url}/generate_task/submit",
        files={"image": ("in.png", PICTURE, "image/png")},
        data={"params": json.dumps(params)},
        headers=headers,
        timeout=timeout_s,
    )


def submit(server: Served, params: dict) -> str:
    """The task id of a submit of ``params``, which must be taken."""
    answer = submitted(server, params, timeout_s=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["task_id"]


def status(server: Served, task_id: str) -> dict:
    answer = httpx.get(f"{server.url}/generate_task/status", params={"task_id": task_id})
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait_for(server: Served, task_id: str, statuses: tuple[str, ...], timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while (now := status(server, task_id))["status"] not in statuses:
        assert time.monotonic() < deadline, now
        time.sleep(0.1)
    return now


def result(server: Served, task_id: str) -> dict:
    answer = httpx.get(f"{server.url}/generate_task/get", params={"task_id": task_id})
    assert answer.status_code == 200, answer.text
    return answer.json()


def cancel(server: Served, task_id: str) -> dict:
    answer = httpx.put(f"{server.url}/generate_task/cancel", params={"task_id": task_id})
    assert answer.status_code == 200, answer.text
    return answer.json()


def killed(server: Server) -> None:
    """SIGKILL to the server and every process under it: nothing runs its shutdown."""
    tree = [server.process_info(), *server.process_info().children(recursive=True)]
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            os.kill(process.pid, signal.SIGKILL)
    psutil.wait_procs(tree, timeout=10)
    server.process.wait()
