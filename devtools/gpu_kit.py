"""The GPU kit: everything a rented GPU machine without network needs for `make bench-gpu`.

    python -m devtools.gpu_kit build gpu-kit       # `make gpu-kit`: sources and wheels
    python -m devtools.gpu_kit mirror .venv-gpu    # a Python 3.12 stand-in for that machine

Such a machine has Python 3.12 with torch, triton and the libraries listed in
``devtools/gpu_machine.txt``, but none of diffusers, BentoML or pydantic. The kit holds the
application's runtime sources with the benchmark, and the Python 3.12 manylinux wheels of
every runtime dependency except torch (with its triton and CUDA libraries) and the big
binaries the machine has (``LEFT_OUT``), plus pip's own wheel: ``scripts/gpu-kit-install.sh``
installs them offline into a folder of its own, leaving the machine's packages untouched.

``mirror`` builds the stand-in that the rehearsal test runs the kit in: a virtual
environment with exactly what ``gpu_machine.txt`` lists, torch's CUDA build included (PyPI
has no other for Python 3.12; it runs on a CPU).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

ROOT = Path(__file__).resolve().parent.parent
MACHINE_PACKAGES = Path(__file__).with_name("gpu_machine.txt")
MAX_BYTES = 60 * 2**20
# What the kit holds besides its wheels: the application as `bentoml serve .` runs it, the
# benchmark and the development helpers it builds on.
SOURCES = [
    "service.py",
    "bentofile.yaml",
    "config-file.yaml",
    "requirements.txt",
    "sdxl_controlnet",
    "studio",
    "bench",
    "devtools",
    "scripts/gpu-bench.sh",
    "scripts/gpu-kit-install.sh",
]
WHEELS = "gpu-wheels"
PYTHON_VERSION = "3.12"
# manylinux2014 is glibc 2.17; a machine with torch 2.11 has glibc 2.28 or later.
PLATFORMS = ["manylinux2014_x86_64", *(f"manylinux_2_{v}_x86_64" for v in range(17, 29))]
# torch brings triton and the CUDA libraries; numpy, OpenCV and Pillow, which the machine
# has, are 67 MB between them.
LEFT_OUT = {"torch", "numpy", "opencv-python-headless", "pillow"}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def target_options() -> list[str]:
    """pip's options that pick the GPU machine's wheels: CPython 3.12, x86-64 Linux."""
    options = ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation"]
    options += ["cp", "--abi", f"cp{PYTHON_VERSION.replace('.', '')}", "--abi", "abi3"]
    options += ["--abi", "none"]
    for platform in PLATFORMS:
        options += ["--platform", platform]
    return options


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def machine_torch() -> str:
    """The torch version the GPU machine has (``gpu_machine.txt``)."""
    pin = re.search(r"^torch==([^\s+]+)", MACHINE_PACKAGES.read_text(), re.MULTILINE)
    if pin is None:
        raise SystemExit(f"{MACHINE_PACKAGES} pins no torch: torch==VERSION, as the machine has")
    return pin.group(1)  # without a local label such as +cu130: the stand-in adds its own


def _torch_stand_in(folder: Path, version: str) -> None:
    """A metadata-only wheel of the machine's torch, with a local version label that ranks
    above the real one: the resolver settles torch with it and never reads torch's own
    requirements (its CUDA libraries), which the kit leaves out anyway."""
    version = f"{version}+kit"
    info = f"torch-{version}.dist-info"
    with zipfile.ZipFile(folder / f"torch-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n"
        )
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")


def _is_torch(line: str) -> bool:
    try:
        return Requirement(line.split("#")[0]).name.lower() == "torch"
    except InvalidRequirement:  # a comment, a blank line or an option
        return False


def resolve(requirements: Path) -> dict[str, str]:
    """Every distribution ``requirements`` needs on the GPU machine, as name: version, torch's
    own dependencies aside: Python 3.12 x86-64 Linux, with the machine's torch in place of the
    project's pin, so that a library that needs a newer torch fails here, not there."""
    with tempfile.TemporaryDirectory() as tmp:
        stand_in, report = Path(tmp, "stand-in"), Path(tmp, "report.json")
        stand_in.mkdir()
        torch = machine_torch()
        _torch_stand_in(stand_in, torch)
        on_machine = Path(tmp, "requirements.txt")
        lines = [line for line in requirements.read_text().splitlines() if not _is_torch(line)]
        on_machine.write_text("\n".join([*lines, f"torch=={torch}"]))
        _pip(
            "install", "--quiet", "--dry-run", "--ignore-installed", "--report", str(report),
            "--target", str(Path(tmp, "target")), "--find-links", str(stand_in),
            *target_options(), "-r", str(on_machine),
        )  # fmt: skip
        installs = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"]: i["metadata"]["version"] for i in installs}


def _copy_sources(output: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results")
    for source in SOURCES:
        path, dest = ROOT / source, output / source
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, dest, ignore=ignore)
        else:
            shutil.copy2(path, dest)


def build(output: Path) -> int:
    """Write the kit into ``output`` (replacing what is there); its size in bytes."""
    output = Path(output)
    shutil.rmtree(output, ignore_errors=True)
    _copy_sources(output)
    wanted = {
        name: version
        for name, version in resolve(ROOT / "requirements.txt").items()
        if _normalized(name) not in LEFT_OUT
    }
    pins = [f"{name}=={version}" for name, version in sorted(wanted.items())]
    wheels = output / WHEELS
    _pip("download", "--quiet", "--no-deps", "--dest", str(wheels), *target_options(), "pip", *pins)
    size = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    if size > MAX_BYTES:
        biggest = sorted(wheels.glob("*.whl"), key=lambda f: -f.stat().st_size)[:5]
        listing = ", ".join(f"{f.name} ({f.stat().st_size / 2**20:.1f} MiB)" for f in biggest)
        raise SystemExit(
            f"the kit is {size / 2**20:.1f} MiB, over {MAX_BYTES / 2**20:.0f} MiB; "
            f"biggest wheels: {listing}"
        )
    return size


def python_312() -> str | None:
    """A Python 3.12 for the stand-in: GPU_KIT_PYTHON, pyenv's, or python3.12 on the PATH;
    the first that runs (pyenv's shim is on the PATH but fails where 3.12 is not selected)."""
    pyenv = sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python"))
    candidates = [os.environ.get("GPU_KIT_PYTHON"), *map(str, pyenv), shutil.which("python3.12")]
    check = "import sys; sys.exit(sys.version_info[:2] != (3, 12))"
    return next(
        (
            python
            for python in candidates
            if python and subprocess.run([python, "-c", check], capture_output=True).returncode == 0
        ),
        None,
    )


def mirror(venv: Path, python: str) -> Path:
    """A virtual environment with ``python`` (3.12) holding what the GPU machine has, built
    once: it is rebuilt only when ``gpu_machine.txt`` changes. A second caller (`make test`
    builds it while pytest starts) waits for the first one's build instead of redoing it."""
    venv = Path(venv)
    stamp = venv / "gpu_machine.txt"
    with open(venv.with_name(f"{venv.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text() == MACHINE_PACKAGES.read_text():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "-r", str(MACHINE_PACKAGES)], check=True)
        shutil.copy(MACHINE_PACKAGES, stamp)
    return venv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_command = commands.add_parser("build", help="write the kit")
    build_command.add_argument("output", type=Path)
    mirror_command = commands.add_parser("mirror", help="build the GPU machine's stand-in")
    mirror_command.add_argument("venv", type=Path)
    mirror_command.add_argument("--python", default=python_312(), help="a Python 3.12")
    args = parser.parse_args()
    if args.command == "build":
        size = build(args.output)
        print(f"GPU kit in {args.output}: {size / 2**20:.1f} MiB")
        print(f"on the GPU machine: cd {args.output.name} && scripts/gpu-bench.sh OUTDIR")
    elif args.python is None:
        print("no Python 3.12 here, so no GPU machine stand-in: set GPU_KIT_PYTHON")
    else:
        print(f"GPU machine stand-in in {mirror(args.venv, args.python)}")


if __name__ == "__main__":
    main()
