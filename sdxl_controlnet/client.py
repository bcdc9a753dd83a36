"""A small typed client for the ControlNet Service's HTTP API, sync and async, on httpx.

from sdxl_controlnet.client import Client

with Client("http://localhost:3000") as client:
    png = client.generate("photo.jpg", prompt="a watercolor house", seed=7)
"""

from __future__ import annotations

import json
import os
import typing as t
from pathlib import Path

import httpx

DEFAULT_URL = "http://localhost:3000"
# The front gives up after its own traffic timeout (330 s by default): wait as long.
DEFAULT_TIMEOUT_S = 330.0

ImageSource = str | os.PathLike[str] | bytes


def _form(image: ImageSource, params: dict[str, t.Any]) -> dict[str, t.Any]:
    """POST /generate's multipart form: the image file and the parameters as JSON."""
    content = image if isinstance(image, bytes) else Path(image).read_bytes()
    return {"files": {"image": ("image", content)}, "data": {"params": json.dumps(params)}}


def _image(response: httpx.Response) -> bytes:
    """The image, or an error carrying the Service's message, which names the bad field."""
    if response.is_error:
        raise httpx.HTTPStatusError(
            f"{response.status_code} from {response.url}: {response.text}",
            request=response.request,
            response=response,
        )
    return response.content


class Client:
    """Calls the ControlNet Service; ``generate`` returns the encoded image (PNG by default)."""

    def __init__(self, url: str = DEFAULT_URL, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self._http = httpx.Client(base_url=url, timeout=timeout)

    def generate(self, image: ImageSource, **params: t.Any) -> bytes:
        """An image following the edges of ``image`` (a path or the file's bytes);
        ``params`` are the request's parameters, ``prompt`` at least."""
        return _image(self._http.post("/generate", **_form(image, params)))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> t.Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of ``Client``."""

    def __init__(self, url: str = DEFAULT_URL, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self._http = httpx.AsyncClient(base_url=url, timeout=timeout)

    async def generate(self, image: ImageSource, **params: t.Any) -> bytes:
        """An image following the edges of ``image`` (a path or the file's bytes);
        ``params`` are the request's parameters, ``prompt`` at least."""
        return _image(await self._http.post("/generate", **_form(image, params)))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> t.Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
