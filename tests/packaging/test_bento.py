"""`bentoml build` packs both Services, the pinned requirements and OpenCV's system packages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.build


@pytest.fixture(scope="module")
def bento(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("bentoml-home")
    subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "."],
        cwd=ROOT,
        env={**os.environ, "BENTOML_HOME": str(home)},
        check=True,
        capture_output=True,
    )
    (bento_yaml,) = home.glob("bentos/sdxl-controlnet/*/bento.yaml")
    return bento_yaml.parent


def test_bento_serves_the_front_and_carries_both_services(bento: Path) -> None:
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["service"] == "service:ControlNet"
    services = {service["name"]: service for service in info["services"]}
    assert set(services) == {"ControlNet", "SDXLControlNetService"}
    assert services["ControlNet"]["dependencies"] == [{"service": "SDXLControlNetService"}]
    assert services["SDXLControlNetService"]["config"]["resources"] == {
        "gpu": 1,
        "gpu_type": "nvidia-l4",
    }


def test_bento_carries_the_runtime_and_nothing_else(bento: Path) -> None:
    src = bento / "src"
    shipped = {path.relative_to(src).as_posix() for path in src.rglob("*") if path.is_file()}
    runtime = [ROOT / "service.py", *ROOT.glob("sdxl_controlnet/*.py"), *ROOT.glob("studio/*")]
    # bentoml build adds the bentofile it read.
    assert shipped == {path.relative_to(ROOT).as_posix() for path in runtime} | {"bentofile.yaml"}
    for dev_only in ("tests", "bench", "devtools", "models", ".venv", "wheels"):
        assert not (src / dev_only).exists()


def test_bento_pins_the_requirements(bento: Path) -> None:
    locked = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    for pin in (ROOT / "requirements.txt").read_text().splitlines():
        if pin and not pin.startswith("#"):
            assert pin in locked


def test_dockerfile_installs_what_opencv_needs(bento: Path) -> None:
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "libstdc++6 zlib1g" in dockerfile


def test_dockerfile_installs_the_locked_requirements(bento: Path) -> None:
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "pip install -r $BENTO_PATH/env/python/requirements.txt" in dockerfile


def test_image_user_is_the_one_the_kubernetes_manifests_run_as(bento: Path) -> None:
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    for manifest in (ROOT / "deploy" / "kubernetes").glob("*.yaml"):
        for resource in yaml.safe_load_all(manifest.read_text()):
            if resource["kind"] == "Deployment":
                uid = resource["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
                assert f"ARG BENTO_USER_UID={uid}\n" in dockerfile


def test_cpu_bentofile_differs_only_in_name_and_torch() -> None:
    production = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    cpu = yaml.safe_load((ROOT / "bentofile.cpu.yaml").read_text())
    (wheel,) = cpu["python"]["wheels"]
    assert f"./{wheel}" in (ROOT / "requirements-cpu.txt").read_text().splitlines()
    assert wheel in (ROOT / "Makefile").read_text(), "make image-cpu fetches another wheel"
    for bentofile in (production, cpu):
        del bentofile["name"], bentofile["python"]
    assert cpu == production
