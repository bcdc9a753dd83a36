"""`python -m bench.gpu`: what runs without a GPU. Without CUDA it must say so and
exit 0; the request it sends, the env it serves with, the grouping, the order and
the table are checked here on made-up figures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu
from devtools.harness import ROOT


def test_without_cuda_it_says_so_and_exits_0(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--model-dir", str(model_dir)],
        cwd=ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # no GPU, even on a GPU machine
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU" in result.stdout
    assert "needs an NVIDIA GPU" in result.stdout
    assert not model_dir.exists()  # nothing built, nothing measured


def config(**fields: object) -> gpu.Config:
    return gpu.Config(**{"model_dir": Path("m"), "variants": list(gpu.VARIANTS), **fields})


def test_the_request_is_1024_square_30_steps_seeded() -> None:
    assert gpu.request_params(config(), seed=7) == {
        "prompt": gpu.PROMPT,
        "num_inference_steps": 30,
        "width": 1024,
        "height": 1024,
        "seed": 7,
    }


def test_the_served_env_changes_only_model_paths_and_flags(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("ALLOW_CPU", "1")
    monkeypatch.setenv("CHANNELS_LAST", "1")  # the variant decides, not the caller's shell
    monkeypatch.setenv("HF_HOME", "/somewhere")
    env = gpu.served_env(config(model_dir=tmp_path), "FUSE_QKV")
    assert "ALLOW_CPU" not in env
    assert env["SDXL_BASE_MODEL"] == str(tmp_path.resolve() / "base")
    assert env["SDXL_CONTROLNET_MODEL"] == str(tmp_path.resolve() / "controlnet")
    assert env["SDXL_VAE_MODEL"] == str(tmp_path.resolve() / "vae")
    assert (env["CHANNELS_LAST"], env["FUSE_QKV"], env["TORCH_COMPILE"]) == ("0", "1", "0")
    changed = {"ALLOW_CPU", "SDXL_BASE_MODEL", "SDXL_CONTROLNET_MODEL", "SDXL_VAE_MODEL"}
    changed |= set(gpu.FLAGS)
    assert {k: v for k, v in env.items() if k not in changed} == {
        k: v for k, v in os.environ.items() if k not in changed
    }


def test_every_flag_is_measured_on_and_off() -> None:
    for flag in gpu.FLAGS:
        assert any(flag in flags for flags in gpu.VARIANTS.values())
    assert gpu.VARIANTS["off"] == ()


@pytest.mark.parametrize(
    ("free_gib", "group", "expected"),
    [
        # 2 × 15.5 GiB per variant; the baseline is in every group
        (80, None, [["off", "a"], ["off", "b"], ["off", "c"], ["off", "d"]]),
        (141, None, [["off", "a", "b", "c"], ["off", "d"]]),
        (180, None, [["off", "a", "b", "c", "d"]]),
        (24, None, [["off"], ["a"], ["b"], ["c"], ["d"]]),  # never less than one
        (24, 5, [["off", "a", "b", "c", "d"]]),
    ],
)
def test_variants_are_grouped_to_fit_gpu_memory(free_gib, group, expected) -> None:
    variants = ["off", "a", "b", "c", "d"]
    assert gpu.plan_groups(variants, 2 * 15.5, free_gib, group) == expected


def test_each_subject_takes_each_place_in_turn() -> None:
    orders = [gpu.rotated([1, 2, 3], run) for run in range(3)]
    assert orders == [[1, 2, 3], [2, 3, 1], [3, 1, 2]]
    assert gpu.rotated([], 1) == []


def test_the_options_always_include_the_baseline() -> None:
    args = gpu.parse_args(["--variants", "TORCH_COMPILE", "--quick"])
    assert args.variants == ["off", "TORCH_COMPILE"]
    assert (args.runs, args.bursts) == (3, 1)
    with pytest.raises(SystemExit):
        gpu.parse_args(["--variants", "FAST"])


def fake(mode: str, variant: str, seconds: list[float], **fields: object) -> gpu.Subject:
    subject = (gpu.Bare if mode == "bare" else gpu.Served)(config(), variant)
    subject.seconds = seconds
    subject.rates = [1 / s for s in seconds]
    for name, value in fields.items():
        setattr(subject, name, value)
    return subject


def results(subjects: list[gpu.Subject], variants: list[str]) -> dict:
    cfg = config(variants=variants)
    return {
        "gpu": "NVIDIA H100 80GB HBM3",
        "config": {"variants": variants},
        "subjects": [
            {
                "mode": s.mode,
                "variant": s.variant,
                "error": s.error,
                "failed_requests": s.failed_requests,
            }
            for s in subjects
        ],
        "rows": gpu.figures(subjects, cfg),
    }


def test_figures_give_median_spread_and_served_over_bare() -> None:
    subjects = [
        fake("bare", "off", [3.0, 3.2, 3.1], max_allocated_mib=9000.0, peak_smi_mib=10000.0),
        fake("served", "off", [3.3, 3.4, 3.5], peak_smi_mib=11000.0),
        fake("bare", "TORCH_COMPILE", [2.0, 2.2, 2.1]),
        fake("served", "TORCH_COMPILE", [2.2], error="start: not ready", failed_requests=2),
    ]
    res = results(subjects, ["off", "TORCH_COMPILE"])
    rows = {(r["variant"], r["figure"]): r for r in res["rows"]}
    per_image = rows[("off", "seconds per image")]
    assert per_image["bare"] == {"median": 3.1, "min": 3.0, "max": 3.2, "runs": 3}
    assert per_image["served_over_bare"] == pytest.approx(3.4 / 3.1)
    memory = rows[("off", "peak GPU memory, nvidia-smi")]
    assert memory["served_over_bare"] == pytest.approx(1.1)
    assert rows[("off", "peak GPU memory, torch max allocated")]["served"] is None

    # The baseline measured again in another group: its samples are pooled.
    subjects.append(fake("bare", "off", [3.6, 3.7], peak_smi_mib=10500.0))
    pooled = {(r["variant"], r["figure"]): r for r in results(subjects, ["off"])["rows"]}
    assert pooled[("off", "seconds per image")]["bare"]["runs"] == 5
    assert pooled[("off", "seconds per image")]["bare"]["median"] == 3.2
    assert pooled[("off", "peak GPU memory, nvidia-smi")]["bare"]["max"] == 10500.0

    text = gpu.table(res)
    assert "3.1 [3–3.2] ×3" in text
    assert "TORCH_COMPILE: bare 1.48×, served 1.55×" in text
    assert "served TORCH_COMPILE: start: not ready; 2 failed requests" in text
    assert "2.5 s on H100" in text and "3.7 s on A100" in text
    assert "this GPU is an H100: anchor ≈ 3.3 s per image" in text
