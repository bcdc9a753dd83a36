"""Errors a client can see, each with the HTTP status it maps to."""

from __future__ import annotations

from http import HTTPStatus

from bentoml.exceptions import BentoMLException, InvalidArgument


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
