"""Test set-up: every test process serves the tiny model and its LoRA adapters on the
CPU, and the suite's shared `bentoml serve`."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from devtools.harness import (
    Server,
    ensure_tiny_model,
    serving,
    tiny_adapters_env,
    tiny_controlnets,
    tiny_ip_adapter_env,
    tiny_model_env,
)
from devtools.redis_server import running_redis


def pytest_configure(config: pytest.Config) -> None:
    # The suite runs on a shared 2-core machine, where pytest, the servers it starts and
    # whatever else runs there compete for the cores. One front worker for the servers a
    # test starts for a fault or a setting of its own; the shared server runs two (below).
    # One thread for torch in every process: OpenMP's threads spin while they wait for a
    # core, and make a tiny-model generation ten to twenty times slower whenever another
    # process holds one. Torch reads it when first imported: after this, whoever imports it.
    os.environ.update({"FRONT_WORKERS": "1", "OMP_NUM_THREADS": "1"})
    # Before any test module imports the application, whose settings read the environment.
    ensure_tiny_model()
    # The tiny LoRA adapters too: every server and in-process Service declares them, so
    # the base model's tests also prove that declared but unused adapters change nothing.
    os.environ.update({**tiny_model_env(), **tiny_adapters_env()})


# The longest modules, run first so that they overlap the rest of the suite on the other
# worker instead of ending it: the GPU kit's test (it may first build its Python 3.12
# stand-in), then inductor's compilations (minutes of C++ builds on a cold cache).
LONGEST_FIRST = ("gpu_kit", "compile")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        marked = (i for i, name in enumerate(LONGEST_FIRST) if item.get_closest_marker(name))
        return next(marked, len(LONGEST_FIRST))

    items.sort(key=rank)


def pytest_make_parametrize_id(val: object) -> str | None:
    # pytest-xdist's --dist loadscope takes a test's module from its node id up to the last
    # "::", so a parameter such as "https://[::1]/" would make a scope of its own, sent to
    # another worker to start its module's servers once more.
    if isinstance(val, str) and "::" in val and len(val) <= 100:  # longer: named by its index
        return re.sub(":{2,}", ":", val.encode("unicode_escape").decode("ascii"))  # as pytest
    return None


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    """Both Services under one `bentoml serve`, on the tiny model, with two front workers
    as users get on a two-core host: a job may run on one worker and be polled or canceled
    on the other."""
    with serving({"FRONT_WORKERS": "2"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def canny_and_depth() -> Iterator[Server]:
    """A server whose ControlNets serve two control types, canny and depth, and which takes
    image prompts, with two front workers: for the controls' tests and the studio's."""
    env = {**tiny_controlnets("canny+depth"), **tiny_ip_adapter_env(), "FRONT_WORKERS": "2"}
    with serving(env) as srv:
        yield srv


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis of this test process's own, for the shared job store's tests."""
    with running_redis() as url:
        yield url
