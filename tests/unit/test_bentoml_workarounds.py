"""The BentoML workarounds still take effect on the installed version: each test fails
when upstream moves what a workaround patches (see sdxl_controlnet/bentoml_workarounds.py)."""

from __future__ import annotations

import inspect

import bentoml
from _bentoml_impl.client.base import ClientFileManager
from _bentoml_impl.client.proxy2 import AsyncClient, SessionManager

from sdxl_controlnet import bentoml_workarounds


def test_the_pinned_version_is_the_one_the_workarounds_were_written_for() -> None:
    assert bentoml.__version__ == bentoml_workarounds.TESTED_VERSION


def test_abandoned_streams_are_closed_by_the_patched_reader() -> None:
    bentoml_workarounds.apply()
    bentoml_workarounds.apply()  # twice: wrapped once
    reader = AsyncClient._parse_stream_response
    assert reader.closes_abandoned_streams
    assert reader.__closure__ is not None
    assert not any(
        getattr(cell.cell_contents, "closes_abandoned_streams", False)
        for cell in reader.__closure__
    )


def test_connection_recycling_is_still_configured_by_max_requests_and_max_age() -> None:
    manager = SessionManager("http://gpu", 60, {}, **bentoml_workarounds.NEVER_RECYCLE_CONNECTIONS)
    assert manager.max_requests == bentoml_workarounds.NEVER
    assert manager.max_age == float(bentoml_workarounds.NEVER)


def test_request_reading_and_validation_answers_are_patched() -> None:
    from _bentoml_impl.server.app import ServiceAppFactory
    from _bentoml_sdk.io_models import IODescriptor

    bentoml_workarounds.apply()
    assert IODescriptor.from_http_request.__func__.sdxl_controlnet_workaround
    for name in ("api_endpoint", "submit_task", "cancel_task", "_run_task"):
        assert getattr(ServiceAppFactory, name).sdxl_controlnet_workaround, name


def test_upstream_still_has_the_gaps_the_task_workarounds_close() -> None:
    from _bentoml_impl.server import app

    source = inspect.getsource(app)
    assert "task cancellation is not supported in local development server" in source
    # submit stores the request unread: no input_spec in submit_task
    assert "input_spec" not in inspect.getsource(_original(app.ServiceAppFactory.submit_task))


def test_the_sync_client_can_submit_tasks() -> None:
    from _bentoml_impl.client.http import SyncHTTPClient

    assert "self._opened_files" in inspect.getsource(SyncHTTPClient._submit)
    bentoml_workarounds.submit_tasks_from_the_sync_client()
    client = SyncHTTPClient.__new__(SyncHTTPClient)
    object.__setattr__(client, "_file_manager", ClientFileManager())
    assert client._opened_files == []


def _original(function):
    """The upstream function a workaround wrapped: the first function in its closure."""
    cells = [cell.cell_contents for cell in function.__closure__ or ()]
    return next(cell for cell in cells if inspect.isfunction(cell))
