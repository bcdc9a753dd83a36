"""The GPU benchmark's own machinery, run for real on the CPU with the tiny model: a
`bentoml serve` still starting at the deadline is abandoned, its whole process tree stopped,
and the table says so, while the bare pipeline is measured. (tests/e2e/test_gpu_kit.py runs
the whole benchmark from the GPU kit.)"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench import gpu
from devtools.harness import ROOT, TINY_MODEL

pytestmark = pytest.mark.e2e


def test_a_start_up_that_overruns_is_abandoned_and_its_server_stopped(tmp_path, monkeypatch):
    # Cheap enough to try; `bentoml serve` takes longer than the 6 s the budget leaves it.
    monkeypatch.setitem(gpu.ESTIMATE_S, "start bare", 1.0)
    monkeypatch.setitem(gpu.ESTIMATE_S, "start served", 1.0)
    config = gpu.Config(
        model_dir=TINY_MODEL,
        size=64,
        steps=2,
        runs=2,
        device="cpu",
        budget_s=gpu.RESERVE_S + 6,
        log_dir=tmp_path,
    )
    # The suite's shared server may be running already: only what the benchmark starts counts.
    running = set(psutil.Process().children(recursive=True))
    began = time.monotonic()
    results = gpu.run_benchmark(config)
    assert time.monotonic() - began < config.budget_s + 5

    json.dumps(results)  # written as JSON as it is
    plan = {item["name"]: item for item in results["plan"]}
    assert plan["start bare eager"]["status"] == "done"
    assert plan["start served eager"]["status"] == "abandoned"
    assert "at the deadline" in plan["start served eager"]["note"]
    assert set(psutil.Process().children(recursive=True)) <= running  # nothing left running
    assert list(tmp_path.glob("server-*.log"))  # its log kept for a look

    rows = {row["figure"]: row for row in results["rows"]}
    assert rows["start-up to ready, eager"]["bare"]["median"] > 0
    assert "at the deadline" in rows["start-up to ready, eager"]["served"]
    assert "(no CUDA)" in gpu.table(results)


def finished(output: Path) -> list[str]:
    if not output.exists():
        return []
    return [i["name"] for i in json.loads(output.read_text())["plan"] if i["status"] == "done"]


def served_compiled_images(output: Path) -> list[float]:
    if not output.exists():
        return []
    subjects = json.loads(output.read_text())["subjects"]
    served = next(s for s in subjects if (s["mode"], s["variant"]) == ("served", "TORCH_COMPILE"))
    return served["seconds_per_image"]


def test_a_run_killed_mid_item_leaves_every_measured_image_on_disk(tmp_path: Path) -> None:
    """A command cut at its limit (kill -9, no clean-up of any kind) still returns every
    image it measured, the compiled Service's first: the JSON and the table are rewritten
    after each image, not only after each item. The Service wrote its compile cache."""
    output = tmp_path / "gpu-bench.json"
    command = [sys.executable, "-m", "bench.gpu", "--cpu", "--model-dir", str(TINY_MODEL)]
    command += ["--size", "64", "--steps", "2", "--runs", "40", "--budget", "600"]
    command += ["--output", str(output), "--log-dir", str(tmp_path / "logs")]
    with (tmp_path / "progress.log").open("w") as progress:
        run = subprocess.Popen(command, cwd=ROOT, stdout=progress, stderr=progress)
    deadline = time.monotonic() + 400
    try:
        while not served_compiled_images(output):
            assert run.poll() is None, (tmp_path / "progress.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no compiled image within 400 s"
            time.sleep(0.05)
    finally:
        # The served subject's `bentoml serve` runs in a session of its own: stopped here.
        left = psutil.Process(run.pid).children(recursive=True)
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        for process in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(left, timeout=30)

    assert finished(output) == [
        "start served TORCH_COMPILE (compiles)",
        "first request: served TORCH_COMPILE",
    ]
    results = json.loads(output.read_text())
    timed = next(i for i in results["plan"] if i["name"].endswith("each: served TORCH_COMPILE"))
    assert timed["status"] == "planned"  # cut inside the item, its images kept
    rows = {row["figure"]: row for row in results["rows"]}
    assert 1 <= rows["seconds per image (64², 2 steps), TORCH_COMPILE"]["served"]["runs"] < 40
    assert rows["first request, TORCH_COMPILE"]["served"]["median"] > 0
    assert rows["start-up to ready, TORCH_COMPILE"]["served"]["median"] > 0
    table = output.with_suffix(".txt").read_text()
    assert "seconds per image (64², 2 steps), TORCH_COMPILE" in table and "budget 600 s" in table
    assert (tmp_path / "compile-cache.bin").stat().st_size > 0  # for the next window
