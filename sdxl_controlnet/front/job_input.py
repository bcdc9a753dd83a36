"""What a job stores to run again, read from its submit and back: its ``params`` as
validated (the webhook secret apart, in the store's own field), and the bytes of its
pictures, resolved (a picture given by URL is fetched once, at submit). One JSON document,
read back through the API's own input model, so that a job is validated as it was taken.

A job keeps the API's input, not the GPU Service's request (``schemas.GPURequest``) made from
it: a job can wait in a shared line while replicas of the next version take over, and the
API's input is the contract both versions keep; the GPU request is internal and may change
between them. It is also the smaller: a 1024² picture as sent, against 3 MiB for its RGB
array and 1 MiB for each control map.
"""

from __future__ import annotations

import base64
import io
import json
import typing as t

from _bentoml_impl.serde import ALL_SERDE
from starlette.datastructures import Headers, UploadFile
from starlette.requests import Request

from ..middleware import READABLE_MEDIA_TYPES
from ..schemas import WHOLE_IMAGES

PICTURES = ("image", "init_image", "mask")


async def read(input_spec: t.Any, request: Request) -> tuple[bytes, str | None]:
    """``request``'s input to the job API (``input_spec``), read as its endpoint reads it:
    what the store keeps of it, and the job's own webhook secret. Raises what the endpoint
    would answer with (a ValidationError or a BentoMLException). ``request``'s body must
    have been read; its files are closed afterwards."""
    # The type in the spelling middleware.BodyGuard checked: never the pickle reader.
    media_type = request.headers.get("content-type", "application/json").partition(";")[0]
    readable = media_type.encode() in READABLE_MEDIA_TYPES
    serde = ALL_SERDE[media_type if readable else "application/json"]()
    try:
        model = await input_spec.from_http_request(request, serde)
        pictures = {
            field: base64.b64encode(await _picture(request, field)).decode()
            for field in PICTURES
            if getattr(model, field, None) is not None
        }
    finally:
        await request.close()
    params = model.params
    secret = params.webhook_secret.get_secret_value() if params.webhook_secret else None
    whole = params.model_dump(mode="json", context={WHOLE_IMAGES: True})
    stored = {"params": whole, "pictures": pictures}
    return json.dumps(stored, separators=(",", ":")).encode(), secret


async def _picture(request: Request, field: str) -> bytes:
    """The bytes of picture ``field``, a file part: references.ResolveReferences, in front
    of the job endpoints, made every picture one."""
    part = (await request.form()).get(field)
    assert isinstance(part, UploadFile), "a picture field is a file once read"
    await part.seek(0)
    return await part.read()


def decode(input_spec: t.Any, stored: bytes, secret: str | None) -> t.Any:
    """A stored job's input, as the API's input model: its pictures opened (their headers
    read), its params validated again."""
    data = json.loads(stored)
    params = data["params"] if secret is None else {**data["params"], "webhook_secret": secret}
    pictures = {
        field: UploadFile(io.BytesIO(base64.b64decode(value)), filename=field, headers=Headers())
        for field, value in data["pictures"].items()
    }
    return input_spec.model_validate({"params": params, **pictures})
