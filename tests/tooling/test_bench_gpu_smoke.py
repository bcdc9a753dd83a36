"""The GPU benchmark's own machinery, run for real on the CPU with the tiny model: a
`bentoml serve` still starting at the deadline is abandoned, its whole process tree stopped,
and the table says so, while the bare pipeline is measured. (tests/e2e/test_gpu_kit.py runs
the whole benchmark from the GPU kit.)"""

from __future__ import annotations

import json
import time

import psutil
import pytest

from bench import gpu
from devtools.harness import TINY_MODEL

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
