"""The job endpoints (``/generate_task/…``): the application's own, answered from the job
store (``jobs.py``) by ASGI middleware in front of BentoML's task routes, at BentoML's paths
and in its shapes, so that BentoML's clients work. Any worker answers for any job.

- ``submit`` reads the input as ``/generate_batch`` would, and refuses bad input with the
  400 it would give; an accepted job is stored, waiting, before its ``task_id`` leaves: a 429
  past ``JOB_QUEUE_MAX`` waiting jobs, a 507 past ``JOB_STORE_MAX_BYTES``. With
  ``Prefer: wait`` (RFC 7240; ``wait=N``, at most ``WAIT_MAX_S``) it answers once the job
  ended or N seconds passed, with the job's status, and its result once completed.
- ``status`` says what the store says: BentoML's fields, a waiting job's place in line, a
  running job's ``attempt``, ``progress`` and latest ``preview``, its webhook's state.
- ``get`` answers a completed job's result; a job without one is a 409 that says why.
- ``cancel`` cancels a waiting or running job (its runner sees it within
  ``job_runner.WATCH_S``): 200 with the job's status, 404 for an unknown job, 409 for one
  already ended.
- ``retry`` submits an ended job's input again, with its own webhook secret: a new job.

On BentoCloud these routes are served by BentoCloud's task queue, not by this server:
there, jobs are BentoCloud's (docs/api.md).
"""

from __future__ import annotations

import asyncio
import json
import time
import typing as t
import uuid

from bentoml.exceptions import BentoMLException
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import logs
from ..errors import ClientError, StoreUnreachable, error_response, validation_body
from ..middleware import ASGIApp, Receive, Scope, Send, replayed
from . import job_input, webhooks
from .jobs import CANCELED, COMPLETED, ENDED, FAILED, PENDING, Job, JobStore

logger = logs.logger(__name__)

# The longest a submit with ``Prefer: wait`` holds, as Replicate's API allows.
WAIT_MAX_S = 60
# How often a waiting submit looks at its job.
WAIT_POLL_S = 0.05

TaskEndpoint = t.Callable[[str, Request], t.Awaitable[Response]]


class JobEndpoints:
    def __init__(self, app: ASGIApp, service: t.Any, api: str, store: JobStore) -> None:
        self.app = app
        self.input_spec = service.apis[api].input_spec
        self.prefix = f"/{api}/"
        self.store = store
        # Every endpoint but submit names its task, read here once: ?task_id=.
        self.routes: dict[tuple[str, str], TaskEndpoint] = {
            ("GET", "status"): self.status,
            ("GET", "get"): self.get,
            ("PUT", "cancel"): self.cancel,
            ("POST", "retry"): self.retry,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        route = (scope.get("method", ""), path.removeprefix(self.prefix))
        submit = route == ("POST", "submit")
        if not path.startswith(self.prefix) or not (submit or route in self.routes):
            return await self.app(scope, receive, send)
        request = Request(scope, receive)
        task_id = request.query_params.get("task_id")
        try:
            if submit:
                answer = await self.submit(request)
            elif not task_id:
                answer = error_response(400, "task_id is required")
            else:
                answer = await self.routes[route](task_id, request)
        except StoreUnreachable as exc:
            answer = exc.response()
        await answer(scope, receive, send)

    async def submit(self, request: Request) -> Response:
        # middleware.BodyGuard, outside this one, lets only the media types the API reads by.
        reading = Request(request.scope, replayed(await request.body(), request.receive))
        try:
            stored, secret = await job_input.read(self.input_spec, reading)
        except ValidationError as exc:
            return JSONResponse(validation_body(exc), status_code=400)
        except ClientError as exc:
            return exc.response()
        except BentoMLException as exc:
            return error_response(exc.error_code, exc.message)
        return await self._stored(stored, secret, request)

    async def _stored(self, stored: bytes, secret: str | None, request: Request) -> Response:
        task_id = uuid.uuid4().hex
        try:
            job = await self.store.submit(task_id, stored, secret)
        except ClientError as exc:
            return exc.response()
        self.store.on_submit()
        if (wait_s := _prefer_wait(request.headers.get("prefer", ""))) is None:
            return JSONResponse({"task_id": task_id, "status": job.status})
        deadline = time.monotonic() + wait_s
        while job.status not in ENDED and time.monotonic() < deadline:
            await asyncio.sleep(WAIT_POLL_S)
            job = await self.store.get(task_id) or job
        return JSONResponse(_with_outcome(job))

    async def status(self, task_id: str, request: Request) -> Response:
        job = await self.store.get(task_id)
        return JSONResponse(job.status_body()) if job else _not_found(task_id)

    async def get(self, task_id: str, request: Request) -> Response:
        job = await self.store.get(task_id)
        if job is None:
            return _not_found(task_id)
        if job.status == COMPLETED:
            return Response(job.outcome, media_type="application/json")
        failure = json.loads(job.outcome) if job.status == FAILED and job.outcome else None
        return no_result(task_id, job.status, failure)

    async def cancel(self, task_id: str, request: Request) -> Response:
        job, before = await self.store.cancel(task_id)
        if job is None:
            return _not_found(task_id)
        if job.status != CANCELED:
            return error_response(409, f"task {task_id} is {job.status}: nothing to cancel")
        if before == PENDING:  # no runner has it: its webhook is told from here
            source = await self.store.source(task_id)
            try:
                if source is not None:
                    request = job_input.decode(self.input_spec, source.input, source.secret)
                    await webhooks.JobWebhook(request.params, self.store).ended(
                        webhooks.Outcome(job)
                    )
            except ValidationError as exc:  # validated at submit: only a changed server
                logger.warning("job %s: canceled, its webhook not told: %s", task_id, exc)
        return JSONResponse(job.status_body())

    async def retry(self, task_id: str, request: Request) -> Response:
        source = await self.store.source(task_id)
        if source is None:
            return _not_found(task_id)
        if source.job.status not in ENDED:
            message = f"task {task_id} is {source.job.status}: retry it once it ended"
            return error_response(409, message)
        try:  # as valid on this server as at its submit
            job_input.decode(self.input_spec, source.input, source.secret)
        except ValidationError as exc:
            return JSONResponse(validation_body(exc), status_code=400)
        return await self._stored(source.input, source.secret, request)


def _prefer_wait(prefer: str) -> float | None:
    """The seconds ``Prefer: wait`` or ``wait=N`` asks for (at most WAIT_MAX_S), or None."""
    for preference in prefer.split(","):
        name, _, value = preference.partition("=")
        if name.strip().lower() != "wait":
            continue
        value = value.strip().strip('"')
        seconds = int(value) if value.isascii() and value.isdigit() else WAIT_MAX_S
        return min(seconds, WAIT_MAX_S)
    return None


def _with_outcome(job: Job) -> dict[str, t.Any]:
    """A job's status, with its result once completed, or its failure once failed."""
    body = job.status_body()
    if job.status == COMPLETED and job.outcome:
        body["result"] = json.loads(job.outcome)
    elif job.status == FAILED and job.outcome:
        body["failure"] = json.loads(job.outcome)
    return body


def _not_found(task_id: str) -> Response:
    return error_response(404, f"task {task_id} not found")


def no_result(task_id: str, status: str, failure: dict[str, t.Any] | None) -> JSONResponse:
    """``/get`` of a job that has no result: a 409 that says why, in the one error shape;
    a failed job's answer carries the failure, as ``/generate_batch`` would have answered."""
    if status == CANCELED:
        message = f"task {task_id} was canceled: it has no result"
    elif status == FAILED:
        reason = (failure or {}).get("error", "see the server log")
        message = f"task {task_id} failed: {reason}"
    else:
        message = f"task {task_id} is {status}: its result is not ready; poll /status"
    return error_response(409, message, task_status=status, failure=failure)
