"""Every failure a client can see: one typed error per status, and the one shape every
error answer has, ``{"error": "<sentence>", ...}``, whoever answers: an API, the request
guard, BentoML itself (put into shape by ``middleware.ErrorBodies``) or a stream's
``error`` event."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import typing as t
from collections.abc import Awaitable, Callable, Iterator
from http import HTTPStatus

import aiohttp
from bentoml.exceptions import BentoMLException, InvalidArgument
from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError
from starlette.responses import JSONResponse, Response

from . import logs

T = t.TypeVar("T")

logger = logs.logger(__name__)  # shown in the server log

ONE_IMAGE = "params.num_images: /generate returns one image; ask /generate_batch for {}"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for an answer nobody is left to read
BODY = "body"  # the loc of a failure that belongs to no one field


def error_body(message: str, **fields: t.Any) -> dict[str, t.Any]:
    """The body of every error answer: ``error``, a sentence, and the fields set."""
    return {
        "error": message,
        **{name: value for name, value in fields.items() if value is not None},
    }


def error_response(
    status: int, message: str, headers: t.Mapping[str, str] | None = None, **fields: t.Any
) -> JSONResponse:
    return JSONResponse(error_body(message, **fields), status_code=status, headers=headers)


# BentoML's own ``error`` for a validation error (``api_endpoint_wrapper``).
_BENTOML_VALIDATION_ERROR = re.compile(r"^\d+ validation errors? for ")


def in_shape(status: int, raw: bytes) -> dict[str, t.Any]:
    """``raw``, the body of an error answer with ``status``, as the one error body:
    BentoML's ``[{"error": ...}]`` (its 4xx branch) unwrapped, its "1 validation error for
    Input" replaced by sentences naming the fields, plain text (a 404, a 503 from
    ``/readyz``) put under ``error``."""
    try:
        body = json.loads(raw)
    except ValueError:
        return error_body(raw.decode(errors="replace").strip() or _phrase(status))
    if isinstance(body, list) and len(body) == 1 and isinstance(body[0], dict):
        body = body[0]
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return error_body(_phrase(status), detail=body)
    detail = body.get("detail")
    if isinstance(detail, list) and _BENTOML_VALIDATION_ERROR.match(body["error"]):
        return {**body, **validation_body(detail)}
    return body


class ClientErrorTraces(logging.Filter):
    """BentoML logs every error its ``api_endpoint_wrapper`` answers with a stack trace
    (``log_exception``), a client's bad request too. Those become one line, at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        client_error = isinstance(exc, ValidationError) or (
            isinstance(exc, BentoMLException) and int(exc.error_code) < 500
        )
        if client_error:
            first_line = str(exc).partition("\n")[0]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {first_line}"
            record.args = None
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


# The logger of BentoML's ``log_exception`` (``bentoml/_internal/server/http_app.py``).
BENTOML_EXCEPTION_LOGGER = "bentoml._internal.server.http_app"


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"status {status}"


def sentence(error: t.Mapping[str, t.Any]) -> str:
    """One pydantic error as ``loc: message``, without the "Value error, " prefix."""
    where = ".".join(str(part) for part in error["loc"]) or BODY
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"


def validation_body(detail: ValidationError | list[dict[str, t.Any]]) -> dict[str, t.Any]:
    """The body of a validation error: ``error`` names each field and says what is wrong
    with it, ``detail`` is pydantic's list, as BentoML sends it."""
    if isinstance(detail, ValidationError):
        detail = detail.errors(include_context=False, include_input=False, include_url=False)
    else:
        detail = [{k: v for k, v in item.items() if k != "url"} for item in detail]
    return error_body("; ".join(sentence(error) for error in detail), detail=detail)


def field_error(title: str, field: str, message: str) -> ValidationError:
    """``message`` about ``field`` of the model ``title`` as the validation error BentoML
    answers with a 400, for what pydantic cannot see (a picture sent twice, a failed fetch)."""
    error: InitErrorDetails = {
        "type": PydanticCustomError("request_unreadable", message),
        "loc": (field,),
        "input": None,
    }
    return ValidationError.from_exception_data(title, [error])


class ClientError(BentoMLException):
    """A failure reported to the client as its status, a message, and when to retry.

    Each subclass with an ``error_code`` is also what BentoML's own client raises for that
    status in this process (``BentoMLException.error_mapping``), passing ``error_code``."""

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: int | None = None,
        error_code: HTTPStatus | None = None,
    ) -> None:
        super().__init__(message, error_code=error_code)
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, t.Any]:
        return error_body(self.message, retry_after_s=self.retry_after_s)

    def body_with_status(self) -> dict[str, t.Any]:
        """The body with the status it goes with: how a stream reports a failure."""
        return {"status": int(self.error_code), **self.body()}

    def response(self) -> JSONResponse:
        headers = {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}
        return error_response(
            self.error_code, self.message, headers, retry_after_s=self.retry_after_s
        )


class InvalidRequest(ClientError, InvalidArgument):
    """A request the client must fix."""

    error_code = HTTPStatus.BAD_REQUEST


class PayloadTooLarge(ClientError):
    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class UnsupportedMediaType(ClientError):
    error_code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class ServiceBusy(ClientError):
    """The GPU Service is full or cannot finish in time: retry after ``retry_after_s``."""

    error_code = HTTPStatus.SERVICE_UNAVAILABLE


class GPUServiceUnavailable(ClientError):
    """The GPU Service cannot be reached or failed: retry later."""

    error_code = HTTPStatus.SERVICE_UNAVAILABLE


class GenerationTimeout(ClientError):
    error_code = HTTPStatus.GATEWAY_TIMEOUT


class GPUOutOfMemory(ClientError):
    """The request did not fit in GPU memory; the same request would fail again."""

    error_code = HTTPStatus.INSUFFICIENT_STORAGE


class QueueFull(ClientError):
    """``JOB_QUEUE_MAX`` jobs already wait for the GPU: retry after ``retry_after_s``.

    Its status is set per instance: a class-level 429 would become what BentoML's client
    raises for the GPU Service's own 429 (``BentoMLException.error_mapping``)."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(
            message, retry_after_s=retry_after_s, error_code=HTTPStatus.TOO_MANY_REQUESTS
        )


class StoreFull(ClientError):
    """The job store holds ``JOB_STORE_MAX_BYTES`` of jobs' inputs and results already (per
    instance, as ``QueueFull``: the class-level 507 is ``GPUOutOfMemory``'s)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=HTTPStatus.INSUFFICIENT_STORAGE)


class StoreUnreachable(ClientError):
    """The shared job store did not answer, or refused a write: retry after
    ``retry_after_s`` (per instance, as ``QueueFull``: the class-level 503s are the GPU
    Service's)."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(
            message, retry_after_s=retry_after_s, error_code=HTTPStatus.SERVICE_UNAVAILABLE
        )


class JobCanceled(ClientError):
    """A job canceled through ``/cancel``: it has no result."""

    error_code = HTTPStatus.CONFLICT


class GenerationCanceled(Exception):
    """The caller went away, so the pipeline stopped between two steps."""


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready."""


# What the front tells its client when the GPU Service answers with one of these.
_GPU_STATUSES: dict[int, type[ClientError]] = {
    HTTPStatus.BAD_REQUEST: InvalidRequest,
    HTTPStatus.SERVICE_UNAVAILABLE: ServiceBusy,
    HTTPStatus.GATEWAY_TIMEOUT: GenerationTimeout,
    HTTPStatus.INSUFFICIENT_STORAGE: GPUOutOfMemory,
}


def error_for_status(status: int, body: dict[str, t.Any]) -> ClientError:
    """The error a client sees when the GPU Service answered ``status`` with ``body``,
    as a response or as a stream's error line."""
    if status == HTTPStatus.TOO_MANY_REQUESTS:  # BentoML's own answer beyond max_concurrency
        return ServiceBusy("the GPU Service's queue is full; retry in a moment")
    cls = _GPU_STATUSES.get(status)
    ours = "error" in body and (cls is not ServiceBusy or "retry_after_s" in body)
    if cls is None or not ours:  # BentoML's own failure, or a proxy's page
        logger.error("GPU Service answered %s: %s", status, body)
        return _gpu_service_unavailable()
    return cls(body["error"], retry_after_s=body.get("retry_after_s"))


def from_gpu_failure(exc: BaseException, timeout_s: int) -> ClientError:
    """The error a client sees for ``exc``, raised by a call to the GPU Service."""
    if isinstance(exc, ClientError):
        return exc
    if isinstance(exc, TimeoutError):
        return GenerationTimeout(
            f"generation took longer than {timeout_s} s; "
            "try fewer steps, fewer images or a smaller size"
        )
    if isinstance(exc, BentoMLException):
        return error_for_status(exc.error_code, _error_body(exc.message))
    logger.error("GPU Service call failed: %r", exc)
    return _gpu_service_unavailable()


def _gpu_service_unavailable() -> GPUServiceUnavailable:
    return GPUServiceUnavailable("the GPU Service is unavailable or failed; retry in a moment")


def raise_for_answer(answer: T) -> T:
    """The GPU Service's answer, or the error it answered with. Over HTTP, BentoML's
    client raises for an error status; in one process (tests, a local ``bentoml.depends``)
    the error Response that ``answers_errors`` made arrives as the answer itself."""
    if isinstance(answer, Response):
        raise error_for_status(answer.status_code, _error_body(bytes(answer.body).decode()))
    return answer


def _error_body(text: str) -> dict[str, t.Any]:
    """Our own JSON error body, or {} for anything else."""
    with contextlib.suppress(ValueError):
        body = json.loads(text)
        if isinstance(body, dict):
            return body
    return {}


@contextlib.contextmanager
def gpu_call_errors(timeout_s: int) -> Iterator[None]:
    """Turn what goes wrong in a call to the GPU Service into a ClientError."""
    try:
        yield
    except (TimeoutError, aiohttp.ClientError, BentoMLException, ConnectionError) as exc:
        raise from_gpu_failure(exc, timeout_s) from exc


def answers_errors(api: Callable[..., Awaitable[t.Any]]) -> Callable[..., Awaitable[t.Any]]:
    """Answer a ClientError with its status, message and Retry-After.

    BentoML itself would replace the message of any 5xx with a generic one, and drop
    the headers."""

    @functools.wraps(api)
    async def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
        try:
            return await api(*args, **kwargs)
        except ClientError as exc:
            return exc.response()
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_REQUEST)

    return wrapper
