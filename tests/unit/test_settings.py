"""Settings: one validated object; a bad value stops start-up naming the variable."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.harness import ROOT
from sdxl_controlnet.settings import (
    FRONT_TIMEOUT_MARGIN_S,
    FRONT_WORKERS_CAP,
    Settings,
    SettingsError,
)

DOCS = ROOT / "docs" / "configuration.md"


def test_defaults_are_the_production_models_and_an_l4s_limits() -> None:
    defaults = Settings.from_env({})
    assert defaults.sdxl_base_model.startswith("stabilityai/stable-diffusion-xl-base-1.0@")
    assert defaults.generation_timeout_s == 300 and not defaults.allow_cpu
    assert defaults.compile_sizes == []  # compiling is off


def test_values_come_from_variables_of_the_same_name() -> None:
    settings = Settings.from_env(
        {"MAX_STEPS": "50", "ALLOW_CPU": "1", "GPUS": "4", "FRONT_WORKERS": "2", "HOME": "/x"}
    )
    assert (settings.max_steps, settings.allow_cpu, settings.gpus) == (50, True, 4)
    assert settings.front_workers == 2


def test_front_workers_are_capped_by_default_and_cpu_count_stays_possible() -> None:
    # A GPU host's cores (16 to 200) are no measure of the front's work.
    assert Settings.from_env({}).front_workers <= FRONT_WORKERS_CAP
    assert Settings.from_env({"FRONT_WORKERS": "cpu_count"}).front_workers == "cpu_count"
    assert Settings.from_env({"FRONT_WORKERS": "12"}).front_workers == 12
    with pytest.raises(SettingsError, match="FRONT_WORKERS='0'"):
        Settings.from_env({"FRONT_WORKERS": "0"})


def test_the_compile_mode_is_one_of_torch_compiles() -> None:
    assert Settings.from_env({}).torch_compile_mode == "reduce-overhead"
    searched = Settings.from_env({"TORCH_COMPILE_MODE": "max-autotune"})
    assert searched.torch_compile_mode == "max-autotune"
    with pytest.raises(SettingsError, match="TORCH_COMPILE_MODE='fast'"):
        Settings.from_env({"TORCH_COMPILE_MODE": "fast"})


def test_the_compile_scope_defaults_to_the_transformer_blocks() -> None:
    assert Settings.from_env({}).torch_compile_scope == "blocks"
    assert Settings.from_env({"TORCH_COMPILE_SCOPE": "whole"}).torch_compile_scope == "whole"
    with pytest.raises(SettingsError, match="TORCH_COMPILE_SCOPE='unet'"):
        Settings.from_env({"TORCH_COMPILE_SCOPE": "unet"})


def test_the_compile_cache_is_a_path_or_none() -> None:
    assert Settings.from_env({}).compile_cache is None
    cache = Settings.from_env({"TORCH_COMPILE_CACHE": "/cache/compile.bin"}).compile_cache
    assert cache == Path("/cache/compile.bin")


def test_the_front_timeout_is_derived_from_the_gpu_timeout() -> None:
    settings = Settings.from_env({"GENERATION_TIMEOUT_S": "100"})
    assert settings.front_timeout_s == 100 + FRONT_TIMEOUT_MARGIN_S


def test_compile_sizes_are_parsed_and_checked() -> None:
    settings = Settings.from_env(
        {"TORCH_COMPILE": "1", "TORCH_COMPILE_SIZES": "1024x1024,832x1216"}
    )
    assert settings.compile_sizes == [(1024, 1024), (832, 1216)]
    with pytest.raises(SettingsError, match="TORCH_COMPILE_SIZES"):
        Settings.from_env({"TORCH_COMPILE": "1", "TORCH_COMPILE_SIZES": "1000x1001"})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"MAX_STEPS": "abc"}, "MAX_STEPS='abc': Input should be a valid integer"),
        ({"MAX_QUEUE": "0"}, "MAX_QUEUE='0': Input should be greater than or equal to 1"),
        ({"ALLOW_CPU": "maybe"}, "ALLOW_CPU='maybe': Input should be a valid boolean"),
        ({"TORCH_COMPILE_SIZES": "big"}, "TORCH_COMPILE_SIZES='big': String should match"),
        ({"MIN_OUTPUT_SIDE": "2048"}, "MIN_OUTPUT_SIDE² must not exceed MAX_OUTPUT_PIXELS"),
        ({"LORA_ADAPTERS": "{lightning}"}, "LORA_ADAPTERS='{lightning}': Value error, not valid"),
        (
            {"LORA_ADAPTERS": '{"a b": {"model": "org/x"}}'},
            "a b.[key]: String should match pattern",
        ),
        ({"LORA_ADAPTERS": '{"fast": {}}'}, "fast.model: Field required"),
        (
            {"LORA_ADAPTERS": '{"fast": {"model": "org/x", "weight_name": "sub/x.bin"}}'},
            "fast.weight_name: String should match pattern",
        ),
        (
            {"LORA_ADAPTERS": '{"fast": {"model": "org/x", "preset": {"scheduler": "turbo"}}}'},
            "fast.preset.scheduler: Input should be 'euler'",
        ),
        (
            {"LORA_ADAPTERS": '{"fast": {"model": "org/x"}}', "FUSE_QKV": "1"},
            "FUSE_QKV cannot be combined with LORA_ADAPTERS",
        ),
    ],
)
def test_a_bad_value_names_the_variable_and_the_rule(environ, message) -> None:
    with pytest.raises(SettingsError, match="invalid configuration") as error:
        Settings.from_env(environ)
    assert message in str(error.value)


def test_a_bad_value_stops_the_application_at_import() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import service"],
        cwd=ROOT,
        env={"PATH": "", "MAX_STEPS": "abc"},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "MAX_STEPS='abc': Input should be a valid integer" in result.stderr


def test_adapters_are_read_as_json_with_their_defaults() -> None:
    declared = json.dumps(
        {
            "lightning": {
                "model": "ByteDance/SDXL-Lightning@abc",
                "preset": {"num_inference_steps": 4},
            }
        }
    )
    (adapter,) = Settings.from_env({"LORA_ADAPTERS": declared}).lora_adapters.values()
    assert adapter.weight_name == "pytorch_lora_weights.safetensors"
    assert adapter.preset.values() == {"num_inference_steps": 4}
    assert Settings.from_env({"LORA_ADAPTERS": ""}).lora_adapters == {}


def test_a_preset_beyond_the_request_bounds_stops_the_application_naming_it() -> None:
    declared = '{"fast": {"model": "/models/fast", "preset": {"num_inference_steps": 500}}}'
    result = subprocess.run(
        [sys.executable, "-c", "import service"],
        cwd=ROOT,
        env={"PATH": "", "LORA_ADAPTERS": declared},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert (
        "LORA_ADAPTERS: fast.preset: num_inference_steps: Input should be less than or equal to 100"
        in result.stderr
    )


def test_the_configuration_docs_list_every_setting_with_its_default() -> None:
    rows = re.findall(r"^\| `([A-Z_0-9]+)` \| `([^`]*)` \|", DOCS.read_text(), re.MULTILINE)
    documented = dict(rows)
    defaults = Settings.from_env({}).model_dump()
    expected = {
        name.upper(): str(value).lower() if isinstance(value, bool) else str(value)
        for name, value in defaults.items()
    }
    # The one default that depends on the machine, written as its rule.
    assert defaults["front_workers"] == min(len(os.sched_getaffinity(0)), FRONT_WORKERS_CAP)
    expected["FRONT_WORKERS"] = f"min(CPUs, {FRONT_WORKERS_CAP})"
    assert documented == expected


def test_importing_the_development_tools_reads_no_settings() -> None:
    """The test set-up puts the tiny model in the environment after importing devtools:
    settings read first would serve the production models (and no LoRA adapters)."""
    import subprocess
    import sys

    probe = (
        "import sys, devtools.harness, devtools.tiny_model\n"
        "print('sdxl_controlnet.settings' in sys.modules)"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "False"
