"""Reading a request: everything but a validation error is a 500.

``IOMixin.from_http_request`` (``_bentoml_sdk/io_models.py``) lets out whatever starlette's
form parser or ``MultipartSerde.parse_request`` (``_bentoml_impl/serde.py``) raise on a
malformed form, a part over the size limit, a field nested too deep or bytes that are not
UTF-8, and ``api_endpoint_wrapper`` answers it with a 500 and a stack trace. Wrapped, each
becomes a validation error naming the field (``front/request_errors.diagnose``). No longer
needed when upstream answers those with a 4xx.

The wrapper is also where images given by reference are resolved under the outbound policy
(``front/references.py``), before BentoML reads the request: BentoML 1.4.40 downloads a form
text field in a file's place itself (``MultipartSerde.ensure_file``), with no size or time
limit, following redirects.
"""

from __future__ import annotations

import typing as t

from pydantic import ValidationError
from starlette.requests import Request

UPSTREAM = {
    ("_bentoml_sdk.io_models", "IOMixin.from_http_request"): (
        "(request: 'Request', serde: 'Serde') -> 'IODescriptor'"
    ),
}


def apply() -> None:
    from _bentoml_sdk.io_models import IOMixin
    from bentoml.exceptions import BentoMLException

    from ..front import references, request_errors

    original = IOMixin.__dict__["from_http_request"]
    if getattr(original.__func__, "reads_requests_as_field_errors", False):
        return
    read = original.__func__

    async def from_http_request(cls: t.Any, request: Request, serde: t.Any) -> t.Any:
        try:
            await request_errors.read_form(request)
            if (data := await references.resolve_request(request, cls)) is not None:
                return cls.model_validate(data)
            return await read(cls, request, serde)
        except (ValidationError, BentoMLException):
            raise
        except Exception as exc:
            field, message = await request_errors.diagnose(exc, request, cls.multipart_fields)
            raise request_errors.field_error(cls.__name__, field, message) from exc

    from_http_request.reads_requests_as_field_errors = True  # type: ignore[attr-defined]
    from_http_request.__wrapped__ = read  # type: ignore[attr-defined]
    IOMixin.from_http_request = classmethod(from_http_request)
