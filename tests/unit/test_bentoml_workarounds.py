"""The BentoML workarounds still take effect on the installed version: each test fails
when upstream moves what a workaround patches (see sdxl_controlnet/bentoml_workarounds.py)."""

from __future__ import annotations

import inspect

import bentoml
import pytest
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


def test_request_reading_and_the_task_endpoints_are_patched() -> None:
    from _bentoml_impl.server.app import ServiceAppFactory
    from _bentoml_sdk.io_models import IODescriptor

    bentoml_workarounds.apply()
    assert IODescriptor.from_http_request.__func__.sdxl_controlnet_workaround
    for name in ("submit_task", "cancel_task", "_run_task"):
        assert getattr(ServiceAppFactory, name).sdxl_controlnet_workaround, name


def test_another_bentoml_version_refuses_to_start_naming_both_and_the_module() -> None:
    with pytest.raises(bentoml_workarounds.UntestedBentoML) as refusal:
        bentoml_workarounds.check_upstream("1.5.0")
    message = str(refusal.value)
    assert "bentoml 1.5.0 is installed" in message
    assert f"written for bentoml {bentoml_workarounds.TESTED_VERSION}" in message
    assert "bentoml_workarounds" in message
    assert "ALLOW_UNTESTED_BENTOML=1" in message


def test_the_override_starts_on_another_version_with_a_warning(caplog) -> None:
    with caplog.at_level("WARNING", logger="bentoml"):
        bentoml_workarounds.check_upstream("1.5.0", allow_untested=True)
    assert "bentoml 1.5.0 is installed" in caplog.text


def test_the_override_reads_from_the_environment() -> None:
    from sdxl_controlnet.settings import Settings

    assert Settings.from_env({"ALLOW_UNTESTED_BENTOML": "1"}).allow_untested_bentoml
    assert not Settings.from_env({}).allow_untested_bentoml


def test_every_patched_function_has_the_signature_the_workaround_was_written_for() -> None:
    bentoml_workarounds.apply()  # patched first: the check must still see upstream's
    bentoml_workarounds.check_upstream()


def test_a_changed_signature_stops_start_up_naming_the_function(monkeypatch) -> None:
    from _bentoml_impl.server.app import ServiceAppFactory

    async def cancel_task(self, request, *, force: bool = False): ...

    monkeypatch.setattr(ServiceAppFactory, "cancel_task", cancel_task)
    with pytest.raises(bentoml_workarounds.UntestedBentoML) as refusal:
        bentoml_workarounds.apply(allow_untested=True)  # the override does not cover it
    message = str(refusal.value)
    assert "_bentoml_impl.server.app.ServiceAppFactory.cancel_task" in message
    assert "force" in message


def test_a_moved_function_stops_start_up_naming_it(monkeypatch) -> None:
    from _bentoml_impl.server.app import ServiceAppFactory

    monkeypatch.delattr(ServiceAppFactory, "_run_task")
    with pytest.raises(bentoml_workarounds.UntestedBentoML, match=r"ServiceAppFactory\._run_task"):
        bentoml_workarounds.check_upstream()


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


def test_upstream_still_has_the_faults_the_public_hooks_answer() -> None:
    """When one of these fails, re-check middleware.ErrorBodies and readiness.py."""
    from _bentoml_impl.server.app import ServiceAppFactory

    # a 4xx answered as a list, [{"error": ...}]
    assert '({"error": str(exc)},)' in inspect.getsource(ServiceAppFactory.api_endpoint_wrapper)
    # a readiness probe that lets its own timeout escape
    probe = inspect.getsource(AsyncClient.is_ready)
    assert "except aiohttp.ServerTimeoutError" in probe
    assert "except (aiohttp.ClientError" not in probe
