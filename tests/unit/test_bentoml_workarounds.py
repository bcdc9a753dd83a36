"""The BentoML workarounds still take effect on the installed version: each test fails
when upstream moves what a workaround patches (see sdxl_controlnet/bentoml_workarounds.py)."""

from __future__ import annotations

import bentoml
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
