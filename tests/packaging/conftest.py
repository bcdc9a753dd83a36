"""One `bentoml build` for the packaging tests that read a Bento of the local models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.harness import ROOT, tiny_model_env


@pytest.fixture(scope="session")
def local_bento(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Bento's folder, built as the tests serve it (the tiny model's local directories,
    the tiny adapters declared) with the hub unreachable, in a BentoML home of its own."""
    home = tmp_path_factory.mktemp("bentoml-home")
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "."],
        cwd=ROOT,
        env={**os.environ, **tiny_model_env(), "HF_HUB_OFFLINE": "1", "BENTOML_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (bento_yaml,) = home.glob("bentos/sdxl-controlnet/*/bento.yaml")
    return bento_yaml.parent
