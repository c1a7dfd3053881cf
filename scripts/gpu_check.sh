#!/usr/bin/env bash
# One GPU check: CUDA tests, memory margins, kernel and offload benchmarks -> one JSON + one markdown table.
# Everything is in scripts/gpu_check.py; `scripts/gpu_check.sh --help` prints what it does and its options.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" "$ROOT/scripts/gpu_check.py" "$@"
