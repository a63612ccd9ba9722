#!/usr/bin/env bash
# Train on a SLURM cluster: one task per GPU over as many nodes as NUM_GPUS needs.
#
#   ./train_slurm.sh CONFIG NUM_GPUS JOB_NAME [extra main.py args...]
#   DAT_DATA_PATH=/data/imagenet PARTITION=a100 ./train_slurm.sh configs/dat_base.yaml 16 dat_base
#
# JOB_NAME is also the output tag: output/<MODEL.NAME>/<JOB_NAME>. Running the same command
# again (or requeueing the job) resumes from the newest checkpoint there.
# Environment: PARTITION (default gpu), GPUS_PER_NODE (default min(NUM_GPUS, 8)),
# CPUS_PER_TASK (default 8), SRUN_ARGS (more srun options, e.g. "--time 48:00:00").
# SLURM sends SIGUSR1 two minutes before the time limit: every task finishes its step, a
# checkpoint is saved and the job exits cleanly, ready to be requeued.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/tools/launcher_helpers.sh"
[ $# -ge 3 ] || usage

CFG=$1
NUM_GPUS=$2
JOB_NAME=$3
shift 3

PARTITION=${PARTITION:-gpu}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(( NUM_GPUS < 8 ? NUM_GPUS : 8 ))}
CPUS_PER_TASK=${CPUS_PER_TASK:-8}
SRUN_ARGS=${SRUN_ARGS:-}

# shellcheck disable=SC2086  # SRUN_ARGS is a list of options
exec srun -p "$PARTITION" \
    --job-name "$JOB_NAME" \
    --gres "gpu:$GPUS_PER_NODE" \
    --ntasks "$NUM_GPUS" \
    --ntasks-per-node "$GPUS_PER_NODE" \
    --cpus-per-task "$CPUS_PER_TASK" \
    --kill-on-bad-exit=1 \
    --signal USR1@120 \
    ${SRUN_ARGS} \
    python -u "$HERE/slurm_main.py" --cfg "$CFG" --tag "$JOB_NAME" --amp "$@"
