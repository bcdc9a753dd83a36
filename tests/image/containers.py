"""Containers of the image under test, run with scripts/container.sh (docker or podman)."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from devtools.harness import ROOT, TINY_MODEL, wait_until_ready

CONTAINER = str(ROOT / "scripts" / "container.sh")
# Set by `make image-test` to the image it has just built, so a stale image is never tested.
IMAGE = os.environ.get("SDXL_TEST_IMAGE", "")
MODEL_MOUNT = "/models/tiny"
# The tiny model, mounted read-only, and the variables that point the GPU Service at it.
MODEL_ARGS = [
    "--volume",
    f"{TINY_MODEL}:{MODEL_MOUNT}:ro",
    "--env",
    f"SDXL_BASE_MODEL={MODEL_MOUNT}/base",
    "--env",
    f"SDXL_CONTROLNET_MODEL={MODEL_MOUNT}/controlnet",
    "--env",
    f"SDXL_VAE_MODEL={MODEL_MOUNT}/vae",
    "--env",
    f"SDXL_PREVIEW_MODEL={MODEL_MOUNT}/preview",
]


def engine(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([CONTAINER, *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")
    return result


class Container:
    """A detached container of the image under test, reached on a loopback port."""

    def __init__(self, port: int, options: list[str], command: Sequence[str]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.name = f"sdxl-test-{uuid.uuid4().hex[:8]}"
        engine("run", "--detach", "--name", self.name, *options, IMAGE, *command)

    def wait_ready(self, timeout: float = 120) -> float:
        """Seconds until /readyz answered 200."""
        return wait_until_ready(self.url, self.running, self.logs, timeout)

    def running(self) -> bool:
        state = engine("inspect", "--format", "{{.State.Running}}", self.name).stdout
        return state.strip() == "true"

    def exec(self, *command: str) -> str:
        return engine("exec", self.name, *command).stdout

    def logs(self) -> str:
        result = engine("logs", self.name, check=False)
        return result.stdout + result.stderr

    def stop(self) -> None:
        engine("stop", self.name)

    def remove(self) -> None:
        """Keep the logs in test-artifacts/, then remove the container, running or not."""
        log = ROOT / "test-artifacts" / f"{self.name}.log"
        log.parent.mkdir(exist_ok=True)
        log.write_text(self.logs())
        engine("rm", "--force", self.name, check=False)


@contextmanager
def running(port: int, options: list[str], command: Sequence[str] = ()) -> Iterator[Container]:
    """A ready container answering on ``port``, removed afterwards, also on failure."""
    container = Container(port, options, command)
    try:
        container.wait_ready()
        yield container
    finally:
        container.remove()
