"""Two replicas sharing one job store on a real Redis, as two hosts are: each a `bentoml
serve` of both Services with a BentoML home of its own. Any replica answers for any job, a
cancel sent to one stops the GPU work of the other, and the replica left alive ends the job
and delivers the webhooks of one that was killed.
The test starts and kills servers of its own, so `make test-tooling` runs it."""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Iterator

import pytest
import redis
from standardwebhooks import Webhook

from devtools.harness import Server, metric
from devtools.job_client import ENDED, cancel, killed, result, status, submit, wait_for
from devtools.receiver import receiving

pytestmark = [pytest.mark.e2e, pytest.mark.restarts]

QUICK = {"prompt": "a house", "num_inference_steps": 2, "width": 64, "height": 64}
STEP_S = 0.4
LONG = {**QUICK, "num_inference_steps": 20}  # 8 s of slowed steps
SLOW = {**QUICK, "num_inference_steps": 8}
LEASE_S = 2
SECRET = "whsec_" + base64.b64encode(b"a test key, not a secret!!").decode()


@contextlib.contextmanager
def replicas(redis_url: str, **env: str) -> Iterator[tuple[Server, Server]]:
    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()
    env |= {"JOB_STORE_URL": redis_url, "JOB_LEASE_S": str(LEASE_S), "FRONT_WORKERS": "2"}
    servers = [Server(["serve", "."], env=env) for _ in range(2)]
    try:
        for server in servers:
            server.wait_ready()
        yield servers[0], servers[1]
    finally:
        for server in servers:
            server.stop()


def gpu_calls_ended(server: Server) -> float:
    """GPU calls of ``server``'s GPU Service that let go of the GPU, however they ended."""
    return metric(server, "sdxl_controlnet_generation_seconds_count")


def running_on(servers: tuple[Server, Server], started: list[float]) -> Server:
    """The replica whose GPU Service started a generation since ``started`` was read."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for server, before in zip(servers, started, strict=True):
            if server.generations_started() > before:
                return server
        time.sleep(0.05)
    raise TimeoutError("no replica started the job's generation")


def test_any_replica_answers_cancels_and_takes_over_every_job(redis_url: str) -> None:
    env = {"WEBHOOK_ALLOW": "127.0.0.1", "WEBHOOK_SECRET": SECRET}
    with receiving() as receiver, replicas(redis_url, **env) as (a, b):
        # Submitted at A: B answers its status and result, as A does.
        done = submit(a, {**QUICK, "seed": 3})
        assert wait_for(b, done, ENDED)["status"] == "completed"
        assert result(b, done) == result(a, done)

        # Canceled at B: the replica running it lets go of its GPU within a second.
        with a.slow_steps(STEP_S), b.slow_steps(STEP_S):
            started = [a.generations_started(), b.generations_started()]
            long = submit(a, LONG)
            runner = running_on((a, b), started)
            ended_before = gpu_calls_ended(runner)
            canceled_at = time.monotonic()
            assert cancel(b, long)["status"] == "canceled"
            while gpu_calls_ended(runner) == ended_before:
                assert time.monotonic() - canceled_at < 10, "the GPU call never stopped"
                time.sleep(0.05)
            stopped_s = time.monotonic() - canceled_at
        assert stopped_s < 1.0 + STEP_S, f"the GPU held the canceled job {stopped_s:.2f} s"
        assert status(a, long)["status"] == "canceled"

        # Killed mid-job, its start message waiting for a retry: the other replica runs
        # the job again, and delivers that message under the webhook-id it had.
        receiver.answers = [(503, {"Retry-After": "3"})]
        hook = {"webhook": f"{receiver.url}/hook", "webhook_events": ["start", "completed"]}
        with a.slow_steps(STEP_S), b.slow_steps(STEP_S):
            started = [a.generations_started(), b.generations_started()]
            job = submit(b, {**SLOW, **hook})
            runner = running_on((a, b), started)
            survivor = b if runner is a else a
            receiver.wait_for(1)
            while status(survivor, job).get("progress", {}).get("step", 0) < 1:
                time.sleep(0.05)  # into its denoising steps
            killed(runner)
            killed_at = time.monotonic()
            ended = wait_for(survivor, job, ENDED, timeout_s=LEASE_S + 60)
            takeover_s = time.monotonic() - killed_at
        assert (ended["status"], ended["attempt"]) == ("completed", 2)
        # The lease, then the job's own 8 slowed steps and its start-up.
        assert takeover_s < LEASE_S + SLOW["num_inference_steps"] * STEP_S + 10
        deliveries = receiver.wait_for(4, timeout_s=30)
    ids = [d.headers["webhook-id"] for d in deliveries]
    first_start = f"msg_{job}_start_1"
    assert ids.count(first_start) == 2, ids  # its 503, then the survivor's try
    assert {f"msg_{job}_start_2", f"msg_{job}_completed"} <= set(ids)
    retried = [d for d in deliveries if d.headers["webhook-id"] == first_start]
    assert [d.status for d in retried] == [503, 200]
    data = Webhook(SECRET).verify(deliveries[-1].body, deliveries[-1].headers)["data"]
    assert data["task_id"] == job


def test_a_store_that_stops_answering_for_a_while_fails_no_job(redis_url: str) -> None:
    """Redis stops answering for longer than its clients wait (10 s), mid-job: every store
    call of the runner fails meanwhile, and the job still ends completed, on its first run."""
    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()
    server = Server(["serve", "."], env={"JOB_STORE_URL": redis_url, "FRONT_WORKERS": "2"})
    try:
        server.wait_ready()
        with server.slow_steps(STEP_S):
            job = submit(server, {**QUICK, "num_inference_steps": 40})  # 16 s of steps
            while status(server, job).get("progress", {}).get("step", 0) < 1:
                time.sleep(0.05)
            with redis.Redis.from_url(redis_url, socket_timeout=30) as client:
                client.execute_command("DEBUG", "SLEEP", 11)  # returns when Redis does
            ended = wait_for(server, job, ENDED, timeout_s=120)
        assert (ended["status"], ended["attempt"]) == ("completed", 1), ended
        assert "jobs: redis://127.0.0.1" in server.log.read_text()  # the outage was seen
    finally:
        server.stop()
