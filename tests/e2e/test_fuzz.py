"""Fuzz the public API from its own OpenAPI schema: whatever arrives, no 5xx.

Schemathesis' coverage phase derives valid and invalid cases for every field,
content type and method from the schema; its random phase cannot generate
BentoML's multipart models, so it is not run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import tiny_lora
from devtools.harness import Server, ensure_tiny_adapters, serving

pytestmark = pytest.mark.e2e

# Tight limits flow into the schema, so every valid generated request is cheap.
CHEAP = {"MAX_STEPS": "1", "MAX_OUTPUT_PIXELS": str(64 * 64), "MAX_IMAGES": "1"}


@pytest.fixture(scope="module")
def cheap_server() -> Iterator[Server]:
    # The tiny adapters too, their preset held to the same one step.
    adapters = tiny_lora.declaration(ensure_tiny_adapters())
    fast = adapters["fast"]
    fast["preset"] = {**fast["preset"], "num_inference_steps": 1}
    with serving({**CHEAP, "LORA_ADAPTERS": json.dumps(adapters)}) as srv:
        yield srv


def test_no_generated_request_gets_a_server_error(cheap_server: Server, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            Path(sys.executable).with_name("schemathesis"),
            "run",
            f"{cheap_server.url}/docs.json",
            "--checks=not_a_server_error",
            "--phases=coverage",
            "--seed=1",
            "--request-timeout=60",
        ],
        cwd=tmp_path,  # schemathesis keeps a cache in its working directory
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:]
