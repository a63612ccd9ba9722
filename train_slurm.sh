#!/usr/bin/env bash
# Train on a SLURM cluster: one task per GPU (or per CPU worker) over as many nodes as needed.
#
#   ./train_slurm.sh [--batch] CONFIG NUM_TASKS JOB_NAME [extra main.py args...]
#   DAT_DATA_PATH=/data/imagenet PARTITION=a100 ./train_slurm.sh configs/dat_base.yaml 16 dat_base
#   DAT_DATA_PATH=/data/imagenet TIME=48:00:00 ./train_slurm.sh --batch configs/dat_base.yaml 16 dat_base
#
# Without --batch, srun makes the allocation and runs in this terminal (an interactive job; run
# the same command again to resume). With --batch the job is submitted with sbatch and this
# script returns: the job is requeueable, its log is appended to across requeues, and at the
# time-limit warning the tasks save and the job requeues itself and resumes; `scontrol requeue
# JOBID` resumes too. JOB_NAME is also the output tag: output/<MODEL.NAME>/<JOB_NAME>; running
# the same command again resumes from the newest checkpoint there.
#
# Environment (all optional):
#   PARTITION      partition (default: the cluster's default partition)
#   GPUS_PER_NODE  GPUs per node, one task each (default min(NUM_TASKS, 8)); 0 for CPU nodes:
#                  no GPUs are requested and TASKS_PER_NODE (default: SLURM's choice) places the tasks
#   CPUS_PER_TASK  CPU cores per task (default 8 with GPUs, 1 without)
#   TIME           time limit, e.g. 48:00:00 (default: the partition's)
#   WARN_SECONDS   the time-limit warning (SIGUSR1) comes this long before the limit (default 120)
#   AMP            1 / 0: mixed precision on / off (default: on when GPUs are requested)
#   PYTHON         interpreter on the nodes (default: python, else python3)
#   LOG            --batch log file (default slurm-JOB_NAME-%j.out in this folder)
#   SRUN_ARGS / SBATCH_ARGS  more srun / sbatch options, e.g. "--account foo --qos high"
# Every task that receives SIGTERM or SIGUSR1 finishes its step, all ranks save it within a few
# seconds, and the tasks exit 0. A lost task (killed, out of memory, node down) ends the job
# with exit status 5 and one line naming it.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/tools/launcher_helpers.sh"
BATCH=0
if [ "${1:-}" = --batch ]; then
    BATCH=1
    shift
fi
[ $# -ge 3 ] || usage

CFG=$1
NUM_TASKS=$2
JOB_NAME=$3
shift 3
case $NUM_TASKS in ''|*[!0-9]*|0) echo "error: NUM_TASKS must be a positive integer, not '$NUM_TASKS'" >&2; exit 2 ;; esac

GPUS_PER_NODE=${GPUS_PER_NODE:-$(( NUM_TASKS < 8 ? NUM_TASKS : 8 ))}
case $GPUS_PER_NODE in ''|*[!0-9]*) echo "error: GPUS_PER_NODE must be a number (0 for CPU nodes), not '$GPUS_PER_NODE'" >&2; exit 2 ;; esac
WARN_SECONDS=${WARN_SECONDS:-120}
PYTHON=${PYTHON:-$(command -v python || command -v python3 || echo python3)}

# Options of both modes: the tasks, their resources and the job's name and limits.
OPTS=(--job-name "$JOB_NAME" --ntasks "$NUM_TASKS")
[ -n "${PARTITION:-}" ] && OPTS+=(--partition "$PARTITION")
[ -n "${TIME:-}" ] && OPTS+=(--time "$TIME")
if [ "$GPUS_PER_NODE" -gt 0 ]; then
    OPTS+=(--gres "gpu:$GPUS_PER_NODE" --ntasks-per-node "$GPUS_PER_NODE" --cpus-per-task "${CPUS_PER_TASK:-8}")
    AMP=${AMP:-1}
else
    [ -n "${TASKS_PER_NODE:-}" ] && OPTS+=(--ntasks-per-node "$TASKS_PER_NODE")
    OPTS+=(--cpus-per-task "${CPUS_PER_TASK:-1}")
    AMP=${AMP:-0}
fi
AMP_ARGS=()
[ "$AMP" = 1 ] && AMP_ARGS=(--amp)
TASK=("$PYTHON" -u "$HERE/slurm_main.py" --cfg "$CFG" --tag "$JOB_NAME" "${AMP_ARGS[@]}" "$@")

if [ "$BATCH" = 0 ]; then
    # shellcheck disable=SC2086  # SRUN_ARGS is a list of options
    exec srun "${OPTS[@]}" --kill-on-bad-exit=1 --signal "USR1@$WARN_SECONDS" ${SRUN_ARGS:-} "${TASK[@]}"
fi

# The batch script (tools/slurm_batch.sh) runs the tasks in one srun step and passes the warning
# on to them; it learns the command from the environment, which sbatch exports.
export DAT_SLURM_SRUN_ARGS=${SRUN_ARGS:-}
DAT_SLURM_TASK=$(printf '%q ' "${TASK[@]}")
export DAT_SLURM_TASK
# shellcheck disable=SC2086  # SBATCH_ARGS is a list of options
exec sbatch "${OPTS[@]}" --requeue --open-mode=append --output "${LOG:-slurm-$JOB_NAME-%j.out}" \
    --signal "B:USR1@$WARN_SECONDS" ${SBATCH_ARGS:-} "$HERE/tools/slurm_batch.sh"
