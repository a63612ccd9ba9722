#!/usr/bin/env bash
# The batch script of `train_slurm.sh --batch` (it sets DAT_SLURM_TASK, the task's command line,
# and DAT_SLURM_SRUN_ARGS); not meant to be submitted by hand.
#
# SLURM's time-limit warning (--signal B:USR1@N) reaches this shell only: it is passed on to the
# srun step, which passes it to every task; they save and exit 0, and this script then requeues
# the job, which resumes from that checkpoint. SIGTERM (scancel, `scontrol requeue`, preemption)
# reaches the tasks from SLURM itself; this script only waits for them and requeues nothing.
set -uo pipefail

: "${DAT_SLURM_TASK:?run through train_slurm.sh --batch}"
echo "train_slurm.sh: job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}: $DAT_SLURM_TASK"

warned=0
stopped=0
STEP=
trap 'warned=1; [ -n "$STEP" ] && kill -USR1 "$STEP" 2>/dev/null' USR1
trap 'stopped=1' TERM INT
export DAT_SLURM_REQUEUE_ON_WARNING=1      # the tasks say so when they stop on the warning

eval "TASK=($DAT_SLURM_TASK)"                 # written with printf %q: words as they were
# shellcheck disable=SC2086  # DAT_SLURM_SRUN_ARGS is a list of options
srun --kill-on-bad-exit=1 ${DAT_SLURM_SRUN_ARGS:-} "${TASK[@]}" &
STEP=$!
[ "$warned" = 1 ] && kill -USR1 "$STEP" 2>/dev/null      # the warning came before the step started
while :; do
    wait "$STEP"
    status=$?
    kill -0 "$STEP" 2>/dev/null || break      # else a trapped signal interrupted the wait
done

if [ "$warned" = 1 ] && [ "$stopped" = 0 ] && [ "$status" = 0 ]; then
    echo "train_slurm.sh: the time limit is near and the tasks saved: requeueing job $SLURM_JOB_ID, which resumes from that checkpoint"
    scontrol requeue "$SLURM_JOB_ID" || status=$?
fi
exit "$status"
