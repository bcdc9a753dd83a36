"""The GPU benchmark's own machinery, run for real on the CPU with the tiny model:
bare pipeline processes and `bentoml serve` side by side, timed in turns, real
/generate requests. The figures mean nothing here; that every step works does."""

from __future__ import annotations

import json

import pytest

from bench import gpu
from devtools.harness import TINY_MODEL

pytestmark = pytest.mark.e2e


def test_every_subject_is_measured_on_the_tiny_model(tmp_path) -> None:
    config = gpu.Config(
        model_dir=TINY_MODEL,
        variants=["off"],  # one pair: each `bentoml serve` takes half a minute on 2 cores
        size=64,
        steps=2,
        runs=2,
        bursts=1,
        concurrency=2,
        device="cpu",
        ready_timeout_s=180,
        log_dir=tmp_path,
        # The GPU Service may refuse a CPU unless told; on a GPU the benchmark never says so.
        server_env={"ALLOW_CPU": "1"},
    )
    results = gpu.run_benchmark(config)

    json.dumps(results)  # written as JSON as it is
    assert results["groups"] == [["off"]]
    for subject in results["subjects"]:
        assert subject["error"] is None, subject
        assert subject["failed_requests"] == 0
        assert len(subject["seconds_per_image"]) == 2
        assert len(subject["images_per_s"]) == 1
        assert subject["startup_s"] > 0
    rows = {(r["variant"], r["figure"]): r for r in results["rows"]}
    assert rows[("off", "seconds per image")]["served_over_bare"] > 0
    assert rows[("off", "images/s at concurrency 2 (bare: back to back)")]["served"]["runs"] == 1
    assert "served/bare" in gpu.table({"gpu": "cpu", **results})
