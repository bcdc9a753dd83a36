#!/usr/bin/env bash
# The GPU kit's wheels, installed offline into SITE, a folder of their own (the machine's
# packages stay as they are), by pip from its own wheel (the machine's pip is not needed):
#   scripts/gpu-kit-install.sh SITE
# PYTHON picks the interpreter (default python3). scripts/gpu-bench.sh runs it first.
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 SITE" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PIP_WHEEL="$(ls "$ROOT"/gpu-wheels/pip-*.whl)"
"${PYTHON:-python3}" "$PIP_WHEEL/pip" install --quiet --no-index --no-deps \
  --disable-pip-version-check --target "$1" $(ls "$ROOT"/gpu-wheels/*.whl | grep -v '/pip-')
