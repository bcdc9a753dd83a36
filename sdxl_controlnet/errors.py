"""Every failure a client can see: one typed error per status, answered the same way
by both Services, by the request guard and in a stream's ``error`` event."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import typing as t
from collections.abc import Awaitable, Callable, Iterator
from http import HTTPStatus

import aiohttp
from bentoml.exceptions import BentoMLException, InvalidArgument
from starlette.responses import JSONResponse, Response

T = t.TypeVar("T")

logger = logging.getLogger("bentoml").getChild(__name__)  # shown in the server log

ONE_IMAGE = "params.num_images: /generate returns one image; ask /generate_batch for {}"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for an answer nobody is left to read


class ClientError(BentoMLException):
    """A failure reported to the client as its status, a message, and when to retry."""

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, t.Any]:
        body: dict[str, t.Any] = {"error": self.message}
        if self.retry_after_s is not None:
            body["retry_after_s"] = self.retry_after_s
        return body

    def body_with_status(self) -> dict[str, t.Any]:
        """The body with the status it goes with: how a stream reports a failure."""
        return {"status": int(self.error_code), **self.body()}

    def response(self) -> JSONResponse:
        headers = {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}
        return JSONResponse(self.body(), status_code=self.error_code, headers=headers)


class InvalidRequest(ClientError, InvalidArgument):
    """A request the client must fix."""

    error_code = HTTPStatus.BAD_REQUEST


class LengthRequired(ClientError):
    error_code = HTTPStatus.LENGTH_REQUIRED


class PayloadTooLarge(ClientError):
    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


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


class GenerationCancelled(Exception):
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
