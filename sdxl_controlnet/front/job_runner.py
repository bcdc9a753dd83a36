"""Each front worker's runner of jobs: it claims the oldest waiting job from the store
(``jobs.py``) when the store says a GPU slot is free, runs it as ``/generate_batch`` would,
and records its steps, latest preview and outcome there.

While a job runs, the runner looks at its row every ``WATCH_S``: a cancel (sent to any
worker) stops the GPU call within that time, and the lease is renewed every third of
``JOB_LEASE_S``. A GPU Service that is busy puts the job back at the head of the line:
a job waits for the GPU, it never fails for it. At a graceful stop the runner hands its
jobs back; a worker that dies lets their leases lapse, and another worker runs them again.

An idle runner asks the store for a job at once when its worker stores one or ends one,
and otherwise every ``IDLE_POLL_S``: what only a poll finds (a lapsed lease, a job handed
back by a worker that stopped, one put back in line by a busy GPU) can wait that long, and
an idle front costs its store little. A slot freed by a cancel is claimed once the canceled
run has stopped on the GPU (within ``WATCH_S``) and its runner is woken by its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import socket
import time
import typing as t
import uuid

from .. import logs
from ..cancellation import stopped
from ..errors import ClientError, GPUServiceUnavailable, ServiceBusy, StoreUnreachable
from ..metrics import JOB_WAIT, JOBS_RUNNING, JOBS_WAITING
from ..settings import settings
from . import gpu_call, job_input, webhooks
from .jobs import CANCELED, COMPLETED, FAILED, IN_PROGRESS, SERVER_FAILURE, Claimed, JobStore

logger = logs.logger(__name__)

# How often an idle runner asks for a job unwoken, and a running one looks for a cancel.
IDLE_POLL_S = 1.0
WATCH_S = 0.25
# How often the job counts on /metrics are refreshed.
COUNT_S = 1.0
# How long a runner whose job met a busy GPU waits before it asks for a job again.
BUSY_BACKOFF_S = 1.0
# How often a job's end is tried again while the store cannot be reached.
END_RETRY_S = 1.0


class JobRunner:
    """Runs the store's jobs on ``controlnet_service`` (what ``bentoml.depends`` gave),
    reading each one's input through ``input_spec``, the job API's input model."""

    def __init__(self, store: JobStore, controlnet_service: t.Any, input_spec: t.Any) -> None:
        self.store = store
        self.controlnet_service = controlnet_service
        self.input_spec = input_spec
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.running: dict[str, asyncio.Task[None]] = {}
        self.serving: asyncio.Future[t.Any] | None = None
        self.wake = asyncio.Event()  # a job was stored here, or one ended here

    def start(self) -> None:
        """Run jobs, and deliver their webhooks, those of workers that are gone included."""
        self.store.on_submit = self.wake.set
        outbox = self.store.outbox
        self.serving = asyncio.gather(self.serve(), self.count(), webhooks.keep_outbox(outbox))

    async def serve(self) -> None:
        while True:
            try:
                claimed, failed = await self.store.claim(self.owner)
            except Exception:
                logger.exception("jobs: the store could not be read; trying again")
                claimed, failed = None, []
            for job in failed:
                try:
                    await self.gave_up(job)
                except Exception:
                    logger.exception("job %s: its webhook could not be told", job.job.task_id)
            if claimed is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), IDLE_POLL_S)
                self.wake.clear()
                continue
            if claimed.job.attempt == 1 and claimed.job.executed_at is not None:
                JOB_WAIT.observe(claimed.job.executed_at - claimed.job.created_at)
            task = asyncio.create_task(self.run(claimed))
            self.running[claimed.job.task_id] = task
            task.add_done_callback(functools.partial(self._done, claimed.job.task_id))

    async def count(self) -> None:
        """Keep ``/metrics``' counts of waiting and running jobs, the whole store's: what
        an autoscaler of the GPU Service reads."""
        while True:
            try:
                waiting, running = await self.store.counts()
            except Exception:
                logger.exception("jobs: the store could not be counted; trying again")
            else:
                JOBS_WAITING.set(waiting)
                JOBS_RUNNING.set(running)
            await asyncio.sleep(COUNT_S)

    def _done(self, task_id: str, task: asyncio.Task[None]) -> None:
        # Not a later run of the same job: one put back in line (a busy GPU) may be claimed
        # again while this run waits out its backoff.
        if self.running.get(task_id) is task:
            del self.running[task_id]
        self.wake.set()  # its GPU slot is free: the next job need not wait for a poll

    async def gave_up(self, failed: Claimed) -> None:
        """Tell the webhook of a job failed after its last attempt's worker died."""
        logger.error(
            "job %s failed: its worker stopped during each of its runs", failed.job.task_id
        )
        params = job_input.decode(self.input_spec, failed.input, failed.secret).params
        failure = json.loads(failed.job.outcome) if failed.job.outcome else None
        await webhooks.JobWebhook(params, self.store).ended(
            webhooks.Outcome(failed.job, failure=failure)
        )

    async def stop(self) -> None:
        """Stop asking for jobs, stop the ones under way and hand them back to the line."""
        if self.serving is not None:
            self.serving.cancel()
        held = list(self.running.items())
        for _, task in held:
            task.cancel()
        await asyncio.gather(*(task for _, task in held), return_exceptions=True)
        for task_id, _ in held:
            if await self.store.requeue(task_id, self.owner):
                logger.info("job %s handed back to the line: this worker is stopping", task_id)
        await webhooks.save_pending(self.store.outbox)

    async def run(self, claimed: Claimed) -> None:
        """Run one claimed job to its end, or until it is canceled or handed back."""
        task_id = claimed.job.task_id
        try:
            request = job_input.decode(self.input_spec, claimed.input, claimed.secret)
        except Exception as exc:  # validated at submit: only a changed server gets here
            logger.warning("job %s: its stored input is no longer valid: %s", task_id, exc)
            await self.store.end(task_id, self.owner, FAILED, SERVER_FAILURE)
            return
        hook = webhooks.JobWebhook(request.params, self.store)
        hook.started(claimed.job)
        last_write = 0.0

        async def progress(kind: str, event: dict[str, t.Any]) -> None:
            nonlocal last_write
            # Progress is for show: one a store that is down missed, the next step writes.
            with contextlib.suppress(StoreUnreachable):
                if kind == "preview":  # at most one every preview_every steps: each is kept
                    await self.store.record_preview(task_id, event["step"], event["image"])
                    return
                hook.progressed(claimed.job, event["step"], event["total"])
                if event["step"] < event["total"] and time.monotonic() - last_write < WATCH_S:
                    return
                last_write = time.monotonic()
                await self.store.record_step(task_id, event["step"], event["total"])

        async def ended(status: str, result: t.Any = None, failure: t.Any = None) -> None:
            outcome = result.model_dump(mode="json") if result is not None else failure
            if not await self._end(task_id, status, outcome):
                return  # canceled meanwhile, or taken over: whoever did tells the webhook
            job = await self.store.get(task_id)
            assert job is not None, "ended above"
            await hook.ended(webhooks.Outcome(job, result, failure))

        pictures = (request.image, request.params, request.init_image, request.mask)
        generation = gpu_call.batch_result(self.controlnet_service, *pictures, progress)
        work = asyncio.ensure_future(generation)
        try:
            status = await self._watch(task_id, work)
            if status == CANCELED:
                job = await self.store.get(task_id)
                logger.info("job %s canceled: its generation stopped", task_id)
                if job is not None:
                    await hook.ended(webhooks.Outcome(job))
                return
            if status is None:
                logger.warning("job %s: its lease lapsed, another worker runs it", task_id)
                return
            result = work.result()
        except ServiceBusy as exc:
            await self.store.requeue(task_id, self.owner)
            logger.info("job %s back in line: %s", task_id, exc.message)
            await asyncio.sleep(BUSY_BACKOFF_S)
        except GPUServiceUnavailable as exc:
            # Stopping with this server, or brought down: run again, as after a dead
            # worker, until the job's attempts are used up.
            if claimed.job.attempt >= settings.job_max_attempts:
                await ended(FAILED, failure=exc.body_with_status())
                return
            await self.store.requeue(task_id, self.owner, counted=True)
            logger.warning("job %s back in line: %s", task_id, exc.message)
            await asyncio.sleep(BUSY_BACKOFF_S)
        except ClientError as exc:
            await ended(FAILED, failure=exc.body_with_status())
        except Exception:
            logger.exception("job %s failed", task_id)
            await ended(FAILED, failure=SERVER_FAILURE)
        else:
            await ended(COMPLETED, result=result)
        finally:
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work

    async def _end(self, task_id: str, status: str, outcome: t.Any) -> bool:
        """The store's ``end``, tried again while the store cannot be reached, for as long
        as the job's lease holds: a result is not lost to a store's short outage."""
        deadline = time.monotonic() + settings.job_lease_s
        while True:
            try:
                return await self.store.end(task_id, self.owner, status, outcome)
            except StoreUnreachable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(END_RETRY_S)

    async def _watch(self, task_id: str, work: asyncio.Future[t.Any]) -> str | None:
        """Wait for ``work``, renewing the job's lease; stop it if the job is canceled or
        the lease lost. The job's status then (IN_PROGRESS once the work is done). A store
        that cannot be reached stops nothing: the lease holds ``JOB_LEASE_S``."""
        renewed, status = time.monotonic(), IN_PROGRESS

        async def ended() -> bool:
            nonlocal renewed, status
            renew = time.monotonic() - renewed > settings.job_lease_s / 3
            try:
                status = await self.store.watch(task_id, self.owner, renew)
            except StoreUnreachable:
                return False
            if renew:
                renewed = time.monotonic()
            return status != IN_PROGRESS

        return status if await stopped(work, ended, WATCH_S) else IN_PROGRESS
