#!/usr/bin/env bash
# Train on one node with torchrun (one process per GPU; on a machine without GPUs, per CPU worker).
#
#   ./train.sh NUM_GPUS CONFIG [TAG] [extra main.py args...]
#   DAT_DATA_PATH=/data/imagenet ./train.sh 8 configs/dat_tiny.yaml
#   ./train.sh 8 configs/dat_tiny.yaml run1 --data-path /data/imagenet --batch-size 64
#
# The dataset comes from --data-path among the extra arguments or from $DAT_DATA_PATH.
# Environment: PORT (rendezvous port, default 29501), TORCHRUN (launcher, default torchrun).
# Mixed precision (--amp, float16) is on; on a CPU main.py falls back to float32 with a warning.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage

NUM_GPUS=$1
CFG=$2
shift 2
TAG_ARGS=()
if [ $# -ge 1 ] && [[ $1 != -* ]]; then     # an optional tag before the extra arguments
    TAG_ARGS=(--tag "$1")
    shift
fi

HERE=$(cd "$(dirname "$0")" && pwd)
exec ${TORCHRUN:-torchrun} --nproc_per_node "$NUM_GPUS" --master_port "${PORT:-29501}" \
    "$HERE/main.py" --cfg "$CFG" --amp "${TAG_ARGS[@]}" "$@"
