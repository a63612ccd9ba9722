#!/usr/bin/env bash
# Evaluate a checkpoint (ours or an official release file) on the val split, on one node.
#
#   ./evaluate.sh NUM_GPUS CONFIG CHECKPOINT [extra main.py args...]
#   DAT_DATA_PATH=/data/imagenet ./evaluate.sh 8 configs/dat_tiny.yaml dat_pp_t_in1k_224.pth
#
# The dataset comes from --data-path among the extra arguments or from $DAT_DATA_PATH. Mixed
# precision (--amp) is on when GPUs are visible. The exit status is main.py's, and a failure ends
# with its one-line error.
# Environment: PORT (rendezvous port, default 29501), TORCHRUN (launcher, default torchrun).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/tools/launcher_helpers.sh"
[ $# -ge 3 ] || usage

NUM_GPUS=$1
CFG=$2
CKPT=$3
shift 3

set_amp_args
exec "$HERE/tools/launch.sh" "$NUM_GPUS" --cfg "$CFG" --eval --resume "$CKPT" "${AMP_ARGS[@]}" "$@"
