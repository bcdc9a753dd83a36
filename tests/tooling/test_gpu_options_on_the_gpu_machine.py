"""The GPU options' tests (tests/service/test_gpu_options.py in the default `blocks` compile
scope: what is compiled, the warm-ups, the fallback, the speed guide's settings, the device
choice) run by the rented GPU machine's torch, not the project's pin: in the Python 3.12
stand-in for that machine (.venv-gpu; devtools/gpu_machine.txt) with the GPU kit's libraries
installed by `scripts/gpu-kit-install.sh`, as `scripts/gpu-bench.sh` installs them, beside
pytest. A compile that works on the pinned torch and fails on the machine's would otherwise
first show on that machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devtools import gpu_kit
from devtools.harness import ROOT

pytestmark = pytest.mark.gpu_kit

PYTHON_312 = gpu_kit.python_312()
PYTEST = next(
    line.split("#")[0].strip()
    for line in (ROOT / "requirements-dev.txt").read_text().splitlines()
    if line.startswith("pytest==")
)

CRASHES_HERE = "test_the_speed_guide_s_settings_and_channels_last_give_the_same_image"


@pytest.mark.skipif(PYTHON_312 is None, reason="no Python 3.12 here (set GPU_KIT_PYTHON)")
def test_the_gpu_options_hold_on_the_gpu_machine_s_torch(tmp_path: Path) -> None:
    venv = gpu_kit.mirror(ROOT / ".venv-gpu", PYTHON_312)
    python = str(venv / "bin" / "python")
    kit, site, tools = tmp_path / "gpu-kit", tmp_path / "site", tmp_path / "pytest"
    gpu_kit.build(kit)
    install = kit / "scripts" / "gpu-kit-install.sh"
    subprocess.run([install, site], env={**os.environ, "PYTHON": python}, check=True)
    # pytest is no part of the machine or the kit: the tests' own, for Python 3.12.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(tools),
         *gpu_kit.target_options(), PYTEST],
        check=True,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{site}:{tools}"}  # the checkout: the working directory
    version = subprocess.run(
        [python, "-c", "import torch, diffusers; print(torch.__version__, diffusers.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert version.startswith(gpu_kit.machine_torch()) and str(site) in version, version
    # In two processes: on a machine without a GPU, torch 2.11's CUDA build crashes
    # (SIGSEGV in FakeTensorMode.__enter__, at torch._C._ensureCUDADeviceGuardSet) when a
    # pipeline compiles after the speed guide's has. FakeTensorMode makes that call only
    # where torch.cuda.is_available() is false (avoid_device_init), so a GPU machine never
    # makes it; torch 2.13 does not crash.
    # The speed guide's test is `thorough` (a variant of the blocks scope's compile).
    for selection in (["-m", "not thorough"], ["-k", CRASHES_HERE]):
        result = subprocess.run(
            [python, "-m", "pytest", "tests/service/test_gpu_options.py", *selection,
             "-p", "no:cacheprovider", "-q", "-rs"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        summary = result.stdout.strip().splitlines()[-1]
        assert " passed" in summary and "skipped" not in summary, summary
