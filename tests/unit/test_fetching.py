"""The outbound policy (sdxl_controlnet/fetching.py) and images by reference
(sdxl_controlnet/references.py) against a real loopback server: what is fetched, and every
refusal with its reason, each within the time cap."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator

import httpx
import pytest
from starlette.requests import Request

from devtools.harness import encode, shapes_image
from devtools.receiver import Receiver, receiving
from sdxl_controlnet.bentoml_compat import request_reading
from sdxl_controlnet.front import references
from sdxl_controlnet.front.fetching import Policy, Refused, fetch
from sdxl_controlnet.settings import Settings

pytestmark = pytest.mark.anyio
PICTURE = encode(shapes_image(96, 64))
CAP_S = 2.0
STRICT = Policy(frozenset(), (), CAP_S, 32 * 1024 * 1024)
LOOPBACK = Policy(frozenset({"127.0.0.1"}), (), CAP_S, 32 * 1024 * 1024)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with receiving(PICTURE) as receiver:
        yield receiver


async def refusal(url: str, policy: Policy = LOOPBACK) -> Refused:
    with pytest.raises(Refused) as refused:
        await references.resolve(url, policy)
    return refused.value


async def test_an_allowed_host_is_fetched_and_its_content_decides(receiver: Receiver) -> None:
    # Served as text/html: the bytes, not the Content-Type, make it an image.
    assert await references.resolve(f"{receiver.url}/picture", LOOPBACK) == PICTURE
    assert await fetch(f"{receiver.url}/picture", LOOPBACK) == PICTURE


async def test_a_network_in_the_allow_list_allows_its_addresses(receiver: Receiver) -> None:
    policy = Policy.from_settings(Settings.from_env({"URL_FETCH_ALLOW": "127.0.0.0/8"}))
    assert await fetch(f"{receiver.url}/picture", policy) == PICTURE


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://127.0.0.1/", "127.0.0.1 is a loopback address"),
        ("https://localhost/", "localhost (127.0.0.1) is a loopback address"),
        ("https://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("https://10.1.2.3/", "10.1.2.3 is a private address"),
        ("https://[::1]/", "is a loopback address"),
        ("https://[::ffff:169.254.169.254]/", "is a link-local address"),
        ("https://224.0.0.1/", "is a multicast address"),
        ("https://240.0.0.1/", "is a reserved address"),
        ("https://0.0.0.0/", "is a unspecified address"),
        ("http://example.com/a.png", "http is refused: use https"),
        ("https://user:pass@example.com/", "user name or password"),
    ],
)
async def test_addresses_and_schemes_are_refused_before_connecting(url: str, reason: str) -> None:
    refused = await refusal(url, STRICT)
    assert reason in refused.reason
    assert refused.kind in ("address", "url")


async def test_loopback_is_refused_unless_allowed(receiver: Receiver) -> None:
    fetched = len(receiver.fetches)
    refused = await refusal(f"{receiver.url}/picture".replace("http:", "https:"), STRICT)
    assert "address refused: 127.0.0.1 is a loopback address" in refused.reason
    assert len(receiver.fetches) == fetched  # never connected


async def test_a_redirect_to_the_metadata_address_is_refused(receiver: Receiver) -> None:
    to = "http://169.254.169.254/latest/meta-data/"
    refused = await refusal(f"{receiver.url}/redirect?to={to}")
    assert refused.reason == (
        f"URL not fetched: redirected to {to}: address refused: 169.254.169.254 is a "
        "link-local address; only public addresses are fetched, unless the server's "
        "URL_FETCH_ALLOW lists the host"
    )


async def test_redirects_are_followed_three_times_at_most(receiver: Receiver) -> None:
    url = f"{receiver.url}/picture"
    for _ in range(3):
        url = f"{receiver.url}/redirect?to={url}"
    assert await fetch(url, LOOPBACK) == PICTURE
    refused = await refusal(f"{receiver.url}/redirect?to={url}")
    assert "more than 3 redirects" in refused.reason


@pytest.mark.parametrize("path", ["/huge", "/huge-chunked"])
async def test_a_300_mb_body_is_cut_at_the_upload_cap(receiver: Receiver, path: str) -> None:
    policy = Policy(LOOPBACK.allow_hosts, (), CAP_S, 1024 * 1024)
    start = time.monotonic()
    refused = await refusal(f"{receiver.url}{path}", policy)
    assert refused.kind == "too_large"
    assert "too large: over 1048576 bytes" in refused.reason
    assert time.monotonic() - start < CAP_S + 1


async def test_a_server_that_never_answers_times_out_within_the_cap(receiver: Receiver) -> None:
    start = time.monotonic()
    refused = await refusal(f"{receiver.url}/silent")
    waited = time.monotonic() - start
    assert refused.kind == "timeout" and f"timed out after {CAP_S:g} s" in refused.reason
    assert CAP_S - 0.1 < waited < CAP_S + 1


async def test_content_that_is_not_an_image_is_refused(receiver: Receiver) -> None:
    refused = await refusal(f"{receiver.url}/text")  # declared image/png
    assert refused.kind == "not_image"
    assert "not an image, whatever its Content-Type" in refused.reason


async def test_an_error_answer_and_an_unknown_host_are_refused(receiver: Receiver) -> None:
    assert "answered 404" in (await refusal(f"{receiver.url}/nothing")).reason
    unknown = await refusal("https://no-such-host.invalid/a.png", STRICT)
    assert unknown.kind == "network" and "could not be resolved" in unknown.reason


async def test_data_uris_are_decoded_and_held_to_the_same_rules() -> None:
    uri = "data:image/png;base64," + base64.b64encode(PICTURE).decode()
    assert await references.resolve(uri, STRICT) == PICTURE
    small = Policy(frozenset(), (), CAP_S, 100)
    assert (await refusal(uri, small)).kind == "too_large"
    assert "not valid base64" in (await refusal("data:image/png;base64,@@@", STRICT)).reason
    text = "data:image/png;base64," + base64.b64encode(b"hello").decode()
    assert (await refusal(text, STRICT)).kind == "not_image"


def bentoml_request(**fields: object) -> Request:
    """A JSON request to /generate as BentoML's server hands it to the input model."""
    body = json.dumps(fields).encode()

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(b"content-type", b"application/json")]
    return Request({"type": "http", "method": "POST", "headers": headers}, receive)


def form_request(**fields: str) -> Request:
    built = httpx.Request("POST", "http://front/", files={k: (None, v) for k, v in fields.items()})
    body = built.read()

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(b"content-type", built.headers["content-type"].encode())]
    return Request({"type": "http", "method": "POST", "headers": headers}, receive)


async def test_bentoml_never_downloads_a_text_in_a_files_place(monkeypatch) -> None:
    """BentoML 1.4.40's MultipartSerde.ensure_file would download a form text field in a
    file's place itself; the references are resolved first, so it only ever sees files."""
    from _bentoml_impl.serde import ALL_SERDE, MultipartSerde

    seen: list[object] = []
    ensure_file = MultipartSerde.ensure_file

    async def recording(value: object) -> object:
        seen.append(value)
        return await ensure_file(value)

    monkeypatch.setattr(MultipartSerde, "ensure_file", staticmethod(recording))
    request_reading.apply()
    import service

    spec = service.ControlNet.apis["generate"].input_spec
    data_uri = "data:image/png;base64," + base64.b64encode(PICTURE).decode()
    serde = ALL_SERDE["multipart/form-data"]()
    read = await spec.from_http_request(
        form_request(image=data_uri, params='{"prompt": "x"}'), serde
    )
    assert read.image.size == (96, 64)
    assert seen and not any(isinstance(value, str) for value in seen)
    json_read = await spec.from_http_request(
        bentoml_request(image=data_uri, params={"prompt": "x"}), ALL_SERDE["application/json"]()
    )
    assert json_read.image.size == (96, 64)
