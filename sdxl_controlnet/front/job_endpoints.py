"""BentoML's task endpoints (``/generate_task/…``), answered from the application's job
store (``jobs.py``): ASGI middleware in front of BentoML's local task server, which still
accepts each job and runs its body.

- ``submit`` reads the input first, and refuses bad input with the 400 ``/generate_batch``
  would give (BentoML's task server would store it unread, to fail later); an accepted job
  is in the job store before its ``task_id`` reaches the client, and its own webhook secret
  is not in what BentoML stores (``webhooks.held_apart``).
- ``status`` says what the job store says: BentoML's fields, and a running job's
  ``progress``.
- ``get`` answers a completed job's result; a job without one is a 409 that says why.
- ``cancel`` cancels a job in progress, which the worker running it sees within
  ``jobs.WATCH_S``: 200 with the job's status, 404 for an unknown job, 409 for one already
  ended.

None of them reads BentoML's task store: in BentoML 1.4.40 a read leaves its worker's
connection holding a snapshot, and that worker's next write fails with "database is
locked" once another worker has written (``tests/unit/test_bentoml_defects.py``).

On BentoCloud these endpoints are served by BentoCloud's task queue, not by this server:
there, only what the job's body does itself (webhooks) applies (docs/api.md).
"""

from __future__ import annotations

import json
import typing as t

from bentoml.exceptions import BentoMLException
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..bentoml_compat import request_reading
from ..errors import error_response, validation_body
from ..middleware import ASGIApp, Message, Receive, Scope, Send
from . import webhooks
from .jobs import CANCELED, COMPLETED, FAILED, IN_PROGRESS, Job, JobStore
from .references import FORMS


class JobEndpoints:
    def __init__(self, app: ASGIApp, service: t.Any, api: str, store: JobStore) -> None:
        self.app = app
        self.service = service
        self.api = api
        self.prefix = f"/{api}/"
        self.store = store
        self.answers = {("GET", "status"): self.status, ("GET", "get"): self.get}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith(self.prefix):
            return await self.app(scope, receive, send)
        action = (scope["method"], path.removeprefix(self.prefix))
        if action == ("POST", "submit"):
            return await self.submit(scope, receive, send)
        task_id = Request(scope).query_params.get("task_id")
        if action == ("PUT", "cancel") and task_id is not None:
            answer = await self.cancel(task_id)
        elif action in self.answers and task_id is not None:
            job = await self.store.get(task_id)
            answer = self.answers[action](job) if job else _not_found(task_id)
        else:  # no task_id, /retry: BentoML answers as it does
            return await self.app(scope, receive, send)
        await answer(scope, receive, send)

    async def submit(self, scope: Scope, receive: Receive, send: Send) -> None:
        # middleware.BodyGuard, outside this one, lets only the media types the API reads by.
        request = Request(scope, receive)
        body = await request.body()
        reading = Request(scope, _replay(body))
        try:
            read = await request_reading.read_input(self.service, self.api, reading)
        except ValidationError as exc:
            refusal = JSONResponse(validation_body(exc), status_code=400)
        except BentoMLException as exc:
            refusal = error_response(exc.error_code, exc.message)
        else:
            media_type = request.headers.get("content-type", "").partition(";")[0]
            form = await reading.form() if media_type in FORMS else None  # as read: cached
            params_as_sent = form.get("params") if form is not None else None
            body = webhooks.held_apart(body, media_type, params_as_sent, read.params)
            return await self.app(scope, _replay(body, then=receive), self._recording(send))
        await refusal(scope, receive, send)

    def _recording(self, send: Send) -> Send:
        """``send``, which stores an accepted job before its answer leaves."""
        start: Message | None = None

        async def record_then_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if start is not None and message["type"] == "http.response.body":
                if start["status"] == 200:
                    await self.store.submitted(json.loads(message["body"])["task_id"])
                await send(start)
                start = None
            await send(message)

        return record_then_send

    @staticmethod
    def status(job: Job) -> Response:
        return JSONResponse(job.status_body())

    @staticmethod
    def get(job: Job) -> Response:
        if job.status == COMPLETED:
            return Response(job.outcome, media_type="application/json")
        failure = json.loads(job.outcome) if job.status == FAILED and job.outcome else None
        return no_result(job.task_id, job.status, failure)

    async def cancel(self, task_id: str) -> Response:
        job = await self.store.cancel(task_id)
        if job is None:
            return _not_found(task_id)
        if job.status != CANCELED:
            return error_response(409, f"task {task_id} is {job.status}: nothing to cancel")
        return JSONResponse(job.status_body())


def _not_found(task_id: str) -> Response:
    return error_response(404, f"task {task_id} not found")


def _replay(body: bytes, then: Receive | None = None) -> Receive:
    """A ``receive`` that gives ``body`` once, then what ``then`` gives (a disconnect)."""
    given = False

    async def receive() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return receive


def no_result(task_id: str, status: str, failure: dict[str, t.Any] | None) -> JSONResponse:
    """``/get`` of a job that has no result: a 409 that says why, in the one error shape;
    a failed job's answer carries the failure, as ``/generate_batch`` would have answered."""
    if status == CANCELED:
        message = f"task {task_id} was canceled: it has no result"
    elif status == FAILED:
        reason = (failure or {}).get("error", "see the server log")
        message = f"task {task_id} failed: {reason}"
    else:
        message = f"task {task_id} is {IN_PROGRESS}: its result is not ready; poll /status"
    return error_response(409, message, task_status=status, failure=failure)
