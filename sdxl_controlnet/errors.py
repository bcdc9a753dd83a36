"""Errors a client can see, each with the HTTP status it maps to, and the
mapping of everything that can go wrong onto them."""

from __future__ import annotations

import contextlib
import functools
import logging
import typing as t
from collections.abc import Awaitable, Callable, Iterator
from http import HTTPStatus

import aiohttp
from bentoml.exceptions import BentoMLException, InvalidArgument
from starlette.responses import JSONResponse, Response

from . import settings
from .cancellation import ClientDisconnected

logger = logging.getLogger("bentoml").getChild(__name__)  # shown in the server log

CLIENT_CLOSED_REQUEST = 499  # nginx's status for an answer nobody is left to read


class InvalidRequest(InvalidArgument):
    """A request the client must fix: HTTP 400."""


class GPUServiceUnavailable(BentoMLException):
    """The GPU Service cannot be reached or failed: HTTP 503, retry later."""

    error_code = HTTPStatus.SERVICE_UNAVAILABLE


class GenerationTimeout(BentoMLException):
    """The generation did not finish in time: HTTP 504."""

    error_code = HTTPStatus.GATEWAY_TIMEOUT


class GenerationCancelled(Exception):
    """The caller went away, so the pipeline stopped between two steps."""


@contextlib.contextmanager
def gpu_call_errors() -> Iterator[None]:
    """Turn the GPU Service's failures, seen from the front, into errors a client can act on."""
    try:
        yield
    except TimeoutError as exc:
        raise GenerationTimeout(
            f"generation took longer than {settings.GENERATION_TIMEOUT_S} s; "
            "try fewer steps, fewer images or a smaller size"
        ) from exc
    except InvalidArgument as exc:
        raise InvalidRequest(exc.message) from exc
    except (aiohttp.ClientError, BentoMLException) as exc:  # unreachable, died, or failed
        logger.exception("GPU Service call failed")
        raise GPUServiceUnavailable(
            "the GPU Service is unavailable or failed; retry in a moment"
        ) from exc


def errors_as_json(api: Callable[..., Awaitable[t.Any]]) -> Callable[..., Awaitable[t.Any]]:
    """Answer the errors a client can meet with a JSON body that says what happened.

    BentoML itself replaces the message of any 5xx with a generic one."""

    @functools.wraps(api)
    async def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
        try:
            return await api(*args, **kwargs)
        except (InvalidRequest, GPUServiceUnavailable, GenerationTimeout) as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.error_code)
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_REQUEST)

    return wrapper
