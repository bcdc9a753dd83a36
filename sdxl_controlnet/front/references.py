"""Images given by reference instead of as a file: an ``https://`` URL, fetched under the
outbound policy (``outbound.py``, ``front/fetching.py``), or a ``data:image/…;base64,`` URI.

Wherever a request takes an image (``image``, ``init_image``, ``mask``), a form text field
or a JSON string may hold one. ASGI middleware (``ResolveReferences``) resolves it before
BentoML reads the request, into the file part an upload would have been, so that every
guard of an upload applies after it (size from the header, decompression bombs), and a
job stores the picture, not the reference. BentoML's own downloader
(``MultipartSerde.ensure_file``, for a form text field in a file's place) is never reached:
every text in a file's place is resolved here or refused.

The images of ``params.controls`` are references, resolved when the request is prepared
for the GPU (``control_pictures``; for a job, when it runs), under the same policy and
guards. In a form, an entry may instead name a file part of its own (``"image": "depth"``
with ``-F depth=@depth.png``): such a part becomes a data URI in ``params`` here, past the
1 MiB that a form's text field may hold.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import json
import re
import typing as t
import uuid

from PIL import Image
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.datastructures import Headers, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import logs, outbound
from ..errors import ClientError, InvalidRequest, field_error, sentence, validation_body
from ..metrics import OUTBOUND_FAILURES
from ..middleware import replayed
from ..outbound import Policy, Refused
from ..schemas import Control
from ..settings import settings
from . import fetching, preprocessing
from .admission import FETCHES

if t.TYPE_CHECKING:
    from ..middleware import ASGIApp, Receive, Scope, Send

logger = logs.logger(__name__)
DATA_URI = re.compile(r"data:image/[\w.+-]+(;[\w.+-]+=[^;,]*)*;base64,", re.IGNORECASE)
URL_SCHEMES = ("https://", "http://")
MEDIA_TYPE = re.compile(r"[\w.+-]+/[\w.+-]+")
FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")
# The most a form's text field holds (starlette's limit), params sent as a file part too.
PARAMS_MAX_BYTES = 1024 * 1024


def is_reference(value: str) -> bool:
    text = value.strip()
    return bool(DATA_URI.match(text)) or text.lower().startswith(URL_SCHEMES)


async def resolve(value: str, policy: Policy | None = None) -> bytes:
    """The image bytes ``value`` refers to; ``Refused`` says why there are none."""
    policy = policy or outbound.FETCH_POLICY
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
        if where == "URL not fetched":  # a fetch that failed after all: logged and counted
            OUTBOUND_FAILURES.labels(use="fetch", kind="not_image").inc()
            logger.warning(
                "fetch of %s refused (not_image): %d bytes", fetching.host(text), len(data)
            )
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


@functools.cache
def _adapter(annotation: t.Any) -> TypeAdapter[t.Any]:
    return TypeAdapter(annotation)


def _params_checked(model: type[BaseModel], data: t.Mapping[str, t.Any], in_form: bool) -> None:
    """Validate ``params`` before any picture is fetched for it: a request that will be
    refused costs no fetch."""
    declared = model.model_fields.get("params")
    if declared is None:
        return
    if "params" not in data:
        if declared.is_required():
            raise field_error(model.__name__, "params", "Field required")
        return
    value = data["params"]
    adapter = _adapter(declared.annotation)
    try:
        if in_form and isinstance(value, str):
            adapter.validate_json(value)
        elif not in_form:
            adapter.validate_python(value)
    except ValidationError as exc:
        detail = exc.errors(include_url=False, include_input=False)
        raise field_error(model.__name__, "params", "; ".join(map(sentence, detail))) from None


async def _all(work: list[t.Coroutine[t.Any, t.Any, t.Any]]) -> list[t.Any]:
    """Run ``work`` at once; the first failure stops the rest, and is raised."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(item) for item in work]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


def _urls(values: t.Iterable[t.Any]) -> int:
    return sum(isinstance(v, str) and not DATA_URI.match(v.strip()) for v in values)


async def _as_upload(title: str, field: str, value: str, in_form: bool) -> UploadFile:
    if not is_reference(value):
        raise field_error(title, field, _not_a_reference(in_form))
    try:
        data = await resolve(value)
    except Refused as exc:
        raise field_error(title, field, exc.reason) from None
    # No Content-Type: Pillow identifies the image from its bytes.
    return UploadFile(io.BytesIO(data), size=len(data), filename=field, headers=Headers())


async def rewritten(request: Request, model: type[BaseModel]) -> list[tuple[str, t.Any]] | None:
    """The form ``request`` becomes, for ``model``: every reference in a file field
    resolved into the file an upload would have been, ``params`` sent as a file part made
    text, and the file parts ``params.controls`` names moved into it; only ``model``'s
    fields, which BentoML reads (it ignores others). None where nothing changes, or where
    the body is not one to read here (BentoML reads it, and says what is wrong). A picture
    field sent twice is refused, and nothing is fetched before ``params`` is valid."""
    title, file_fields = model.__name__, model.multipart_fields  # type: ignore[attr-defined]
    # In the one spelling middleware.BodyGuard checked and let through.
    media_type = request.headers.get("content-type", "").partition(";")[0]
    if media_type in FORMS:
        try:
            sent = (await request.form()).multi_items()
        except Exception:
            return None
        items = await _control_parts(await _params_as_text(title, sent), file_fields)
        names = [k for k, _ in items if k in file_fields]
        if repeated := sorted({k for k in names if names.count(k) > 1}):
            raise field_error(title, repeated[0], "sent more than once: one picture per field")
        texts = [v for k, v in items if k in file_fields and isinstance(v, str)]
        if not texts:
            return None if items == sent else items
        _params_checked(model, dict(items), in_form=True)
        with FETCHES.held(_urls(texts), request):
            values = await _all(
                [
                    _as_upload(title, k, v, in_form=True)
                    if k in file_fields and isinstance(v, str)
                    else _same(v)
                    for k, v in items
                ]
            )
        return [(k, v) for (k, _), v in zip(items, values, strict=True) if k in model.model_fields]
    try:
        data = json.loads(await request.body())
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    texts = {k: v for k, v in data.items() if k in file_fields and isinstance(v, str)}
    if not texts:
        return None
    for field in file_fields:  # null is "not given"; anything else is no picture
        if data.get(field) is not None and field not in texts:
            raise field_error(title, field, _not_a_reference(in_form=False))
    _params_checked(model, data, in_form=False)
    with FETCHES.held(_urls(texts.values()), request):
        files = await _all([_as_upload(title, k, v, in_form=False) for k, v in texts.items()])
    # The other fields as a form's text fields, which BentoML reads as JSON.
    fields = [
        (k, json.dumps(v))
        for k, v in data.items()
        if k in model.model_fields and k not in file_fields
    ]
    return fields + list(zip(texts, files, strict=True))


async def _same(value: t.Any) -> t.Any:
    return value


async def _params_as_text(title: str, items: list[tuple[str, t.Any]]) -> list[tuple[str, t.Any]]:
    """``items`` with ``params`` sent as a file part made the text field it stands for,
    under a text field's limit, so that it is checked as one; ``params`` sent twice is
    refused (each reader would take another one)."""
    if sum(k == "params" for k, _ in items) > 1:
        raise field_error(title, "params", "sent more than once: send one params field")
    as_text = []
    for k, v in items:
        if k == "params" and isinstance(v, UploadFile):
            data = await v.read(PARAMS_MAX_BYTES + 1)
            if len(data) > PARAMS_MAX_BYTES:
                raise field_error(title, "params", f"over {PARAMS_MAX_BYTES} bytes")
            try:
                v = data.decode()
            except UnicodeDecodeError:
                raise field_error(title, "params", "not UTF-8 text") from None
        as_text.append((k, v))
    return as_text


async def _control_parts(
    items: list[tuple[str, t.Any]], file_fields: list[str]
) -> list[tuple[str, t.Any]]:
    """``items`` with each file part that an entry of ``params.controls`` names as its
    image moved into that entry, as a data URI; the API's own picture fields stay theirs."""
    files = {k: v for k, v in items if isinstance(v, UploadFile) and k not in file_fields}
    texts = [v for k, v in items if k == "params" and isinstance(v, str)]
    try:
        params = json.loads(texts[0]) if len(texts) == 1 and files else None
    except (ValueError, RecursionError):
        return items  # BentoML reads it, and reports what is wrong
    controls = params.get("controls") if isinstance(params, dict) else None
    # Past the most a request may have, nothing is copied in: BentoML refuses the params.
    if not isinstance(controls, list) or len(controls) > settings.max_controls:
        return items
    named: dict[str, str] = {}  # each part read once, however many controls name it
    for control in controls:
        name = control.get("image") if isinstance(control, dict) else None
        if isinstance(name, str) and name in files:
            if name not in named:
                named[name] = base64.b64encode(await files[name].read()).decode()
            control["image"] = f"data:image/upload;base64,{named[name]}"
    if not named:
        return items
    return [
        ("params", json.dumps(params)) if k == "params" else (k, v)
        for k, v in items
        if k not in named
    ]


async def control_pictures(controls: list[Control]) -> list[Image.Image | None]:
    """The images ``controls`` give, opened with only their header read (None where the
    upload stands in); all fetched at once, and the first that fails stops the rest."""
    values = [control.image for control in controls]
    fields = preprocessing.control_fields(len(controls))
    with FETCHES.held(_urls(values)):
        return await _all(
            [
                _control_picture(f, v) if v is not None else _same(None)
                for f, v in zip(fields, values, strict=True)
            ]
        )


async def _control_picture(field: str, value: str) -> Image.Image:
    if not is_reference(value):
        raise InvalidRequest(
            f"{field}: {value[:64]!r} is not an https:// URL, a data:image/…;base64, URI or, "
            "in a form, the name of a file part of the request"
        )
    try:
        data = await resolve(value)
    except Refused as exc:
        raise InvalidRequest(f"{field}: {exc.reason}") from None
    try:
        return preprocessing.check_image_size(Image.open(io.BytesIO(data)))
    except InvalidRequest as exc:
        raise InvalidRequest(f"{field}: {exc.message}") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(f"{field}: could not be read: {exc}") from None


class ResolveReferences:
    """ASGI middleware in front of every API that takes pictures: a request with a picture
    given by reference goes on as the multipart form an upload would have been (``rewritten``),
    so that BentoML, and the job store, only ever read files. A refusal is the 400 the API
    would give, naming the field; a request with nothing to resolve goes on as it came."""

    def __init__(self, app: ASGIApp, service: t.Any) -> None:
        self.app = app
        self.models = {
            api.route + ("/submit" if api.is_task else ""): api.input_spec
            for api in service.apis.values()
            if api.input_spec.multipart_fields
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        is_post = scope["type"] == "http" and scope["method"] == "POST"
        if (model := self.models.get(scope["path"]) if is_post else None) is None:
            return await self.app(scope, receive, send)
        # Bounded: middleware.BodyGuard, outside this one, refused a body over the limit.
        body = await Request(scope, receive).body()
        try:
            items = await rewritten(Request(scope, replayed(body, receive)), model)
            if items is not None:
                content_type, body = await _form_body(model.__name__, items)
        except ValidationError as exc:
            answer: Response = JSONResponse(validation_body(exc), status_code=400)
            return await answer(scope, receive, send)
        except ClientError as exc:
            return await exc.response()(scope, receive, send)
        if items is not None:
            kept = [(k, v) for k, v in scope["headers"] if k not in CONTENT_HEADERS]
            length = str(len(body)).encode()
            headers = [*kept, (b"content-type", content_type), (b"content-length", length)]
            scope = {**scope, "headers": headers}
        await self.app(scope, replayed(body, receive), send)


CONTENT_HEADERS = (b"content-type", b"content-length")


async def _form_body(title: str, items: list[tuple[str, t.Any]]) -> tuple[bytes, bytes]:
    """``items`` (text fields and UploadFiles, named for the API's own fields) as a
    multipart/form-data body, and its Content-Type. A file part is named for its field and
    keeps its Content-Type only where it is a plain ``type/subtype``: nothing the client
    wrote reaches a header."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in items:
        head = f'Content-Disposition: form-data; name="{name}"'
        if isinstance(value, UploadFile):
            await value.seek(0)
            data = await value.read()
            head += f'; filename="{name}"'
            if value.content_type and MEDIA_TYPE.fullmatch(value.content_type):
                head += f"\r\nContent-Type: {value.content_type}"
        else:
            try:
                data = value.encode()
            except UnicodeEncodeError:  # a form in another charset, decoded to surrogates
                raise field_error(title, name, "not UTF-8 text") from None
            if len(data) > PARAMS_MAX_BYTES:  # params holding control pictures: read alike
                head += f'; filename="{name}"\r\nContent-Type: application/json'
        parts.append(b"--%s\r\n%s\r\n\r\n%s\r\n" % (boundary.encode(), head.encode(), data))
    parts.append(b"--%s--\r\n" % boundary.encode())
    return f"multipart/form-data; boundary={boundary}".encode(), b"".join(parts)
