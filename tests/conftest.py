"""Test set-up: every test process serves the tiny model and its LoRA adapters on the
CPU, and the suite's shared `bentoml serve`."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from devtools.harness import (
    Server,
    ensure_tiny_model,
    serving,
    tiny_adapters_env,
    tiny_model_env,
)


def pytest_configure(config: pytest.Config) -> None:
    # Before any test module imports the application, whose settings read the environment.
    ensure_tiny_model()
    # The tiny LoRA adapters too: every server and in-process Service declares them, so
    # the base model's tests also prove that declared but unused adapters change nothing.
    os.environ.update({**tiny_model_env(), **tiny_adapters_env()})


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    """Both Services under one `bentoml serve`, on the tiny model."""
    with serving() as srv:
        yield srv
