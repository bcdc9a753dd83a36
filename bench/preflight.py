"""What a GPU run needs, checked in its first seconds: `python -m bench.preflight ENV_TXT [--cpu]`.

Written for ``scripts/gpu-bench.sh`` before anything is installed, so it needs only the
machine's Python and torch. Each fact is appended to ENV_TXT as soon as it is known: the CPU
architecture, the GPUs with their driver and CUDA, torch, the C compiler and ``Python.h`` that
Triton and inductor build with, and a 64² ``torch.compile`` on the device the run uses.

Exit status: 0 all there; ``NO_COMPILE`` (2) the run can measure eager only; ``CANNOT_RUN`` (3)
nothing can be measured (no CUDA without ``--cpu``). The last line of ENV_TXT says which.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

NO_COMPILE, CANNOT_RUN = 2, 3
SMOKE_TIMEOUT_S = 120  # a cold Triton compile of one kernel takes 10-40 s
# One small kernel through dynamo, inductor and (on CUDA) Triton: what TORCH_COMPILE needs.
SMOKE = """
import sys, torch
device = sys.argv[1]
f = torch.compile(lambda x: x.sin() * 2 + 1, dynamic=False)
x = torch.randn(64, 64, device=device)
torch.testing.assert_close(f(x), x.sin() * 2 + 1)
print(f"torch.compile on {device}: ok")
"""


class Report:
    def __init__(self, path: Path) -> None:
        self.path, self.began = path, time.monotonic()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def line(self, what: str, value: str) -> None:
        with self.path.open("a") as file:  # each fact on disk as soon as it is known
            file.write(f"[{time.monotonic() - self.began:5.1f} s] {what}: {value}\n")


def _run(command: list[str], timeout: float = 20) -> tuple[bool, str]:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    ok = done.returncode == 0
    return ok, (done.stdout if ok else done.stdout + done.stderr).strip()  # warnings aside


def check(path: Path, cpu: bool) -> int:
    report = Report(path)
    report.line("machine", f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}")
    report.line("python", f"{sys.executable} {platform.python_version()}")
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,driver_version,memory.total"
        ok, out = _run(["nvidia-smi", query, "--format=csv,noheader"])
        report.line("nvidia-smi", out.replace("\n", "; ") if ok else f"failed: {out[-300:]}")
    else:
        report.line("nvidia-smi", "not on the PATH")
    try:
        import torch
    except ImportError as exc:
        report.line("STOP", f"torch does not import: {exc}")
        return CANNOT_RUN
    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    report.line(
        "torch",
        f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
        f"CUDA available: {cuda} {gpus or ''}".rstrip(),
    )
    if not cuda and not cpu:
        report.line("STOP", "no CUDA GPU visible to torch: nothing to measure (driver? container?)")
        return CANNOT_RUN
    missing = []
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler:
        _, version = _run([compiler, "--version"])
        report.line("C compiler", f"{compiler}: {version.splitlines()[0] if version else '?'}")
    else:
        missing.append("a C compiler (cc or gcc; Triton and inductor build with it)")
        report.line("C compiler", "none")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    report.line("Python.h", f"{header} {'present' if header.is_file() else 'absent'}")
    if not header.is_file():
        missing.append(f"Python.h ({header}; the python3-dev package)")
    if not missing:
        device = "cpu" if cpu else "cuda"
        ok, out = _run([sys.executable, "-c", SMOKE, device], timeout=SMOKE_TIMEOUT_S)
        report.line("compile smoke test", out.splitlines()[-1] if ok else f"failed: {out[-600:]}")
        if not ok:
            missing.append(f"a working torch.compile on {device}")
    if missing:
        report.line("NO COMPILE", "eager only; missing " + "; ".join(missing))
        return NO_COMPILE
    report.line("ready", "everything the run needs is here")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("env_txt", type=Path)
    parser.add_argument("--cpu", action="store_true", help="the CPU rehearsal")
    args, _ = parser.parse_known_args(argv)  # bench.gpu's options pass through
    return check(args.env_txt, args.cpu)


if __name__ == "__main__":
    sys.exit(main())
