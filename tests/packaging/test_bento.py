"""`bentoml build` packs both Services, the pinned requirements and OpenCV's system packages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from devtools.harness import ROOT

pytestmark = pytest.mark.build


@pytest.fixture
def bento(local_bento: Path) -> Path:
    return local_bento


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
    runtime = [ROOT / "service.py", *ROOT.glob("sdxl_controlnet/**/*.py"), *ROOT.glob("studio/*")]
    # bentoml build adds the bentofile it read.
    assert shipped == {path.relative_to(ROOT).as_posix() for path in runtime} | {"bentofile.yaml"}
    for dev_only in ("tests", "bench", "devtools", "models", ".venv", "wheels"):
        assert not (src / dev_only).exists()


def test_bento_pins_the_requirements(bento: Path) -> None:
    locked = (bento / "env" / "python" / "requirements.lock.txt").read_text().splitlines()
    for pin in (ROOT / "requirements.txt").read_text().splitlines():
        if pin and not pin.startswith("#"):
            assert pin in locked


def test_dockerfile_installs_what_opencv_needs(bento: Path) -> None:
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "libstdc++6 zlib1g" in dockerfile


def test_dockerfile_installs_the_locked_requirements(bento: Path) -> None:
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    # BentoML's install.sh installs requirements.lock.txt, then the Bento's wheels.
    assert "bash -euxo pipefail /home/bentoml/bento/env/python/install.sh" in dockerfile


def test_image_keeps_no_build_tools_apt_cache_or_wheels(bento: Path) -> None:
    """Dockerfile.template: BentoML's Debian template, less what a server never runs."""
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    for build_tool in ("build-essential", "g++", "curl", "gnupg2"):
        assert build_tool not in dockerfile
    assert "Keep-Downloaded-Packages" not in dockerfile
    base, stages = dockerfile.split("\nFROM base-container AS bento-install\n")
    install_stage, image = stages.split("\nFROM base-container\n")
    (apt_install,) = [run for run in base.split("\nRUN ") if "apt-get install" in run]
    assert "rm -rf /var/lib/apt/lists/*" in apt_install
    # Of a tool chain, only what Triton needs at run time for TORCH_COMPILE: a C compiler.
    assert "libstdc++6 zlib1g gcc libc6-dev &&" in apt_install
    # The packages are installed in a build stage (binutils strips them there); the image copies
    # their environment and the Bento without its wheels, so the CPU torch wheel is not shipped.
    assert "install.sh" in install_stage
    assert "RUN rm -rf ./env/python/wheels" in install_stage
    assert "install.sh" not in image
    assert "apt-get" not in image
    assert "COPY --from=bento-install --chown=0:0 /app /app" in image
    assert "COPY --from=bento-install --chown=bentoml:bentoml /home/bentoml/bento " in image
    copies = [line for line in image.splitlines() if line.startswith("COPY ")]
    assert all(line.startswith("COPY --from=bento-install ") for line in copies)


def test_image_user_is_the_one_the_kubernetes_manifests_run_as(bento: Path) -> None:
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    for manifest in (ROOT / "deploy" / "kubernetes").glob("*.yaml"):
        for resource in yaml.safe_load_all(manifest.read_text()):
            if resource["kind"] == "Deployment":
                uid = resource["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
                assert f"ARG BENTO_USER_UID={uid}\n" in dockerfile


def test_cpu_bentofile_differs_only_in_name_torch_cpu_serving_and_compiler() -> None:
    production = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    cpu = yaml.safe_load((ROOT / "bentofile.cpu.yaml").read_text())
    (wheel,) = cpu["python"]["wheels"]
    assert f"./{wheel}" in (ROOT / "requirements-cpu.txt").read_text().splitlines()
    assert wheel in (ROOT / "Makefile").read_text(), "make image-cpu fetches another wheel"
    assert cpu.pop("envs") == [{"name": "ALLOW_CPU", "value": "1"}]
    assert production["docker"]["system_packages"][-2:] == ["gcc", "libc6-dev"]
    del production["docker"]["system_packages"][-2:]
    for bentofile in (production, cpu):
        del bentofile["name"], bentofile["python"]
    assert cpu == production
