#!/usr/bin/env bash
# The GPU benchmark on a machine with no network, from the GPU kit (`make gpu-kit`):
#   scripts/gpu-bench.sh OUTDIR [bench.gpu options]
# Installs the kit's wheels into a folder of their own (the machine's torch and packages stay
# as they are), runs `python -m bench.gpu` within BENCH_GPU_BUDGET_S (default 420 s, this
# installation included), and writes the table and the JSON to OUTDIR.
# PYTHON picks the interpreter (default python3, which must have torch).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 OUTDIR [bench.gpu options]" >&2
  exit 2
fi
export BENCH_GPU_STARTED="${BENCH_GPU_STARTED:-$(date +%s)}"  # the budget counts from here
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"
shift
PYTHON="${PYTHON:-python3}"
SITE="$(mktemp -d "${TMPDIR:-/tmp}/gpu-kit-site.XXXXXX")"
trap 'rm -rf "$SITE"' EXIT

# pip runs from its own wheel: the machine's pip, if any, is not needed.
PIP_WHEEL="$(ls "$ROOT"/gpu-wheels/pip-*.whl)"
"$PYTHON" "$PIP_WHEEL/pip" install --quiet --no-index --no-deps --disable-pip-version-check \
  --target "$SITE" $(ls "$ROOT"/gpu-wheels/*.whl | grep -v '/pip-')

cd "$ROOT"
export PYTHONPATH="$SITE:$ROOT"
export BENTOML_DO_NOT_TRACK=true
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
"$PYTHON" -m bench.gpu --output "$OUT/gpu-bench.json" --log-dir "$OUT/logs" "$@" \
  | tee "$OUT/gpu-bench.txt"
