#!/usr/bin/env bash
# The first command to run on a GPU (one GPU, at most ~8 minutes): CUDA-only tests, the attention
# self-check, DAT-T++ trained with `auto` against `reference` in fp16 and bf16, the grad-scaler
# overflow path and the benchmark, into one Markdown report (default gpu_check_report.md) whose
# sections paste into BENCHMARKS.md.
#   bash tools/gpu_check.sh [--out report.md]
#   bash tools/gpu_check.sh --cpu --out report.md     # reduced CPU mode (the test suite runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python tools/gpu_check.py "$@"
