"""config-file.yaml, checked offline against BentoML's own deployment schemas."""

from __future__ import annotations

import copy

import bentoml
import cattrs
import pytest
import yaml
from _bentoml_sdk.service.config import ServiceConfig
from bentoml._internal.cloud.schemas.modelschemas import DeploymentStrategy
from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
from pydantic import BaseModel, ConfigDict

from devtools.harness import ROOT

CONFIG = yaml.safe_load((ROOT / "config-file.yaml").read_text())
BENTOFILE = yaml.safe_load((ROOT / "bentofile.yaml").read_text())

# BentoML's schemas accept unknown keys and BentoCloud ignores them, so a typo would
# deploy silently with a default. The same schemas, structured strictly, reject it.
strict = cattrs.Converter(forbid_extra_keys=True)


class ConfigOverrides(BaseModel):
    # ServiceConfig is a TypedDict that ignores unknown keys; forbidding extras on the
    # model that holds it reaches every nested TypedDict too.
    model_config = ConfigDict(extra="forbid")
    config: ServiceConfig


def check(config: dict) -> CreateDeploymentSchema:
    """Raise ValueError on anything in ``config`` that BentoCloud would reject or ignore."""
    # `bentoml deploy` takes `cluster` out before it structures the rest.
    fields = {key: value for key, value in config.items() if key != "cluster"}
    try:
        deployment = strict.structure(fields, CreateDeploymentSchema)
    except cattrs.BaseValidationError as exc:
        raise ValueError("; ".join(cattrs.transform_error(exc))) from exc
    for service in deployment.services.values():
        ConfigOverrides(config=service.config_overrides)
        if service.deployment_strategy is not None:
            DeploymentStrategy(service.deployment_strategy)
    return deployment


def test_config_file_passes_bentomls_deployment_schemas() -> None:
    deployment = check(CONFIG)
    for service in deployment.services.values():
        assert service.scaling.min_replicas <= service.scaling.max_replicas


def test_config_file_names_exactly_the_services_of_the_bento() -> None:
    entry = bentoml.load(BENTOFILE["service"], working_dir=str(ROOT))
    assert set(CONFIG["services"]) == set(entry.all_services())


def test_config_file_overrides_match_each_services_own_settings() -> None:
    entry = bentoml.load(BENTOFILE["service"], working_dir=str(ROOT))
    for name, service in entry.all_services().items():
        overrides = CONFIG["services"][name]["config_overrides"]
        assert overrides.get("resources") == service.config.get("resources")


@pytest.mark.parametrize(
    ("path", "typo"),
    [
        ((), "acess_authorization"),
        (("services", "ControlNet"), "instance-type"),
        (("services", "ControlNet", "scaling"), "max_replica"),
        (("services", "ControlNet", "scaling", "policy"), "scale_up_stabilisation_window"),
        (("services", "SDXLControlNetService", "envs", 0), "valeu"),
        (("services", "SDXLControlNetService", "config_overrides"), "worker"),
        (("services", "SDXLControlNetService", "config_overrides", "traffic"), "concurency"),
        (("services", "SDXLControlNetService", "config_overrides", "resources"), "gpu_typ"),
    ],
)
def test_a_misspelled_field_at_any_level_is_an_error_naming_it(path: tuple, typo: str) -> None:
    config = copy.deepcopy(CONFIG)
    section = config
    for key in path:
        section = section[key]
    section[typo] = 1
    with pytest.raises(ValueError, match=typo):
        check(config)


@pytest.mark.parametrize(
    ("field", "value"),
    [("deployment_strategy", "RollingUpdates"), ("scaling", {"min_replicas": "one"})],
)
def test_a_wrong_value_is_an_error(field: str, value: object) -> None:
    config = copy.deepcopy(CONFIG)
    config["services"]["ControlNet"][field] = value
    with pytest.raises(ValueError):
        check(config)


def envs(service: str) -> dict[str, str]:
    return {env["name"]: env["value"] for env in CONFIG["services"][service].get("envs", [])}


def test_both_services_get_the_settings_both_read() -> None:
    from sdxl_controlnet.settings import Settings

    front, gpu = envs("ControlNet"), envs("SDXLControlNetService")
    assert front == gpu
    assert {"GENERATION_TIMEOUT_S", "MAX_STEPS", "MAX_OUTPUT_PIXELS"} <= set(front)
    Settings.from_env(front)


def test_gpu_requests_wait_in_bentoclouds_queue_one_at_a_time_per_replica() -> None:
    traffic = CONFIG["services"]["SDXLControlNetService"]["config_overrides"]["traffic"]
    assert traffic == {"external_queue": True, "concurrency": 1}
    # what BentoML 1.4.40's own traffic schema accepts
    ConfigOverrides(config={"traffic": traffic})
