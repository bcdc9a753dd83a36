"""Reading a request: everything but a validation error is a 500.

``IOMixin.from_http_request`` (``_bentoml_sdk/io_models.py``) lets out whatever raises
while it reads a request, and ``api_endpoint_wrapper`` answers it with a 500 and a stack
trace. BentoML reads a request in three steps, and each can raise: starlette parses the
form (a malformed body, a field over the part limit), ``MultipartSerde.parse_request``
(``_bentoml_impl/serde.py``) ``json.loads`` each form field that is not a file (JSON
nested past the recursion limit, bytes that are not UTF-8, an integer too long to
convert), then pydantic validates the model. Wrapped, each failure of the first two
becomes a validation error naming the field, which BentoML answers with a 400. No longer
needed when upstream answers those with a 4xx.
"""

from __future__ import annotations

import json
import logging
import typing as t

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

logger = logging.getLogger("bentoml").getChild(__name__)

UPSTREAM = {
    ("_bentoml_sdk.io_models", "IOMixin.from_http_request"): (
        "(request: 'Request', serde: 'Serde') -> 'IODescriptor'"
    ),
}
# Where a failure that belongs to no one field is reported: the request's body.
BODY = "body"


def apply() -> None:
    from _bentoml_sdk.io_models import IOMixin
    from bentoml.exceptions import BentoMLException

    original = IOMixin.__dict__["from_http_request"]
    if getattr(original.__func__, "reads_requests_as_field_errors", False):
        return
    read = original.__func__

    async def from_http_request(cls: t.Any, request: Request, serde: t.Any) -> t.Any:
        try:
            await _read_form(request)
            return await read(cls, request, serde)
        except (ValidationError, BentoMLException):
            raise
        except Exception as exc:
            field, message = await diagnose(exc, request, cls.multipart_fields)
            raise _field_error(cls.__name__, field, message) from exc

    from_http_request.reads_requests_as_field_errors = True  # type: ignore[attr-defined]
    from_http_request.__wrapped__ = read  # type: ignore[attr-defined]
    IOMixin.from_http_request = classmethod(from_http_request)


class PartTooLarge(MultiPartException):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _FieldNamingParser(MultiPartParser):
    """Starlette's multipart parser, with its limits, naming the part that broke one."""

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        try:
            super().on_part_data(data, start, end)
        except MultiPartException as exc:
            raise PartTooLarge(self._current_part.field_name, exc.message) from None


async def _read_form(request: Request) -> None:
    """Parse a multipart body where ``Request.form()`` caches it, so that BentoML's
    serde finds it parsed, and a part over the size limit is reported by name."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data") and request._form is None:
        request._form = await _FieldNamingParser(request.headers, request.stream()).parse()


def _field_error(title: str, field: str, message: str) -> ValidationError:
    error: InitErrorDetails = {
        "type": PydanticCustomError("request_unreadable", message),
        "loc": (field,),
        "input": None,
    }
    return ValidationError.from_exception_data(title, [error])


def _json_failure(value: str | bytes) -> str | None:
    """Why BentoML's ``json.loads`` of a form field raises something it does not catch."""
    try:
        json.loads(value)
    except json.JSONDecodeError:
        return None  # BentoML takes the field as text; pydantic judges it
    except RecursionError:
        return "JSON nested too deeply"
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except ValueError as exc:
        return f"not valid JSON: {exc}"
    return None


async def diagnose(
    exc: Exception, request: Request, file_fields: t.Collection[str]
) -> tuple[str, str]:
    """(field, message) for ``exc``, raised while BentoML read ``request``."""
    if isinstance(exc, PartTooLarge):
        return exc.field, (
            f"{exc.message.rstrip('.')}, the limit for a form field without a filename; "
            "send files as file parts, with a filename"
        )
    if isinstance(exc, MultiPartException):
        return BODY, f"malformed multipart/form-data: {exc.message}"
    detail = getattr(exc, "detail", None)  # starlette's HTTPException, for a urlencoded form
    form = request._form
    if form is None:
        return BODY, f"could not be read: {detail or exc}"
    for name, value in form.multi_items():
        if name not in file_fields:
            if isinstance(value, UploadFile):
                await value.seek(0)
                text: str | bytes = await value.read()
            else:
                text = value
            if problem := _json_failure(text):
                return name, problem
    logger.warning("unexpected failure reading a request", exc_info=exc)
    return BODY, f"could not be read: {detail or exc}"
