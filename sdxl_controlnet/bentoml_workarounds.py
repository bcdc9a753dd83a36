"""Workarounds for upstream behaviour of BentoML 1.4.40, the version this project pins.

Each says what it works around, where it lives upstream, and how to tell that it is
no longer needed; ``tests/unit/test_bentoml_workarounds.py`` fails when one stops
taking effect. The patches are fenced: on another BentoML version ``apply()`` refuses
to start (``ALLOW_UNTESTED_BENTOML=1`` overrides it, for whoever has re-checked this
file), and on any version it checks the signature of each upstream function it patches
(``PATCHED``) and refuses to start on a mismatch, naming it: a changed function fails
at start, not as a 500 under traffic.

Handled with BentoML's public hooks, named here so that the list is whole:
- An upload whose Content-Type names no Pillow plugin (``image/jpg``) raises KeyError in
  ``PILImageEncoder.decode`` (``_bentoml_sdk/validators.py``): ``preprocessing._open``
  opens it from its bytes instead.
- 5xx messages are replaced with a generic one and response headers dropped
  (``_bentoml_impl/server/app.py``, ``api_endpoint_wrapper``): APIs answer their own
  errors with ``errors.answers_errors``.
- A multipart Content-Type without a boundary is a 500 inside BentoML's form parser:
  ``middleware.BodyGuard`` answers it with a 400 before BentoML reads the body.
- ``api_endpoint_wrapper`` answers a 4xx ``BentoMLException`` with a list,
  ``[{"error": ...}]`` (``detail = ({"error": str(exc)},)``), logging a stack trace;
  that includes the 415 to a pickle body, and a client error raised when
  ``IOMixin.to_http_response`` (``_bentoml_sdk/io_models.py``) asks a stream for its first
  chunk. Its validation errors read ``{"error": "1 validation error for Input", ...}``.
  ``middleware.ErrorBodies`` puts every error answer into one shape (``errors.in_shape``).
- ``ServiceAppFactory.readyz`` probes a dependency with ``AsyncClient.is_ready``
  (``_bentoml_impl/client/proxy2.py``), which catches only ``aiohttp.ServerTimeoutError``:
  the ``TimeoutError`` of its own 5 s limit (``runner_probe.timeout`` is not read) and a
  refused connection escape as a 500, and the answer is never released. The front turns
  ``runner_probe`` off and asks itself (``readiness.py``, its ``__is_ready__``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import logging
import typing as t

import bentoml
from bentoml.exceptions import BentoMLException
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import jobs, references, request_errors
from .errors import UnsupportedMediaType, error_response, in_shape, validation_body

logger = logging.getLogger("bentoml").getChild(__name__)

TESTED_VERSION = "1.4.40"
NEVER = 2**31 - 1  # requests, or seconds (68 years)

# Each upstream function a workaround replaces or calls in place of BentoML, with the
# signature it had in TESTED_VERSION: (module, qualified name) -> signature.
PATCHED: dict[tuple[str, str], str] = {
    ("_bentoml_impl.client.proxy2", "AsyncClient._parse_stream_response"): (
        "(self, endpoint: 'ClientEndpoint', resp: 'aiohttp.ClientResponse') "
        "-> 't.AsyncGenerator[t.Any, None]'"
    ),
    ("_bentoml_sdk.io_models", "IOMixin.from_http_request"): (
        "(request: 'Request', serde: 'Serde') -> 'IODescriptor'"
    ),
    ("_bentoml_impl.server.app", "ServiceAppFactory.submit_task"): (
        "(self, name: 'str', request: 'Request') -> 'Response'"
    ),
    ("_bentoml_impl.server.app", "ServiceAppFactory.cancel_task"): (
        "(self, request: 'Request') -> 'Response'"
    ),
    ("_bentoml_impl.server.app", "ServiceAppFactory._run_task"): (
        "(self, task_id: 'str', name: 'str', request: 'Request') -> 'None'"
    ),
    ("_bentoml_impl.server.app", "ServiceAppFactory._add_response_headers"): (
        "(self, resp: 'Response', logging_format: 'dict[str, str]') -> 'None'"
    ),
    ("_bentoml_impl.server.app", "ServiceAppFactory.get_result"): (
        "(self, request: 'Request') -> 'Response'"
    ),
    ("_bentoml_impl.server.app", "ServiceAppFactory.get_status"): (
        "(self, request: 'Request') -> 'Response'"
    ),
    ("_bentoml_impl.tasks.result", "Sqlite3Store.set_result"): (
        "(self, task_id: 'str', result: 'Response', status: 'ResultStatus') -> 'None'"
    ),
    ("_bentoml_impl.tasks.result", "Sqlite3Store.set_status"): (
        "(self, task_id: 'str', status: 'ResultStatus') -> 'None'"
    ),
    ("_bentoml_impl.client.http", "SyncHTTPClient._submit"): (
        "(self, _SyncHTTPClient__endpoint: 'ClientEndpoint', /, *args: 't.Any', "
        "**kwargs: 't.Any') -> 'Task'"
    ),
}


class UntestedBentoML(RuntimeError):
    """BentoML is not what the workarounds were written for: start-up stops."""


# Connection recycling fails requests in flight: the Service-to-Service client
# (``_bentoml_impl/client/proxy2.py``, ``SessionManager``) replaces its aiohttp session
# after ``max_requests`` (100) or ``max_age`` (300 s) and closes the old one with requests
# still running on it, so queued generations failed under load. Passed as the GPU
# Service's ``runner_connection``, these limits are never reached. No longer needed when
# ``SessionManager`` waits for requests in flight before closing a session
# (``tests/e2e/test_load.py`` crosses 100 requests).
NEVER_RECYCLE_CONNECTIONS = {"max_requests": NEVER, "max_age": float(NEVER)}


async def _read_then_close(read_stream: t.Callable, self: t.Any, endpoint: t.Any, resp: t.Any):
    try:
        async for chunk in read_stream(self, endpoint, resp):
            yield chunk
    finally:
        resp.close()


def close_abandoned_streams() -> None:
    """An abandoned stream stays open: ``AsyncClient._parse_stream_response``
    (``_bentoml_impl/client/proxy2.py``) closes the response only once the stream has
    ended, so when the front's client leaves, the GPU Service goes on generating for
    nobody. Wrapped, it closes the response when its reader leaves, and closing the
    connection is what tells the GPU Service to stop. No longer needed when
    upstream closes it in a ``finally``; ``tests/e2e/test_stream.py`` shows whether
    it does."""
    from _bentoml_impl.client.proxy2 import AsyncClient

    read_stream = AsyncClient._parse_stream_response
    if getattr(read_stream, "closes_abandoned_streams", False):
        return

    def read_then_close(self: t.Any, endpoint: t.Any, resp: t.Any) -> t.AsyncGenerator:
        return _read_then_close(read_stream, self, endpoint, resp)

    read_then_close.closes_abandoned_streams = True  # type: ignore[attr-defined]
    read_then_close.__wrapped__ = read_stream  # type: ignore[attr-defined]
    AsyncClient._parse_stream_response = read_then_close


def _patch(owner: type, name: str, make: t.Callable[[t.Any], t.Any]) -> None:
    """Replace ``owner.name`` with ``make(original)``, once."""
    original = owner.__dict__[name]
    if getattr(original, "sdxl_controlnet_workaround", False):
        return
    patched = make(original)
    target = patched.__func__ if isinstance(patched, classmethod) else patched
    target.sdxl_controlnet_workaround = True
    # inspect.signature follows it: the signature check sees the upstream function.
    target.__wrapped__ = original.__func__ if isinstance(original, classmethod) else original
    setattr(owner, name, patched)


def read_requests_as_field_errors() -> None:
    """Only validation errors raised while reading a request are 400s: everything else
    ``IOMixin.from_http_request`` (``_bentoml_sdk/io_models.py``) lets out, from
    starlette's form parser or ``MultipartSerde.parse_request`` (``_bentoml_impl/serde.py``),
    is answered by ``api_endpoint_wrapper`` as a 500 with a stack trace. Wrapped, each
    becomes a validation error naming the field (``request_errors.diagnose``). No longer
    needed when upstream answers a malformed form, or a form field too deep to parse, with a
    4xx; ``tests/e2e/test_reliability.py``'s table of hostile requests shows whether it does.

    Here too, before BentoML reads the request, images given by reference (a URL or a data
    URI) are resolved under this application's outbound policy (``references.py``): BentoML
    1.4.40 downloads a form text field in a file's place itself (``MultipartSerde.ensure_file``,
    ``_bentoml_impl/serde.py``), with no size or time limit, following redirects, refusing
    only private, loopback and link-local addresses; resolved first, no text reaches it.
    """
    from _bentoml_sdk.io_models import IOMixin

    def make(original: classmethod) -> classmethod:
        read = original.__func__

        async def from_http_request(cls: t.Any, request: Request, serde: t.Any) -> t.Any:
            try:
                await request_errors.read_form(request)
                fields = cls.multipart_fields
                if (
                    data := await references.resolve_request(request, cls.__name__, fields)
                ) is not None:
                    return cls.model_validate(data)
                return await read(cls, request, serde)
            except (ValidationError, BentoMLException):
                raise
            except Exception as exc:
                field, message = await request_errors.diagnose(exc, request, cls.multipart_fields)
                raise request_errors.field_error(cls.__name__, field, message) from exc

        return classmethod(from_http_request)

    _patch(IOMixin, "from_http_request", make)


async def read_input(app: t.Any, name: str, request: Request) -> Response | None:
    """The answer ``/{name}`` would give to ``request``'s input if it is invalid, else
    None, and the input read in ``request.state.task_input`` (its files closed);
    ``request`` stays readable. The input is read as ``api_endpoint`` reads it."""
    from _bentoml_impl.serde import ALL_SERDE

    media_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if media_type == "application/vnd.bentoml+pickle":  # never unpickled on the public front
        return UnsupportedMediaType("application/vnd.bentoml+pickle is not accepted").response()
    body = await request.body()  # cached on ``request`` for the task store

    async def replay() -> dict[str, t.Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    copy = Request(request.scope, replay)
    serde = ALL_SERDE.get(media_type, ALL_SERDE["application/json"])()
    try:
        request.state.task_input = await app.service.apis[name].input_spec.from_http_request(
            copy, serde
        )
    except ValidationError as exc:
        return JSONResponse(validation_body(exc), status_code=400)
    except BentoMLException as exc:
        return error_response(exc.error_code, exc.message)
    finally:
        await copy.close()
    return None


TASK_POLL_S = 0.5


def run_tasks_as_asked() -> None:
    """The local task server (``_bentoml_impl/server/app.py``, ``ServiceAppFactory``)
    has two gaps that BentoCloud's task queue does not:

    - ``submit_task`` stores a request without reading it, so bad input shows only later,
      as a failed task. Wrapped, it reads the input first and answers what ``/{name}``
      would: a 400 naming the field.
    - ``cancel_task`` marks the task canceled but answers 400 "task cancellation is not
      supported in local development server", and ``_run_task`` runs on. Wrapped,
      ``_run_task`` watches the task store (shared by the host's workers, so the cancel
      may reach any of them) and cancels the task's coroutine when it reads canceled,
      which closes the call to the GPU Service and stops its generation at the next
      step; ``cancel_task`` answers 200 with the task's status, 404 for an unknown task,
      409 for a finished one.

    No longer needed when upstream validates at submit and cancels a running task;
    ``tests/e2e/test_jobs.py`` shows whether it does.
    """
    from _bentoml_impl.server.app import ServiceAppFactory
    from _bentoml_impl.tasks import ResultStatus

    def make_submit(submit_task: t.Callable) -> t.Callable:
        async def submit(self: t.Any, name: str, request: Request) -> Response:
            refusal = await read_input(self, name, request)
            if refusal is None:
                return await submit_task(self, name, request)
            self._add_response_headers(refusal)
            return refusal

        return submit

    def make_cancel(cancel_task: t.Callable) -> t.Callable:
        async def cancel(self: t.Any, request: Request) -> Response:
            task_id = request.query_params.get("task_id")
            response = await cancel_task(self, request)
            if task_id is None:
                return response
            try:
                row = await self._result_store.get_status(task_id)
            except KeyError:
                response = error_response(404, f"task {task_id} not found")
            else:
                if row.status is ResultStatus.CANCELED:
                    response = JSONResponse(row.to_json())
                else:
                    response = error_response(
                        409, f"task {task_id} is {row.status.value}: nothing to cancel"
                    )
            self._add_response_headers(response)
            return response

        return cancel

    def make_run(run_task: t.Callable) -> t.Callable:
        async def run_until_canceled(self: t.Any, task_id: str, name: str, request: t.Any) -> None:
            jobs.attach(self._result_store._conn)
            run = asyncio.ensure_future(run_task(self, task_id, name, request))
            try:
                while not (await asyncio.wait({run}, timeout=TASK_POLL_S))[0]:
                    row = await self._result_store.get_status(task_id)
                    if row.status is ResultStatus.CANCELED:
                        logger.info("Task(%s) %s canceled: stopping it", name, task_id)
                        run.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await run
                        break
                else:
                    await run
            finally:
                run.cancel()
                await _ended(self, task_id, request)

        return run_until_canceled

    _patch(ServiceAppFactory, "submit_task", make_submit)
    _patch(ServiceAppFactory, "cancel_task", make_cancel)
    _patch(ServiceAppFactory, "_run_task", make_run)


TaskEnded = t.Callable[[str, Request, t.Any], t.Awaitable[None]]
_task_ended: list[TaskEnded] = []


def on_task_end(listener: TaskEnded) -> None:
    """Call ``listener(task_id, request, row)`` when a task has its final status, with
    the task's request and its row in the store (``CompletedResultRow``), once per task,
    on the worker that ran it. ``request.state.task_input`` holds the input read at submit."""
    if listener not in _task_ended:
        _task_ended.append(listener)


async def _ended(app: t.Any, task_id: str, request: Request) -> None:
    """After a task's run: one that ended without a status (``_run_task`` logs what it
    raised, and leaves it in progress) is failed; its progress is dropped; the listeners
    hear of it."""
    from _bentoml_impl.tasks import ResultStatus

    store = app._result_store
    if (await store.get_status(task_id)).status is ResultStatus.IN_PROGRESS:
        failure = error_response(500, "the task failed on the server; see its log")
        await store.set_result(task_id, failure, ResultStatus.FAILED)
    await jobs.forget(task_id)
    row = await store.get(task_id)
    for listener in _task_ended:
        try:
            await listener(task_id, request, row)
        except Exception:
            logger.exception("Task %s: a listener to its end failed", task_id)


def keep_tasks_word() -> None:
    """The local task store (``_bentoml_impl/tasks/result.py``, ``Sqlite3Store``) and its
    endpoints break what they answered:

    - ``set_result`` overwrites any status, so a task canceled (answered 200) while its
      result was being stored reads ``completed`` later. Replaced: a result is stored only
      for a task still in progress.
    - ``set_status`` to canceled leaves ``completed_at`` empty, so a canceled task is never
      purged with the finished ones (``set_result`` deletes rows by ``completed_at``) and
      its ``/get`` says "not completed yet". Replaced: a final status sets it, and stores
      the answer ``/get`` gives, which ``/retry`` (``retry_task``) needs to read the row.
    - ``ServiceAppFactory.get_result`` answers a canceled task 400 "not completed yet", and
      a failed one with its failure's status, a 5xx for a GPU failure. Wrapped: a task
      without a result is a 409 that says whether it is canceled, failed (and why) or still
      running (``jobs.no_result``).
    - ``ServiceAppFactory.get_status`` knows nothing of progress. Wrapped: a running task's
      status carries ``progress``, ``{"step", "total"}`` (``jobs.progress``).

    No longer needed when upstream guards ``set_result`` by status, dates every final
    status and answers ``/get`` of a task without result with a 4xx;
    ``tests/e2e/test_jobs.py`` shows whether it does.
    """
    import datetime

    from _bentoml_impl.server.app import ServiceAppFactory
    from _bentoml_impl.tasks import ResultStatus
    from _bentoml_impl.tasks.result import Sqlite3Store

    final = {ResultStatus.COMPLETED, ResultStatus.FAILED, ResultStatus.CANCELED}
    in_progress = ResultStatus.IN_PROGRESS.value

    def make_set_result(_: t.Callable) -> t.Callable:
        async def set_result(self: t.Any, task_id: str, result: Response, status: t.Any) -> None:
            now = datetime.datetime.now(tz=datetime.UTC)
            await self._conn.execute(
                "UPDATE result SET status = ?, result = ?, completed_at = ? "
                "WHERE task_id = ? AND status = ?",
                (
                    status.value,
                    await self.serializer.serialize_response(result),
                    now,
                    task_id,
                    in_progress,
                ),
            )
            await self._conn.execute(
                "DELETE FROM result WHERE completed_at IS NOT NULL AND completed_at < ?",
                (now - datetime.timedelta(seconds=self.RESULT_RETENTION),),
            )
            await self._conn.commit()

        return set_result

    def make_set_status(_: t.Callable) -> t.Callable:
        async def set_status(self: t.Any, task_id: str, status: t.Any) -> None:
            now = datetime.datetime.now(tz=datetime.UTC)
            # A final status gets a date and an answer, so /get and /retry can read the row.
            answer = jobs.no_result(task_id, status.value, None) if status in final else None
            await self._conn.execute(
                "UPDATE result SET status = ?, executed_at = ?, completed_at = ?, result = ? "
                "WHERE task_id = ? AND status = ?",
                (
                    status.value,
                    now,
                    now if answer else None,
                    answer and await self.serializer.serialize_response(answer),
                    task_id,
                    in_progress,
                ),
            )
            await self._conn.commit()

        return set_status

    def make_get_result(get_result: t.Callable) -> t.Callable:
        async def get(self: t.Any, request: Request) -> Response:
            task_id = request.query_params.get("task_id")
            try:
                row = await self._result_store.get_status(task_id) if task_id else None
            except KeyError:
                row = None
            if row is None or row.status is ResultStatus.COMPLETED:
                return await get_result(self, request)
            failure = None
            if row.status is ResultStatus.FAILED:
                stored = (await self._result_store.get(task_id)).result
                failure = {
                    "status": stored.status_code,
                    **in_shape(stored.status_code, stored.body),
                }
            response = jobs.no_result(task_id, row.status.value, failure)
            self._add_response_headers(response)
            return response

        return get

    def make_get_status(get_status: t.Callable) -> t.Callable:
        async def status(self: t.Any, request: Request) -> Response:
            response = await get_status(self, request)
            if response.status_code != 200:
                return response
            body = json.loads(response.body)
            jobs.attach(self._result_store._conn)
            if body["status"] == in_progress and (done := await jobs.progress(body["task_id"])):
                response = JSONResponse({**body, "progress": done})
                self._add_response_headers(response)
            return response

        return status

    _patch(Sqlite3Store, "set_result", make_set_result)
    _patch(Sqlite3Store, "set_status", make_set_status)
    _patch(ServiceAppFactory, "get_result", make_get_result)
    _patch(ServiceAppFactory, "get_status", make_get_status)


def submit_tasks_from_the_sync_client() -> None:
    """``SyncHTTPClient._submit`` (``_bentoml_impl/client/http.py``) closes its files
    through ``self._opened_files``, an attribute the client no longer has (they moved to
    ``self._file_manager``), so every ``client.<task>.submit(...)`` raises AttributeError,
    even after the server accepted the task. Safe for any process that uses the client;
    the standalone equivalent is ``SyncHTTPClient._opened_files =
    property(lambda self: self._file_manager._opened_files)``. No longer needed when
    ``_submit`` calls ``self._file_manager.close()`` as ``AsyncHTTPClient._submit`` does."""
    from _bentoml_impl.client.http import SyncHTTPClient

    if "_opened_files" not in SyncHTTPClient.__dict__:
        SyncHTTPClient._opened_files = property(  # type: ignore[attr-defined]
            lambda self: self._file_manager._opened_files
        )


def _signature(function: t.Callable) -> str:
    """Parameters, their kinds and annotations, and the return annotation; defaults are
    left out (a dependency-injected one prints as an object address)."""
    signature = inspect.signature(function)
    parameters = [p.replace(default=inspect.Parameter.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=parameters))


def _upstream(module: str, qualname: str) -> t.Callable:
    owner: t.Any = importlib.import_module(module)
    for part in qualname.split("."):
        owner = getattr(owner, part)
    return owner


def check_upstream(installed: str = bentoml.__version__, allow_untested: bool = False) -> None:
    """Refuse to start on a BentoML these workarounds were not checked against, or
    where a function they patch has changed its signature."""
    if installed != TESTED_VERSION and not allow_untested:
        raise UntestedBentoML(
            f"bentoml {installed} is installed, but {__name__} was written for bentoml "
            f"{TESTED_VERSION}: re-check each workaround in {__file__}, then set "
            "ALLOW_UNTESTED_BENTOML=1 to start anyway"
        )
    if installed != TESTED_VERSION:
        logger.warning(
            "bentoml %s is installed; %s was written for %s (ALLOW_UNTESTED_BENTOML=1)",
            installed,
            __name__,
            TESTED_VERSION,
        )
    for (module, qualname), expected in PATCHED.items():
        try:
            found = _signature(_upstream(module, qualname))
        except (ImportError, AttributeError) as exc:
            raise UntestedBentoML(
                f"bentoml {installed}: {module}.{qualname}, which {__name__} patches, "
                f"is gone ({exc}); re-check the workaround that names it"
            ) from None
        if found != expected:
            raise UntestedBentoML(
                f"bentoml {installed}: {module}.{qualname}, which {__name__} patches, "
                f"changed its signature from {expected} to {found}; re-check the "
                "workaround that names it"
            )


def apply(allow_untested: bool = False) -> None:
    """Check BentoML (``check_upstream``), then apply the workarounds that patch it;
    safe to call more than once."""
    check_upstream(allow_untested=allow_untested)
    close_abandoned_streams()
    read_requests_as_field_errors()
    run_tasks_as_asked()
    keep_tasks_word()
    submit_tasks_from_the_sync_client()
