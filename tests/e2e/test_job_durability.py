"""Jobs outlive the processes that run them: a graceful restart and a SIGKILL of the whole
server keep every job, result and pending webhook, and a job whose worker was killed runs
again on another.
Each test stops and starts servers of its own, so `make test-tooling` runs them."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from standardwebhooks import Webhook

from devtools.harness import Server
from devtools.job_client import ENDED, PICTURE, killed, result, submit, wait_for
from devtools.receiver import receiving

pytestmark = [pytest.mark.e2e, pytest.mark.restarts]

QUICK = {"prompt": "a house", "num_inference_steps": 2, "width": 64, "height": 64}
SLOW = {**QUICK, "num_inference_steps": 8}
STEP_S = 0.4
LEASE_S = 2
SECRET = "whsec_" + base64.b64encode(b"a test key, not a secret!!").decode()


@contextlib.contextmanager
def serving(store: Path, port: int = 0, **env: str) -> Iterator[Server]:
    """`bentoml serve` on ``store``, with short leases; stopped gracefully afterwards."""
    env |= {"JOB_STORE_PATH": str(store), "JOB_LEASE_S": str(LEASE_S), "FRONT_WORKERS": "2"}
    server = Server(["serve", "."], env=env, port=port)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def killed_fronts(server: Server) -> None:
    """SIGKILL to every front worker; BentoML starts new ones."""
    fronts = server.workers("ControlNet")
    for front in fronts:
        os.kill(front.pid, signal.SIGKILL)
    psutil.wait_procs(fronts, timeout=10)


@pytest.mark.parametrize("stop", ["graceful", "SIGKILL"])
def test_a_restart_keeps_every_job_and_result(tmp_path: Path, stop: str) -> None:
    store = tmp_path / "jobs.db"
    with serving(store) as first:
        done = submit(first, {**QUICK, "seed": 1})
        kept = result(first, wait_for(first, done, ENDED)["task_id"])
        with first.slow_steps(STEP_S):
            running = submit(first, SLOW)
            waiting = [submit(first, SLOW) for _ in range(2)]
            wait_for(first, running, ("in_progress",))
            if stop == "SIGKILL":
                killed(first)
            else:
                first.stop()
        port = first.port
    with serving(store, port) as second:
        assert result(second, done) == kept
        ended = [wait_for(second, task_id, ENDED) for task_id in (running, *waiting)]
    assert [s["status"] for s in ended] == ["completed"] * 3
    # A graceful stop hands the job back uncounted, unless the GPU Service stopped under
    # it first (then its run counts, as a killed worker's does).
    assert ended[0]["attempt"] in ((1, 2) if stop == "graceful" else (2,))


def test_a_job_whose_front_workers_were_all_killed_still_ends(tmp_path: Path) -> None:
    with serving(tmp_path / "jobs.db") as server, server.slow_steps(STEP_S):
        task_id = submit(server, SLOW)
        wait_for(server, task_id, ("in_progress",))
        killed_fronts(server)
        # BentoML starts new front workers; one takes the job once its lease has lapsed.
        ended = wait_for(server, task_id, ENDED, timeout_s=LEASE_S + 120)
    assert (ended["status"], ended["attempt"]) == ("completed", 2)


def test_a_pending_webhook_survives_a_sigkill_of_the_whole_server(tmp_path: Path) -> None:
    env = {"WEBHOOK_ALLOW": "127.0.0.1", "WEBHOOK_SECRET": SECRET}
    store = tmp_path / "jobs.db"
    with receiving(PICTURE) as receiver:
        receiver.answers = [(503, {"Retry-After": "4"})]
        with serving(store, **env) as first:
            submit(first, {**QUICK, "webhook": f"{receiver.url}/hook"})
            receiver.wait_for(1)
            killed(first)  # the delivery waits for its next try: nothing saves it
        with serving(store, **env):
            (_, adopted) = receiver.wait_for(2, timeout_s=60)
        deliveries = receiver.deliveries
    assert [d.status for d in deliveries] == [503, 200]
    assert deliveries[0].headers["webhook-id"] == adopted.headers["webhook-id"]
    assert Webhook(SECRET).verify(adopted.body, adopted.headers)["data"]["status"] == "completed"


def test_a_job_out_of_attempts_fails_saying_why_and_its_webhook_says_so(tmp_path: Path) -> None:
    env = {"WEBHOOK_ALLOW": "127.0.0.1", "WEBHOOK_SECRET": SECRET, "JOB_MAX_ATTEMPTS": "1"}
    with (
        receiving(PICTURE) as receiver,
        serving(tmp_path / "jobs.db", **env) as server,
        server.slow_steps(STEP_S),
    ):
        task_id = submit(server, {**SLOW, "webhook": f"{receiver.url}/hook"})
        wait_for(server, task_id, ("in_progress",))
        killed_fronts(server)
        ended = wait_for(server, task_id, ENDED, timeout_s=LEASE_S + 60)
        (delivery,) = receiver.wait_for(1, timeout_s=30)
    assert ended["status"] == "failed"
    reason = "the job's worker stopped during each of its 1 runs (JOB_MAX_ATTEMPTS)"
    data = Webhook(SECRET).verify(delivery.body, delivery.headers)["data"]
    assert (data["task_id"], data["status"]) == (task_id, "failed")
    assert data["error"]["error"].startswith(reason)
