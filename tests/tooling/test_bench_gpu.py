"""`python -m bench.gpu`: what runs without a GPU. Without CUDA it must say so and exit 0;
the requests, the served env, the plan within its budget, and the table are checked here."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import gpu
from bench.budget import Item, Plan
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
    return gpu.Config(**{"model_dir": Path("m"), **fields})


def test_the_requests_are_1024_square_30_steps_and_the_4_step_preset() -> None:
    assert gpu.request_params(config(), "image", seed=7) == {
        "prompt": gpu.PROMPT,
        "num_inference_steps": 30,
        "width": 1024,
        "height": 1024,
        "seed": 7,
    }
    fast = gpu.request_params(config(), "preset", seed=7)
    assert (fast["num_inference_steps"], fast["guidance_scale"]) == (4, 0)
    assert fast["scheduler"] == "euler_trailing"


def test_the_served_env_changes_only_model_paths_flags_and_allow_cpu(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("ALLOW_CPU", "1")
    monkeypatch.setenv("CHANNELS_LAST", "1")  # the variant decides, not the caller's shell
    monkeypatch.setenv("BENTOML_HOME", "/shared")  # each server gets a home of its own
    cache = tmp_path / "compile-cache.bin"
    env = gpu.served_env(config(model_dir=tmp_path, size=512, compile_cache=cache), "TORCH_COMPILE")
    assert env["TORCH_COMPILE_MODE"] == "reduce-overhead"
    assert env["TORCH_COMPILE_SCOPE"] == "blocks"  # the Service's default, measured first
    assert env["TORCH_COMPILE_CACHE"] == str(cache)
    assert env["ALLOW_CPU"] == "0"  # on a GPU the Service must not fall back to the CPU
    assert env["SDXL_BASE_MODEL"] == str(tmp_path.resolve() / "base")
    assert env["SDXL_CONTROLNET_MODEL"] == str(tmp_path.resolve() / "controlnet")
    assert env["SDXL_VAE_MODEL"] == str(tmp_path.resolve() / "vae")
    assert env["SDXL_PREVIEW_MODEL"] == ""  # the directory has no preview decoder: none
    assert (env["CHANNELS_LAST"], env["FUSE_QKV"], env["TORCH_COMPILE"]) == ("0", "0", "1")
    assert env["TORCH_COMPILE_SIZES"] == "512x512"  # compiled at the size it is timed at
    assert "BENTOML_HOME" not in env
    changed = {"ALLOW_CPU", "SDXL_BASE_MODEL", "SDXL_CONTROLNET_MODEL", "SDXL_VAE_MODEL"}
    changed |= {"SDXL_PREVIEW_MODEL"}
    changed |= {*gpu.FLAGS, "TORCH_COMPILE_SIZES", "TORCH_COMPILE_MODE", "BENTOML_HOME"}
    changed |= {"TORCH_COMPILE_SCOPE", "TORCH_COMPILE_CACHE"}
    assert {k: v for k, v in env.items() if k not in changed} == {
        k: v for k, v in os.environ.items() if k not in changed
    }
    assert gpu.served_env(config(device="cpu"), "off")["ALLOW_CPU"] == "1"


def test_options_default_to_eager_and_compile_and_full_adds_every_flag(monkeypatch) -> None:
    monkeypatch.setenv("BENCH_GPU_BUDGET_S", "300")
    args = gpu.parse_args([])
    assert (args.variants, args.runs, args.bursts, args.budget) == (gpu.DEFAULT_VARIANTS, 3, 0, 300)
    full = gpu.parse_args(["--full", "--budget", "3600"])
    assert (full.variants, full.runs, full.bursts, full.budget) == (list(gpu.VARIANTS), 5, 2, 3600)
    assert gpu.parse_args(["--variants", "FUSE_QKV"]).variants == ["off", "FUSE_QKV"]
    with pytest.raises(SystemExit):
        gpu.parse_args(["--variants", "FAST"])


def item(name: str, log: list[str], estimate: float = 0.0, seconds: float = 0.0, **kw) -> Item:
    def run() -> None:
        log.append(name)
        time.sleep(seconds)

    return Item(name, lambda: estimate, run, **kw)


def test_the_plan_runs_in_order_and_skips_what_would_overrun_with_its_reason() -> None:
    log: list[str] = []
    plan = Plan(deadline=time.monotonic() + 60)
    plan.add(item("model", log, estimate=10))
    plan.add(item("too long", log, estimate=3600))
    plan.add(item("after it", log, estimate=5))
    plan.add(item("blocked", log, blocked=lambda: "the server did not start"))
    plan.run()
    assert log == ["model", "after it"]
    statuses = {i.name: (i.status, i.note) for i in plan.items}
    assert statuses["too long"][0] == "skipped"
    assert "needs ≈ 3600 s" in statuses["too long"][1]
    assert statuses["blocked"] == ("skipped", "the server did not start")


def test_a_guess_is_tried_when_its_minimum_fits_and_abandoned_at_the_deadline() -> None:
    log: list[str] = []
    missed: list[str] = []
    plan = Plan(deadline=time.monotonic() + 1.0)
    plan.add(
        item("compile", log, estimate=600, seconds=30, minimum=lambda: 0.5, missed=missed.append)
    )
    plan.add(item("later", log, estimate=0.1))
    began = time.monotonic()
    plan.run()
    assert time.monotonic() - began < 3  # stopped at the deadline, not after 30 s
    compile_, later = plan.items
    assert compile_.status == "abandoned"
    assert missed == [compile_.note] and "at the deadline" in compile_.note
    assert later.status == "skipped"


def test_a_failing_item_is_reported_and_the_plan_goes_on() -> None:
    def broken() -> None:
        raise RuntimeError("no GPU memory left")

    plan = Plan(deadline=time.monotonic() + 60)
    plan.add(Item("start", lambda: 1, broken))
    log: list[str] = []
    plan.add(item("next", log))
    plan.run()
    assert plan.items[0].status == "failed"
    assert plan.items[0].note == "RuntimeError: no GPU memory left"
    assert log == ["next"]


def test_the_default_plan_puts_served_compiled_first_then_bare_then_eager() -> None:
    """Users need the compiled Service's seconds per image most: it starts first; eager runs
    last, its images in turns with both compiled subjects, so each ratio is side by side."""
    cfg = config(model_dir=Path("/nonexistent"))
    plan, _ = gpu.build_plan(cfg, deadline=time.monotonic() + 420)
    listed = [i for i in plan.items if i.listed]
    assert [i.name for i in listed] == [
        "build the full-size model in /nonexistent",
        "start served TORCH_COMPILE (compiles)",
        "first request: served TORCH_COMPILE",
        "1024², 30 steps, 3 each: served TORCH_COMPILE",
        "start bare TORCH_COMPILE (compiles)",
        "first request: bare TORCH_COMPILE",
        "1024², 30 steps, 3 each: bare TORCH_COMPILE",
        "start bare eager",
        "start served eager",
        "first request: bare eager, served eager",
        "1024², 30 steps, 3 each: bare eager, served eager, served TORCH_COMPILE, "
        "bare TORCH_COMPILE",
        "4-step preset, 3 each: bare eager, served eager",
    ]
    estimate, compile_s = gpu.ESTIMATE_S, gpu.COMPILE_S["reduce-overhead"]
    served_compile = listed[1]
    assert served_compile.estimate() == estimate["start served"] + compile_s
    assert served_compile.minimum() == estimate["start served"] + estimate["compile at least"]
    # Before anything is measured, every image is estimated at the published eager figure.
    side_by_side = listed[10]
    assert side_by_side.estimate() == pytest.approx(3 * 4 * estimate["image"])


def test_the_default_540_s_plan_has_served_compiled_figures_in_its_first_60_percent() -> None:
    """Before anything is measured, the default window's plan runs every item, and the
    compiled Service's images end within 60 % of the budget."""
    args = gpu.parse_args([])
    assert (args.budget, args.compile_mode, args.compile_scope) == (
        540,
        "reduce-overhead",
        "blocks",
    )
    text = gpu.timeline(config(model_dir=Path("/nonexistent"), budget_s=args.budget))
    assert "skipped" not in text
    served_images = next(
        line for line in text.splitlines() if line.startswith("1024², 30 steps, 3 each: served")
    )
    assert float(served_images.split()[-2]) <= 0.6 * args.budget
    # The whole networks' compile and max-autotune's kernel search do not fit the same
    # window: each is one flag away.
    for slow in (config(budget_s=540, compile_scope="whole"), config(compile_mode="max-autotune")):
        assert "skipped" in gpu.timeline(slow)


def subject(mode: str, variant: str, **fields: object) -> gpu.Subject:
    made = (gpu.Bare if mode == "bare" else gpu.Served)(config(), variant)
    for name, value in fields.items():
        setattr(made, name, value)
    return made


def test_the_table_gives_figures_their_spread_or_why_there_are_none() -> None:
    subjects = [
        subject("bare", "off", startup_s=20.0, seconds={"image": [3.0, 3.2, 3.1], "preset": []}),
        subject("served", "off", startup_s=40.0, seconds={"image": [3.3, 3.4], "preset": []}),
        subject("bare", "TORCH_COMPILE", missing={"image": "needs ≈ 300 s; 90 s left"}),
        subject("served", "TORCH_COMPILE", seconds={"image": [2.2], "preset": []}),
    ]
    subjects[1].missing["preset"] = "abandoned at the deadline, after 12 s"
    cfg = config(variants=["off", "TORCH_COMPILE"])
    rows = {r["figure"]: r for r in gpu.figures(subjects, cfg)}
    per_image = rows["seconds per image (1024², 30 steps), eager"]
    assert per_image["bare"] == {"median": 3.1, "min": 3.0, "max": 3.2, "runs": 3}
    assert per_image["served_over_bare"] == pytest.approx(3.35 / 3.1)
    assert rows["peak GPU memory, eager"]["served"] == "not measured"
    assert "4-step preset, seconds per image, TORCH_COMPILE" not in rows

    results = {
        "config": {"variants": cfg.variants, "budget_s": 420},
        "seconds": 415,
        "rows": list(rows.values()),
        "plan": [
            {"name": "start bare TORCH_COMPILE (compiles)", "status": "skipped",
             "estimate_s": 260.0, "seconds": None, "note": "needs ≈ 300 s; 90 s left"},
        ],
    }  # fmt: skip
    text = gpu.table(results)
    assert "3.1 [3–3.2] ×3" in text
    assert "(needs ≈ 300 s; 90 s left)" in text
    assert "(abandoned at the deadline, after 12 s)" in text
    assert "TORCH_COMPILE: served 1.52×" in text
    assert "budget 420 s, used 415 s" in text
    assert "skipped: needs ≈ 300 s; 90 s left" in text
    cpu = {r["figure"]: r for r in gpu.figures(subjects, config(device="cpu"))}
    assert cpu["peak GPU memory, eager"]["bare"] == gpu.NO_CUDA_REASON


def test_the_stop_item_stops_the_variant_it_follows() -> None:
    cfg = config(model_dir=Path("/nonexistent"), variants=["off", "FUSE_QKV"])
    plan, subjects = gpu.build_plan(cfg, deadline=time.monotonic() + 60)
    stop = next(i for i in plan.items if i.name == "stop FUSE_QKV")
    pair = [s for s in subjects if s.variant == "FUSE_QKV"]
    eager = [s for s in subjects if s.variant == "off"]
    for s in subjects:
        s.live = True
    stop.run()
    assert [s.live for s in pair] == [False, False]
    assert [s.live for s in eager] == [True, True]  # the baseline stays loaded


def test_the_benchmarks_servers_carry_no_test_hooks(tmp_path: Path) -> None:
    """The slow-GPU fault wraps the UNet's forward: inside a benchmark it would be measured,
    and compiled it breaks the graph."""
    from devtools.harness import SLOW_GPU, Server

    servers = [
        Server([], module="platform", log_dir=tmp_path, fault_hooks=on) for on in (True, False)
    ]
    for server in servers:
        server.process.wait(timeout=60)
    hooked, clean = (server.env for server in servers)
    assert str(SLOW_GPU) in hooked["PYTHONPATH"].split(os.pathsep)
    assert str(SLOW_GPU) not in clean.get("PYTHONPATH", "").split(os.pathsep)
    assert "SDXL_SLOW_STEP_FILE" not in clean


def test_the_preflight_stops_a_gpu_run_without_cuda_naming_why(tmp_path: Path) -> None:
    from bench import preflight

    env_txt = tmp_path / "out" / "env.txt"
    result = subprocess.run(
        [sys.executable, "-m", "bench.preflight", str(env_txt), "--size", "64"],
        cwd=ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == preflight.CANNOT_RUN
    lines = env_txt.read_text().splitlines()
    assert any("machine: " in line and os.uname().machine in line for line in lines)
    assert any("torch: " in line and "CUDA available: False" in line for line in lines)
    assert "STOP: no CUDA GPU visible to torch" in lines[-1]
