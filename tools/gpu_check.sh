#!/usr/bin/env bash
# The first command to run on a GPU (one GPU, sized for at most ~8 minutes): CUDA-only tests, the
# attention self-check, DAT-T++ trained with `auto` against `reference` in fp16 and bf16, the
# grad-scaler overflow path and the benchmark, into one Markdown report (default
# gpu_check_report.md in the current folder) whose sections paste into BENCHMARKS.md.
#   bash tools/gpu_check.sh [--out report.md]
#   bash tools/gpu_check.sh --cpu --out report.md     # reduced CPU mode (the test suite runs it)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec python "$repo/tools/gpu_check.py" "$@"
