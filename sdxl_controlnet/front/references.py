"""Images given by reference instead of as a file: an ``https://`` URL, fetched under the
outbound policy (``fetching.py``), or a ``data:image/…;base64,`` URI.

Wherever a request takes an image (``image``, ``init_image``, ``mask``), a form text field
or a JSON string may hold one. It is resolved while the request is read, before BentoML
sees it, into the file an upload would have been, so that every guard of an upload
applies after it (size from the header, decompression bombs). BentoML's own downloader
(``MultipartSerde.ensure_file``, for a form text field in a file's place) is never reached:
every text in a file's place is resolved here or refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
import typing as t

from PIL import Image
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.requests import Request

from . import fetching
from .fetching import Policy, Refused
from .request_errors import field_error

DATA_URI = re.compile(r"data:image/[\w.+-]+(;[\w.+-]+=[^;,]*)*;base64,", re.IGNORECASE)
URL_SCHEMES = ("https://", "http://")
# Fetched once per request, by field and reference: a task's request is read at submit
# and again when it runs, and must not be fetched twice (nor change in between).
RESOLVED = "sdxl_controlnet.resolved_images"
FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")
PICKLE = "application/vnd.bentoml+pickle"


def is_reference(value: str) -> bool:
    text = value.strip()
    return bool(DATA_URI.match(text)) or text.lower().startswith(URL_SCHEMES)


async def resolve(value: str, policy: Policy | None = None) -> bytes:
    """The image bytes ``value`` refers to; ``Refused`` says why there are none."""
    policy = policy or fetching.FETCH_POLICY
    text = value.strip()
    if match := DATA_URI.match(text):
        payload = text[match.end() :]
        if len(payload) // 4 * 3 > policy.max_bytes:
            raise Refused("too_large", f"data URI: too large: over {policy.max_bytes} bytes")
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error as exc:
            raise Refused("url", f"data URI: not valid base64 ({exc})") from None
        where = "data URI"
    else:
        try:
            data = await fetching.fetch(text, policy)
        except Refused as exc:
            raise Refused(exc.kind, f"URL not fetched: {exc.reason}") from None
        where = "URL not fetched"
    if not _looks_like_an_image(data):
        raise Refused(
            "not_image",
            f"{where}: not an image, whatever its Content-Type; send a JPEG, PNG or WebP",
        )
    return data


def _looks_like_an_image(data: bytes) -> bool:
    """Whether Pillow recognises ``data`` from its header; decoding it is left to the
    guards every upload passes."""
    try:
        Image.open(io.BytesIO(data)).close()
    except Image.UnidentifiedImageError:
        return False
    except Exception:  # an image Pillow recognised, and will refuse later, with the reason
        return True
    return True


def _not_a_reference(in_form: bool) -> str:
    if in_form:
        return (
            "sent as a text field, which must then be an https:// URL or a "
            "data:image/…;base64, URI; send a file as a file part, with a filename"
        )
    return "send the image as a file, an https:// URL or a data:image/…;base64, URI"


async def _as_upload(
    request: Request, title: str, field: str, value: str, in_form: bool
) -> UploadFile:
    if not is_reference(value):
        raise field_error(title, field, _not_a_reference(in_form))
    resolved = request.scope.setdefault(RESOLVED, {})
    if (field, value) not in resolved:
        try:
            resolved[field, value] = await resolve(value)
        except Refused as exc:
            raise field_error(title, field, exc.reason) from None
    data = resolved[field, value]
    # No Content-Type: Pillow identifies the image from its bytes.
    return UploadFile(io.BytesIO(data), size=len(data), filename=field, headers=Headers())


async def resolve_request(
    request: Request, title: str, file_fields: t.Collection[str]
) -> dict[str, t.Any] | None:
    """Resolve the references ``request`` holds in ``file_fields``. A form is rewritten in
    place, where BentoML reads it (None is returned); a JSON body with a reference is
    returned parsed, the images in place, for the caller to validate."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not file_fields or media_type == PICKLE:
        return None
    if media_type in FORMS:
        form = await request.form()
        items = form.multi_items()
        if not any(isinstance(v, str) for k, v in items if k in file_fields):
            return None
        values = await asyncio.gather(
            *(
                _as_upload(request, title, k, v, in_form=True)
                if k in file_fields and isinstance(v, str)
                else _same(v)
                for k, v in items
            )
        )
        request._form = FormData([(k, v) for (k, _), v in zip(items, values, strict=True)])
        return None
    try:
        data = json.loads(await request.body())
    except (ValueError, RecursionError):
        return None  # BentoML reads it, and reports what is wrong
    if not isinstance(data, dict):
        return None
    texts = {k: v for k, v in data.items() if k in file_fields and isinstance(v, str)}
    if not texts:
        return None
    files = await asyncio.gather(
        *(_as_upload(request, title, k, v, in_form=False) for k, v in texts.items())
    )
    return {**data, **dict(zip(texts, files, strict=True))}


async def _same(value: t.Any) -> t.Any:
    return value
