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


def test_a_run_killed_mid_way_leaves_every_finished_item_on_disk(tmp_path: Path) -> None:
    """A command cut at its limit (kill -9, no clean-up of any kind) still returns the
    figures of every item it finished: the JSON and the table are rewritten after each."""
    output = tmp_path / "gpu-bench.json"
    command = [sys.executable, "-m", "bench.gpu", "--cpu", "--model-dir", str(TINY_MODEL)]
    command += ["--size", "64", "--steps", "2", "--budget", "600", "--output", str(output)]
    command += ["--log-dir", str(tmp_path / "logs")]
    with (tmp_path / "progress.log").open("w") as progress:
        run = subprocess.Popen(command, cwd=ROOT, stdout=progress, stderr=progress)
    deadline = time.monotonic() + 300
    try:
        while not any(name.startswith("first request") for name in finished(output)):
            assert run.poll() is None, (tmp_path / "progress.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no first request within 300 s"
            time.sleep(0.2)
    finally:
        # The served subject's `bentoml serve` runs in a session of its own: stopped here.
        left = psutil.Process(run.pid).children(recursive=True)
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        for process in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(left, timeout=30)

    assert finished(output)[:3] == [
        "start bare eager",
        "start served eager",
        "first request: bare eager, served eager",
    ]
    results = json.loads(output.read_text())
    rows = {row["figure"]: row for row in results["rows"]}
    for mode in ("bare", "served"):
        assert rows["first request, eager"][mode]["median"] > 0
        assert rows["start-up to ready, eager"][mode]["median"] > 0
    table = output.with_suffix(".txt").read_text()
    assert "first request, eager" in table and "budget 600 s" in table
    assert "planned" in table  # what the cut stopped is listed as not run
