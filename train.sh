#!/usr/bin/env bash
# Train on one node with torchrun (one process per GPU; on a machine without GPUs, per CPU worker).
#
#   ./train.sh NUM_GPUS CONFIG [TAG] [extra main.py args...]
#   DAT_DATA_PATH=/data/imagenet ./train.sh 8 configs/dat_tiny.yaml run1
#   ./train.sh 8 configs/dat_tiny.yaml run1 --data-path /data/imagenet --batch-size 64
#
# The dataset comes from --data-path among the extra arguments or from $DAT_DATA_PATH. Mixed
# precision (--amp) is on when GPUs are visible. The exit status is main.py's, and a failure ends
# with its one-line error; SIGTERM / SIGUSR1 / Ctrl-C save the current step (see tools/launch.sh).
# Environment: PORT (rendezvous port, default 29501), TORCHRUN (launcher, default torchrun).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/tools/launcher_helpers.sh"
[ $# -ge 2 ] || usage

NUM_GPUS=$1
CFG=$2
shift 2
TAG_ARGS=()
if [ $# -ge 1 ] && [[ $1 != -* ]]; then     # an optional tag before the extra arguments
    TAG_ARGS=(--tag "$1")
    shift
fi

set_amp_args
exec "$HERE/tools/launch.sh" "$NUM_GPUS" --cfg "$CFG" "${AMP_ARGS[@]}" "${TAG_ARGS[@]}" "$@"
