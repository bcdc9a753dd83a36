#!/usr/bin/env bash
# The GPU benchmark on a machine with no network, from the GPU kit (`make gpu-kit`):
#   scripts/gpu-bench.sh OUTDIR [bench.gpu options]
# First OUTDIR/env.txt: what the machine has and whether torch.compile works there (bench.preflight).
# Then installs the kit's wheels into a folder of their own (the machine's torch and packages stay
# as they are) and runs `python -m bench.gpu` within BENCH_GPU_BUDGET_S (default 540 s, this
# installation included). The table (gpu-bench.txt) and the JSON are rewritten after every item.
# The full-size model and the compilers' caches live in BENCH_GPU_CACHE, outside the kit, so a
# second run (or a fresh copy of the kit) reuses them. OUT/compile-cache.bin returns the compiled
# artifacts (torch.compiler.save_cache_artifacts) with the figures: pass it to the next window
# on the same torch and GPU (--compile-cache FILE) and its compiled subjects start warm.
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
CACHE="${BENCH_GPU_CACHE:-$HOME/.cache/sdxl-controlnet-gpu-bench}"
mkdir -p "$CACHE"
export TORCHINDUCTOR_CACHE_DIR="$CACHE/inductor" TRITON_CACHE_DIR="$CACHE/triton"
SITE="$(mktemp -d "${TMPDIR:-/tmp}/gpu-kit-site.XXXXXX")"
trap 'rm -rf "$SITE"' EXIT

cd "$ROOT"
preflight=0
PYTHONPATH="$ROOT" "$PYTHON" -m bench.preflight "$OUT/env.txt" "$@" || preflight=$?
VARIANTS=()
case "$preflight" in
  0) ;;
  2) echo "gpu-bench: no torch.compile here, measuring eager only (see $OUT/env.txt)" >&2
     VARIANTS=(--variants off) ;;
  *) echo "gpu-bench: stopped, the machine cannot run the benchmark (see $OUT/env.txt):" >&2
     tail -n 1 "$OUT/env.txt" >&2
     exit "$preflight" ;;
esac

PYTHON="$PYTHON" "$ROOT/scripts/gpu-kit-install.sh" "$SITE"

export PYTHONPATH="$SITE:$ROOT"
export BENTOML_DO_NOT_TRACK=true
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
# The caller's options come last, so that theirs win.
"$PYTHON" -m bench.gpu --output "$OUT/gpu-bench.json" --log-dir "$OUT/logs" \
  --model-dir "$CACHE/full-size" "${VARIANTS[@]}" "$@" 2> >(tee "$OUT/progress.log" >&2)
