"""Each BentoML defect this project works around, reproduced on the installed BentoML as
shipped, and the fence around the workarounds (``sdxl_controlnet/bentoml_compat``).

A reproduction that fails means upstream behaves otherwise now: delete the workaround it
names, and this test with it."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import sqlite3
import tempfile
import threading
import time
import typing as t
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import bentoml
import httpx
import pytest
import uvicorn
from _bentoml_impl.client.proxy2 import AsyncClient, SessionManager
from _bentoml_impl.tasks import ResultStatus
from _bentoml_impl.tasks.result import Sqlite3Store
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from sdxl_controlnet import bentoml_compat
from sdxl_controlnet.bentoml_compat import connections, request_reading, stream_close


def test_the_pinned_version_is_the_one_the_workarounds_were_written_for() -> None:
    assert bentoml.__version__ == bentoml_compat.TESTED_VERSION


class _Response:
    """What ``_parse_stream_response`` reads of an aiohttp response."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.closed = False
        self.content = self

    async def iter_chunked(self, _: int) -> AsyncIterator[bytes]:
        for chunk in (b'{"step": 1}\n', b'{"step": 2}\n'):
            yield chunk

    def close(self) -> None:
        self.closed = True


class _Client:
    def _deserialize_output(self, payload: object, endpoint: object) -> object:
        return payload


async def _abandon(read_stream) -> _Response:
    response = _Response()
    stream = read_stream(_Client(), None, response)
    await stream.__anext__()
    await stream.aclose()  # the reader leaves after one chunk
    return response


@pytest.mark.anyio
async def test_defect_an_abandoned_stream_leaves_its_response_open() -> None:
    """stream_close: upstream's reader, abandoned, never closes the response."""
    upstream = inspect.unwrap(AsyncClient._parse_stream_response)
    assert not (await _abandon(upstream)).closed
    stream_close.apply()
    assert (await _abandon(AsyncClient._parse_stream_response)).closed


def _form(fields: dict[str, bytes]) -> Request:
    built = httpx.Request("POST", "http://front/", files={k: (None, v) for k, v in fields.items()})
    body = built.read()

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(b"content-type", built.headers["content-type"].encode())]
    return Request({"type": "http", "method": "POST", "headers": headers}, receive)


DEEP = b"[" * 100_000  # JSON that json.loads gives up on with a RecursionError


@pytest.mark.anyio
async def test_defect_a_form_field_nested_too_deep_is_not_a_validation_error() -> None:
    """request_reading: upstream lets out what is not a validation error, and BentoML
    answers it with a 500; wrapped, it is a 400 naming the field."""
    from _bentoml_impl.serde import ALL_SERDE
    from _bentoml_sdk.io_models import IOMixin

    import service

    spec = service.ControlNet.apis["canny"].input_spec
    serde = ALL_SERDE["multipart/form-data"]()
    upstream = inspect.unwrap(IOMixin.__dict__["from_http_request"].__func__)
    with pytest.raises(Exception) as raised:
        await upstream(spec, _form({"params": DEEP}), serde)
    assert not isinstance(raised.value, ValidationError)

    request_reading.apply()
    with pytest.raises(ValidationError) as refused:
        await spec.from_http_request(_form({"params": DEEP}), serde)
    assert refused.value.errors()[0]["loc"] == ("params",)


def test_defect_the_sync_client_cannot_submit_a_task(monkeypatch) -> None:
    """devtools/bentoml_client.py: ``_submit`` reads an attribute the client lost."""
    from _bentoml_impl.client.base import ClientFileManager
    from _bentoml_impl.client.http import SyncHTTPClient

    from devtools.bentoml_client import let_the_sync_client_submit_tasks

    if "_opened_files" in SyncHTTPClient.__dict__:  # fixed in this process already
        monkeypatch.delattr(SyncHTTPClient, "_opened_files")
    assert "self._opened_files" in inspect.getsource(SyncHTTPClient._submit)
    client = SyncHTTPClient.__new__(SyncHTTPClient)
    object.__setattr__(client, "_file_manager", ClientFileManager())
    with pytest.raises(AttributeError):
        client._opened_files  # noqa: B018
    let_the_sync_client_submit_tasks()
    assert client._opened_files == []


def test_defect_connections_are_recycled_after_100_requests_or_300_s() -> None:
    """connections.NEVER_RECYCLE: upstream's limits, and that its own settings lift them."""
    upstream = inspect.signature(SessionManager.__init__).parameters
    assert upstream["max_requests"].default == 100
    assert upstream["max_age"].default == 300
    manager = SessionManager("http://gpu", 60, {}, **connections.NEVER_RECYCLE)
    assert (manager.max_requests, manager.max_age) == (connections.NEVER, connections.NEVER)


@pytest.fixture
def gpu_socket() -> Iterator[str]:
    """A Unix socket path short enough for AF_UNIX, as BentoML gives a dependency Service."""
    with tempfile.TemporaryDirectory() as folder:
        yield os.path.join(folder, "gpu.sock")


@contextlib.contextmanager
def _gpu_service(path: str, keep_alive_s: int) -> Iterator[list[bytes]]:
    """uvicorn on ``path`` in a thread of its own, answering each request with its body;
    yields the bodies it read."""
    bodies: list[bytes] = []

    async def app(scope: dict, receive: t.Callable, send: t.Callable) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    config = uvicorn.Config(app, uds=path, timeout_keep_alive=keep_alive_s, log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield bodies
    finally:
        server.should_exit = True
        thread.join()


async def _idle_past_keep_alive(session: aiohttp.ClientSession) -> None:
    """One call, then the client busy (its event loop blocked) while the server closes the
    idle connection: the next call takes that connection from the pool."""
    async with session.post("/", data=b"first") as response:
        assert await response.read() == b"first"
    time.sleep(1.5)


async def _post(session: aiohttp.ClientSession, body: bytes) -> bytes:
    async with session.post("/", data=body) as response:
        return await response.read()


@pytest.mark.anyio
async def test_defect_a_dependency_service_closes_idle_connections_before_its_client(
    gpu_socket: str,
) -> None:
    """connections.resend: the GPU Service's workers keep an idle connection 5 s, the
    Service-to-Service client 15 s."""
    from _bentoml_impl.server.serving import create_dependency_watcher
    from _bentoml_impl.worker.service import main

    keep_alive = next(option for option in main.params if option.name == "timeout_keep_alive")
    assert keep_alive.default == 5
    assert "keep_alive" not in inspect.getsource(create_dependency_watcher)
    session = await SessionManager(f"file://{gpu_socket}", 10, {}).get_session()
    try:
        assert session.connector._keepalive_timeout == 15  # aiohttp's default
    finally:
        await session.close()


@pytest.mark.anyio
async def test_defect_a_call_on_a_connection_the_server_closed_fails_unread(
    gpu_socket: str,
) -> None:
    with _gpu_service(gpu_socket, keep_alive_s=1) as bodies:
        manager = SessionManager(f"file://{gpu_socket}", 10, {})
        session = await manager.get_session()
        try:
            await _idle_past_keep_alive(session)
            with pytest.raises(aiohttp.ClientOSError):
                await _post(session, b"second")
        finally:
            await session.close()
    assert bodies == [b"first"]


@pytest.mark.anyio
async def test_a_call_the_gpu_service_never_read_is_sent_once_more(gpu_socket: str) -> None:
    with _gpu_service(gpu_socket, keep_alive_s=1) as bodies:
        session = await SessionManager(f"file://{gpu_socket}", 10, {}).get_session()
        try:
            await _idle_past_keep_alive(session)
            assert await connections.resend(lambda: _post(session, b"second")) == b"second"
        finally:
            await session.close()
    assert bodies == [b"first", b"second"]


@pytest.mark.anyio
async def test_a_stream_the_gpu_service_never_read_is_opened_once_more(gpu_socket: str) -> None:
    async def stream(session: aiohttp.ClientSession) -> AsyncIterator[str]:
        async with session.post("/", data=b"1\n2\n3\n") as response:
            async for line in response.content:
                yield line.decode()

    with _gpu_service(gpu_socket, keep_alive_s=1) as bodies:
        session = await SessionManager(f"file://{gpu_socket}", 10, {}).get_session()
        try:
            await _idle_past_keep_alive(session)
            lines = [line async for line in connections.resend_stream(lambda: stream(session))]
        finally:
            await session.close()
    assert lines == ["1\n", "2\n", "3\n"]
    assert bodies == [b"first", b"1\n2\n3\n"]


@pytest.mark.anyio
async def test_a_call_the_gpu_service_read_before_it_went_away_is_not_sent_again(
    gpu_socket: str,
) -> None:
    """A worker that dies mid-generation closes its connection cleanly: the call fails,
    once, and the request that may have killed it does not reach the next worker."""
    reads = []

    async def read_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    server = await asyncio.start_unix_server(read_and_close, gpu_socket)
    session = await SessionManager(f"file://{gpu_socket}", 10, {}).get_session()
    try:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await connections.resend(lambda: _post(session, b"x"))
    finally:
        await session.close()
        server.close()
    assert len(reads) == 1


async def _receive() -> dict:
    return {"type": "http.request", "body": b"{}", "more_body": False}


def _request() -> Request:
    return Request({"type": "http", "headers": []}, _receive)


@pytest.mark.anyio
async def test_defect_a_read_of_the_task_store_breaks_a_workers_concurrent_writes(
    tmp_path: Path,
) -> None:
    """front/job_endpoints.py never reads BentoML's task store: a read on a worker's
    connection holds a snapshot between its execute and its fetch, a submit on the same
    connection meanwhile writes from it, and once another worker has written, that write
    fails at once with "database is locked" (SQLite's stale snapshot; no busy wait)."""
    path = str(tmp_path / "task_result.db")
    Sqlite3Store.init_db(path)
    async with Sqlite3Store(path) as first, Sqlite3Store(path) as second:
        task_id = await first.new_entry("t", _request())
        # The first half of Sqlite3Store.get_status (/status on the second worker), as
        # another coroutine of that worker finds it: executed, not yet fetched.
        source = inspect.getsource(Sqlite3Store.get_status)
        assert "await self._conn.execute(" in source and "await result.fetchone()" in source
        await second._conn.execute("SELECT status FROM result WHERE task_id = ?", (task_id,))
        await first.new_entry("t", _request())  # a job submitted to the first worker
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            await second.new_entry("t", _request())  # one submitted to the second


@pytest.mark.anyio
async def test_defect_the_local_task_store_lets_a_late_result_overwrite_a_cancel(
    tmp_path: Path,
) -> None:
    """front/jobs.py: why a job's status is the application's own, not BentoML's row."""
    path = str(tmp_path / "task_result.db")
    Sqlite3Store.init_db(path)
    async with Sqlite3Store(path) as store:
        task_id = await store.new_entry("t", _request())
        await store.set_status(task_id, ResultStatus.CANCELED)
        await store.set_result(task_id, JSONResponse({}), ResultStatus.COMPLETED)
        assert (await store.get_status(task_id)).status is ResultStatus.COMPLETED


def test_defect_the_local_task_server_cannot_cancel_and_submits_unread() -> None:
    """front/job_endpoints.py: cancel and submit-time validation are the application's."""
    from _bentoml_impl.server.app import ServiceAppFactory

    assert "task cancellation is not supported in local development server" in (
        inspect.getsource(ServiceAppFactory.cancel_task)
    )
    assert "input_spec" not in inspect.getsource(ServiceAppFactory.submit_task)


def test_the_front_replaces_two_upstream_functions_and_the_gpu_service_none() -> None:
    import service

    assert len(bentoml_compat.UPSTREAM) == 2
    assert "apply_to_front(" in inspect.getsource(service.ControlNet.inner.__init__)
    assert "bentoml_compat" not in inspect.getsource(service.SDXLControlNetService.inner)


def test_another_bentoml_version_refuses_to_start_naming_both_and_the_package() -> None:
    with pytest.raises(bentoml_compat.UntestedBentoML) as refusal:
        bentoml_compat.check_upstream("1.5.0")
    message = str(refusal.value)
    assert "bentoml 1.5.0 is installed" in message
    assert f"written for bentoml {bentoml_compat.TESTED_VERSION}" in message
    assert "bentoml_compat" in message
    assert "ALLOW_UNTESTED_BENTOML=1" in message


def test_the_override_starts_on_another_version_with_a_warning(caplog) -> None:
    with caplog.at_level("WARNING", logger="bentoml"):
        bentoml_compat.check_upstream("1.5.0", allow_untested=True)
    assert "bentoml 1.5.0 is installed" in caplog.text


def test_every_upstream_function_has_the_signature_the_workaround_was_written_for() -> None:
    bentoml_compat.apply_to_front()  # patched first: the check must still see upstream's
    bentoml_compat.check_upstream()


def test_a_changed_signature_stops_start_up_naming_the_function(monkeypatch) -> None:
    async def from_http_request(cls, request, serde, *, strict: bool = False): ...

    from _bentoml_sdk.io_models import IOMixin

    monkeypatch.setattr(IOMixin, "from_http_request", classmethod(from_http_request))
    with pytest.raises(bentoml_compat.UntestedBentoML) as refusal:
        bentoml_compat.check_upstream(allow_untested=True)  # the override does not cover it
    message = str(refusal.value)
    assert "_bentoml_sdk.io_models.IOMixin.from_http_request" in message
    assert "strict" in message


def test_a_moved_function_stops_start_up_naming_it(monkeypatch) -> None:
    monkeypatch.delattr(AsyncClient, "_parse_stream_response")
    with pytest.raises(bentoml_compat.UntestedBentoML, match=r"_parse_stream_response"):
        bentoml_compat.check_upstream()


def test_upstream_still_has_the_faults_the_public_hooks_answer() -> None:
    """When one of these fails, re-check middleware.ErrorBodies and front/readiness.py."""
    from _bentoml_impl.server.app import ServiceAppFactory

    # a 4xx answered as a list, [{"error": ...}]
    assert '({"error": str(exc)},)' in inspect.getsource(ServiceAppFactory.api_endpoint_wrapper)
    # a readiness probe that lets its own timeout escape
    probe = inspect.getsource(AsyncClient.is_ready)
    assert "except aiohttp.ServerTimeoutError" in probe
    assert "except (aiohttp.ClientError" not in probe


@pytest.mark.anyio
async def test_defect_the_access_log_breaks_an_answer_off_on_a_non_utf8_content_type() -> None:
    """When this fails, drop ``middleware.ACCESS_LOG`` from the front's Service config."""
    from bentoml._internal.server.http.access import AccessLogMiddleware

    async def app(scope: dict, receive: t.Any, send: t.Any) -> None:
        await JSONResponse({"error": "refused"}, status_code=415)(scope, receive, send)

    logged = AccessLogMiddleware(
        app,
        has_request_content_length=True,
        has_request_content_type=True,
        has_response_content_length=True,
        has_response_content_type=True,
    )
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/canny",
        "scheme": "http",
        "client": ("127.0.0.1", 1),
        "headers": [(b"content-type", b"\xa0application/json")],
    }
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    with pytest.raises(UnicodeDecodeError):
        await logged(scope, receive, send)
    assert [m["type"] for m in sent] == ["http.response.start"]  # the body never left
