"""The outbound policy (sdxl_controlnet/outbound.py, front/fetching.py) and images by reference
(sdxl_controlnet/references.py) against a real loopback server: what is fetched, and every
refusal with its reason, each within the time cap."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import time
from collections.abc import Iterator

import aiohttp
import httpx
import pytest
from starlette.requests import Request

from devtools.harness import encode, shapes_image
from devtools.receiver import Receiver, receiving
from sdxl_controlnet import outbound
from sdxl_controlnet.errors import validation_body
from sdxl_controlnet.front import admission, fetching, references
from sdxl_controlnet.front.fetching import fetch, post
from sdxl_controlnet.outbound import Policy, Refused
from sdxl_controlnet.settings import AllowEntry, Settings

pytestmark = pytest.mark.anyio
PICTURE = encode(shapes_image(96, 64))
CAP_S = 2.0
MAX_BYTES = 32 * 1024 * 1024
STRICT = Policy("URL_FETCH_ALLOW", (), CAP_S, MAX_BYTES)
LOOPBACK = Policy.from_settings(Settings.from_env({"URL_FETCH_ALLOW": "127.0.0.1"}))
LOOPBACK = Policy("URL_FETCH_ALLOW", LOOPBACK.allow, CAP_S, MAX_BYTES)
POLICY_RULE = "refused by the outbound policy"


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
        ("https://127.0.0.1/", f"{POLICY_RULE}: address"),
        ("https://localhost/", f"{POLICY_RULE}: address"),
        ("https://169.254.169.254/latest/meta-data/", f"{POLICY_RULE}: address"),
        ("https://10.1.2.3/", f"{POLICY_RULE}: address"),
        ("https://[::1]/", f"{POLICY_RULE}: address"),
        ("https://[::ffff:169.254.169.254]/", f"{POLICY_RULE}: address"),
        ("https://224.0.0.1/", f"{POLICY_RULE}: address"),
        ("https://240.0.0.1/", f"{POLICY_RULE}: address"),
        ("https://0.0.0.0/", f"{POLICY_RULE}: address"),
        ("http://example.com/a.png", f"{POLICY_RULE}: http"),
        ("https://user:pass@example.com/", "user name or password"),
        ("https://[::1%25]/", "not a valid host: a zone id"),
        ("https://2130706433/", "an IPv4 address is written as four decimal numbers"),
        ("https://" + "a" * 64 + ".com/", "not a valid host name"),
        ("http://[::1", "not a valid URL"),
        ("https://example.com:0/", "not a valid port: 0"),
    ],
)
async def test_addresses_and_schemes_are_refused_naming_only_the_rule(
    url: str, reason: str
) -> None:
    refused = await refusal(url, STRICT)
    assert reason in refused.reason
    assert refused.kind in ("policy", "url")
    for secret in ("127.0.0.1", "169.254", "10.1.2.3", "::1", "localhost", "example.com"):
        assert secret not in refused.reason  # names and addresses go to the log only


async def test_loopback_is_refused_unless_allowed(receiver: Receiver) -> None:
    connections = receiver.connections
    for url in (f"{receiver.url}/picture", f"{receiver.url}/picture".replace("http:", "https:")):
        refused = await refusal(url, STRICT)
        assert refused.reason.startswith(f"URL not fetched: {POLICY_RULE}: address")
    assert receiver.connections == connections  # never connected
    await references.resolve(f"{receiver.url}/picture", LOOPBACK)
    assert receiver.connections > connections  # and the count sees one that is made


@contextlib.contextmanager
def listening() -> Iterator[tuple[int, list[socket.socket]]]:
    """A loopback port listened on over IPv4 and, where the host has it, IPv6, never
    answering: a connection made to it waits, unaccepted, to be counted."""
    v4 = socket.create_server(("127.0.0.1", 0))
    port = v4.getsockname()[1]
    listeners = [v4]
    with contextlib.suppress(OSError):
        listeners.append(socket.create_server(("::1", port), family=socket.AF_INET6))
    try:
        yield port, listeners
    finally:
        for listener in listeners:
            listener.close()


def accepted(listeners: list[socket.socket]) -> int:
    count = 0
    for listener in listeners:
        listener.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                listener.accept()[0].close()
                count += 1
    return count


SPELLINGS = [
    "127.0.0.1",
    "127.1",
    "127.0.1",
    "2130706433",
    "0x7f000001",
    "017700000001",
    "0177.0.0.1",
    "0x7f.0.0.1",
    "0x7f.1",
    "0177.1",
    "127.000.000.001",
    "127.0.0.1.",
    "%31%32%37.0.0.1",
    "\uff11\uff12\uff17.0.0.1",  # full-width digits, which URL parsing folds to ASCII
    "localhost",
    "0.0.0.0",
    "0",
    "[::1]",
    "[0:0:0:0:0:0:0:1]",
    "[::1%25]",
    "[::1%25lo]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[::ffff:127.0.0.1%25]",
    "[::ffff:169.254.169.254%25]",
    "[::127.0.0.1]",
    "[::]",
]


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_no_spelling_of_an_internal_address_reaches_it(scheme: str) -> None:
    webhooks = Policy("WEBHOOK_ALLOW", (), 0.5, MAX_BYTES)
    with listening() as (port, listeners):
        for spelling in SPELLINGS:
            url = f"{scheme}://{spelling}:{port}/"
            with pytest.raises(Refused) as refused:
                await fetch(url, Policy("URL_FETCH_ALLOW", (), 0.5, MAX_BYTES))
            assert refused.value.kind in ("policy", "url"), (url, refused.value.detail)
            with pytest.raises(Refused) as refused:
                await post(url, b"{}", {}, webhooks)
            assert refused.value.kind in ("policy", "url"), (url, refused.value.detail)
        assert accepted(listeners) == 0
        # The count is real: a destination the allow-list names is connected to.
        allowed = Policy("URL_FETCH_ALLOW", (AllowEntry("localhost", None, port),), 0.5, 1024)
        with pytest.raises(Refused):
            await fetch(f"http://localhost:{port}/", allowed)
        assert accepted(listeners) >= 1


async def test_an_allowed_port_is_the_only_one_allowed(receiver: Receiver) -> None:
    port = int(receiver.url.rsplit(":", 1)[1])
    for entry in (f"127.0.0.1:{port}", f"127.0.0.0/8:{port}", f"localhost:{port}"):
        policy = Policy.from_settings(Settings.from_env({"URL_FETCH_ALLOW": entry}))
        url = f"http://{'localhost' if 'localhost' in entry else '127.0.0.1'}:{port}/picture"
        assert await fetch(url, policy) == PICTURE
        other = url.replace(f":{port}/", f":{port + 1 if port < 65535 else port - 1}/")
        assert (await refusal(other, policy)).kind == "policy"


async def test_each_use_has_its_own_allow_list(receiver: Receiver) -> None:
    values = Settings.from_env({"WEBHOOK_ALLOW": "127.0.0.1"})
    assert (await refusal(f"{receiver.url}/picture", Policy.from_settings(values))).kind == (
        "policy"
    )
    answer = await post(f"{receiver.url}/hook", b"{}", {}, Policy.from_settings(values, "webhook"))
    assert answer.status == 200


async def test_a_redirect_to_the_metadata_address_is_refused(receiver: Receiver) -> None:
    to = "http://169.254.169.254/latest/meta-data/"
    refused = await refusal(f"{receiver.url}/redirect?to={to}")
    assert refused.reason.startswith(f"URL not fetched: redirected: {POLICY_RULE}: ")
    assert "169.254" not in refused.reason


async def test_a_redirect_to_an_invalid_url_is_refused_as_one(receiver: Receiver) -> None:
    refused = await refusal(f"{receiver.url}/redirect?to=http://[::1")
    assert refused.kind == "url" and "redirected" in refused.reason


async def test_redirects_are_followed_three_times_at_most(receiver: Receiver) -> None:
    url = f"{receiver.url}/picture"
    for _ in range(3):
        url = f"{receiver.url}/redirect?to={url}"
    assert await fetch(url, LOOPBACK) == PICTURE
    refused = await refusal(f"{receiver.url}/redirect?to={url}")
    assert "more than 3 redirects" in refused.reason


@pytest.mark.parametrize("path", ["/huge", "/huge-chunked"])
async def test_a_300_mb_body_is_cut_at_the_upload_cap(receiver: Receiver, path: str) -> None:
    policy = Policy("URL_FETCH_ALLOW", LOOPBACK.allow, CAP_S, 1024 * 1024)
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


async def test_content_that_is_not_an_image_is_refused_logged_and_counted(
    receiver: Receiver, caplog
) -> None:
    from sdxl_controlnet.metrics import OUTBOUND_FAILURES

    counted = OUTBOUND_FAILURES.labels(use="fetch", kind="not_image")._value.get()
    with caplog.at_level("WARNING"):
        refused = await refusal(f"{receiver.url}/text")  # declared image/png
    assert refused.kind == "not_image"
    assert "not an image, whatever its Content-Type" in refused.reason
    assert "fetch of 127.0.0.1 refused (not_image)" in caplog.text
    assert OUTBOUND_FAILURES.labels(use="fetch", kind="not_image")._value.get() == counted + 1


async def test_an_error_answer_and_an_unknown_host_are_refused(receiver: Receiver) -> None:
    assert "answered 404" in (await refusal(f"{receiver.url}/nothing")).reason
    unknown = await refusal("https://no-such-host.invalid/a.png", STRICT)
    assert unknown.kind == "network" and unknown.reason == "URL not fetched: could not be reached"
    closed = await refusal(f"{receiver.url.rsplit(':', 1)[0]}:1/")
    assert closed.reason == unknown.reason  # whether a name exists or a port is open: untold


async def test_data_uris_are_decoded_and_held_to_the_same_rules() -> None:
    uri = "data:image/png;base64," + base64.b64encode(PICTURE).decode()
    assert await references.resolve(uri, STRICT) == PICTURE
    small = Policy("URL_FETCH_ALLOW", (), CAP_S, 100)
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
    return raw_request(
        httpx.Request("POST", "http://front/", files={k: (None, v) for k, v in fields.items()})
    )


def raw_request(built: httpx.Request) -> Request:
    body = built.read()

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(b"content-type", built.headers["content-type"].encode())]
    return Request({"type": "http", "method": "POST", "headers": headers}, receive)


async def test_bentoml_never_downloads_a_text_in_a_files_place(monkeypatch) -> None:
    """BentoML 1.4.40's MultipartSerde.ensure_file would download a form text field in a
    file's place itself; ResolveReferences, in front of the API, resolves the references
    first, so that BentoML only ever reads files, whether the request was a form or JSON."""
    from _bentoml_impl.serde import ALL_SERDE, MultipartSerde

    import service

    seen: list[object] = []
    ensure_file = MultipartSerde.ensure_file

    async def recording(value: object) -> object:
        seen.append(value)
        return await ensure_file(value)

    monkeypatch.setattr(MultipartSerde, "ensure_file", staticmethod(recording))
    spec = service.ControlNet.apis["generate"].input_spec
    read: list[object] = []

    async def api(scope: dict, receive: object, send: object) -> None:  # as BentoML reads
        request = Request(scope, receive)
        media_type = request.headers["content-type"].partition(";")[0]
        read.append(await spec.from_http_request(request, ALL_SERDE[media_type]()))

    data_uri = "data:image/png;base64," + base64.b64encode(PICTURE).decode()
    for built in (
        httpx.Request(
            "POST", "http://front/generate", files={"image": (None, data_uri)}, data=PARAMS
        ),
        httpx.Request("POST", "http://front/generate", json={"image": data_uri, **PARAMS_JSON}),
    ):
        request = raw_request(built)
        await references.ResolveReferences(api, service=service.ControlNet)(
            {**request.scope, "path": "/generate"}, request.receive, None
        )
    assert [model.image.size for model in read] == [(96, 64), (96, 64)]
    assert seen and not any(isinstance(value, str) for value in seen)


PARAMS_JSON = {"params": {"prompt": "x"}}
PARAMS = {"params": json.dumps(PARAMS_JSON["params"])}


def input_spec(api: str = "generate") -> type:
    import service

    return service.ControlNet.apis[api].input_spec


async def test_a_picture_field_sent_twice_is_refused_before_any_fetch(receiver: Receiver) -> None:
    from pydantic import ValidationError

    fetched = len(receiver.fetches)
    built = httpx.Request(
        "POST",
        "http://front/",
        files=[("image", (None, f"{receiver.url}/picture"))] * 3
        + [("params", (None, '{"prompt": "x"}'))],
    )
    request = raw_request(built)
    with pytest.raises(ValidationError) as refused:
        await references.rewritten(request, input_spec())
    error = validation_body(refused.value)["error"]
    assert "image: sent more than once: one picture per field" in error
    assert receiver.fetches[fetched:] == []


async def test_nothing_is_fetched_for_invalid_params(receiver: Receiver) -> None:
    from pydantic import ValidationError

    fetched = len(receiver.fetches)
    for request in (
        form_request(image=f"{receiver.url}/picture", params='{"prompt": "x", "width": -1}'),
        bentoml_request(image=f"{receiver.url}/picture", params={"num_inference_steps": 0}),
        bentoml_request(image=f"{receiver.url}/picture"),
    ):
        with pytest.raises(ValidationError) as refused:
            await references.rewritten(request, input_spec())
        assert "params" in validation_body(refused.value)["error"]
    assert receiver.fetches[fetched:] == []


async def test_when_one_fetch_fails_its_siblings_are_canceled(
    receiver: Receiver, monkeypatch
) -> None:
    import asyncio

    from pydantic import ValidationError

    monkeypatch.setattr(outbound, "FETCH_POLICY", LOOPBACK)
    request = bentoml_request(
        image=f"{receiver.url}/silent",
        init_image=f"{receiver.url}/silent",
        mask=f"{receiver.url}/nothing",
        params={"prompt": "x"},
    )
    start = time.monotonic()
    with pytest.raises(ValidationError) as refused:
        await references.rewritten(request, input_spec())
    error = validation_body(refused.value)["error"]
    assert "mask: URL not fetched: the server answered 404" in error
    assert time.monotonic() - start < CAP_S  # the silent ones were not waited for
    await asyncio.sleep(0)
    left = [t for t in asyncio.all_tasks() if "_as_upload" in repr(t.get_coro())]
    assert left == []  # and none of them goes on
    assert admission.FETCHES.in_use == 0


async def test_past_the_worker_s_fetch_cap_a_request_is_a_503_to_retry(
    receiver: Receiver, monkeypatch
) -> None:
    from sdxl_controlnet.errors import ServiceBusy
    from sdxl_controlnet.middleware import RETRY_AFTER
    from sdxl_controlnet.settings import settings

    monkeypatch.setattr(admission.FETCHES, "in_use", settings.max_concurrent_fetches - 1)
    fetched = len(receiver.fetches)
    request = bentoml_request(
        image=f"{receiver.url}/picture", mask=f"{receiver.url}/picture", params={"prompt": "x"}
    )
    with pytest.raises(ServiceBusy) as busy:
        await references.rewritten(request, input_spec())
    assert busy.value.error_code == 503 and busy.value.retry_after_s == 1
    assert "fetching all the pictures it can at once" in busy.value.message
    assert request.scope[RETRY_AFTER] == 1  # ErrorBodies sends it as Retry-After
    assert receiver.fetches[fetched:] == []
    assert admission.FETCHES.in_use == settings.max_concurrent_fetches - 1


async def test_error_bodies_sends_the_retry_after_of_an_answer_bentoml_built() -> None:
    from sdxl_controlnet.middleware import RETRY_AFTER, ErrorBodies

    async def bentoml_answer(scope: dict, receive: object, send: object) -> None:
        scope[RETRY_AFTER] = 1  # as references does, before BentoML answers without it
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b'{"error": "busy"}'})

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    await ErrorBodies(bentoml_answer)({"type": "http"}, None, send)
    assert (b"retry-after", b"1") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"] == "busy"


@contextlib.contextmanager
def silent_nameserver() -> Iterator[str]:
    """A DNS server that reads every query and never answers: ``ip:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{server.getsockname()[1]}"


async def test_names_that_never_answer_hold_up_no_other_lookup(
    receiver: Receiver, monkeypatch
) -> None:
    with silent_nameserver() as nameserver:
        # The fault: every lookup that leaves the host goes to a server that never answers
        # (c-ares gives up on it before the fetch's own cap, and before the test ends).
        monkeypatch.setattr(
            fetching,
            "_lookups",
            lambda: aiohttp.AsyncResolver(nameservers=[nameserver], timeout=CAP_S / 2, tries=1),
        )
        stalled = [fetch(f"https://stalled-{i}.example/picture", LOOPBACK) for i in range(16)]
        pending = [asyncio.ensure_future(lookup) for lookup in stalled]
        await asyncio.sleep(0.2)  # every one of them waiting on the silent server
        start = time.monotonic()
        # A name the host itself knows (/etc/hosts), while sixteen lookups hang.
        local = f"http://localhost:{receiver.url.rsplit(':', 1)[1]}/picture"
        by_name = Policy.from_settings(Settings.from_env({"URL_FETCH_ALLOW": "localhost"}))
        assert await fetch(local, by_name) == PICTURE
        assert time.monotonic() - start < 0.5
        failures = await asyncio.gather(*pending, return_exceptions=True)
    assert {type(f) for f in failures} == {Refused}
    assert {f.kind for f in failures} <= {"timeout", "network"}


async def test_a_failure_inside_the_front_s_middleware_is_a_json_500_at_once(caplog) -> None:
    from sdxl_controlnet.middleware import SERVER_FAILURE, ErrorBodies

    async def broken(scope: dict, receive: object, send: object) -> None:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/generate_task/submit"}
    await ErrorBodies(broken)(scope, None, send)
    assert sent[0]["status"] == 500
    assert json.loads(sent[1]["body"]) == {"error": SERVER_FAILURE}
    assert "POST /generate_task/submit failed on the server" in caplog.text


async def through_references(built: httpx.Request, api: str = "generate") -> tuple[int, object]:
    """``built`` sent through ResolveReferences: its status where it answers itself, or
    the form (a list of (name, value)) the API would read, parsed as BentoML parses it."""
    import service

    received: list[object] = []
    answered: list[int] = []

    async def app(scope: dict, receive: object, send: object) -> None:  # BentoML's place
        received.append((await Request(scope, receive).form()).multi_items())

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answered.append(message["status"])

    request = raw_request(built)
    scope = {**request.scope, "path": f"/{api}"}
    await references.ResolveReferences(app, service=service.ControlNet)(
        scope, request.receive, send
    )
    return (answered[0], None) if answered else (200, received[0])


DATA_URI = "data:image/png;base64," + base64.b64encode(PICTURE).decode()


async def test_the_rewritten_form_names_only_the_api_s_fields() -> None:
    """A part name that the rebuilt body's header would read otherwise (a backslash before
    its closing quote, then a name of the API's own) is dropped, with every name the API
    does not take: BentoML's downloader never sees a text in a picture's place."""
    smuggled = b'form-data; name=z\\; filename="; name=init_image; x="'
    parts = [
        (b'form-data; name="image"', DATA_URI.encode()),
        (b'form-data; name="params"', b'{"prompt": "x"}'),
        (smuggled, b"http://127.0.0.1:1/a.png"),
    ]
    body = b"".join(b"--b\r\nContent-Disposition: %s\r\n\r\n%s\r\n" % part for part in parts)
    built = httpx.Request(
        "POST",
        "http://front/generate",
        content=body + b"--b--\r\n",
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    status, form = await through_references(built)
    assert status == 200
    assert [name for name, _ in form] == ["image", "params"]
    assert not isinstance(dict(form)["image"], str)


async def test_a_json_null_picture_is_absent_and_a_number_is_refused() -> None:
    given = {"image": DATA_URI, "params": {"prompt": "x"}}
    status, form = await through_references(
        httpx.Request("POST", "http://front/generate", json={**given, "init_image": None})
    )
    assert status == 200 and [name for name, _ in form] == ["params", "image"]
    status, _ = await through_references(
        httpx.Request("POST", "http://front/generate", json={**given, "init_image": 5})
    )
    assert status == 400


async def test_a_part_named_by_more_controls_than_allowed_is_not_copied_in() -> None:
    controls = [{"type": "depth", "image": "d"}] * 1000
    built = httpx.Request(
        "POST",
        "http://front/generate",
        files=[
            ("image", ("a.png", PICTURE, "image/png")),
            ("d", ("d.png", PICTURE, "image/png")),
            ("params", (None, json.dumps({"prompt": "x", "controls": controls}))),
        ],
    )
    status, form = await through_references(built)
    assert status == 200
    params = dict(form)["params"]
    assert "data:image" not in params and len(params) < 50_000


async def test_a_form_in_another_charset_is_no_server_error() -> None:
    """UTF-7 decodes "+2AA-" to a lone surrogate, which no UTF-8 body can carry: in a field
    the API does not take, it is dropped; in params, it is a 400."""
    for params, expected in (('{"prompt": "x"}', 200), ('{"prompt": "+2AA-"}', 400)):
        built = httpx.Request(
            "POST",
            "http://front/generate",
            files=[
                ("image", (None, DATA_URI)),
                ("params", (None, params)),
                ("note", (None, "+2AA-")),
            ],
        )
        headers = {"content-type": built.headers["content-type"] + "; charset=utf-7"}
        built = httpx.Request(
            "POST", "http://front/generate", content=built.read(), headers=headers
        )
        status, _ = await through_references(built)
        assert status == expected, params
