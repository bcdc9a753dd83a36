"""The image tests run only where `make image-test` has built an image and an engine runs it."""

from __future__ import annotations

import pytest

from tests.image.containers import IMAGE, engine


@pytest.fixture(scope="session", autouse=True)
def image_runs_here() -> None:
    if not IMAGE:
        pytest.skip("no image under test: `make image-test` builds one and runs these tests")
    probe = engine("run", "--rm", IMAGE, "true", check=False)
    if probe.returncode != 0:
        pytest.skip(f"no container engine can run {IMAGE} here: {probe.stderr.strip()}")
