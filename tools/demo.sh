#!/usr/bin/env bash
# The whole pipeline on a laptop CPU in a few minutes: generate a small ImageNet-format dataset
# of real JPEG files, train configs/demo.yaml on it, then evaluate the best checkpoint.
#
#   bash tools/demo.sh [extra main.py args...]
#
# Environment: DEMO_DATA (dataset folder, default demo_data), DEMO_OUTPUT (default output).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DEMO_DATA:-demo_data}
OUT=${DEMO_OUTPUT:-output}

python -m data.demo --out "$DATA" --train-per-class 256 --val-per-class 32   # what configs/demo.yaml is tuned for
python main.py --cfg configs/demo.yaml --data-path "$DATA" --output "$OUT" --tag demo "$@"
python main.py --cfg configs/demo.yaml --data-path "$DATA" --output "$OUT" --tag demo-eval \
    --eval --resume "$OUT/dat_demo/demo/best.pth" "$@"
