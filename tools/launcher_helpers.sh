# Sourced by train.sh, evaluate.sh and train_slurm.sh: what the launchers share.

# Print the calling script's header comment (its usage) and exit 2.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2; }

# AMP_ARGS=(--amp) when GPUs are visible, else empty.
set_amp_args() {
    AMP_ARGS=()
    if [ "${CUDA_VISIBLE_DEVICES-unset}" != "" ] && nvidia-smi -L >/dev/null 2>&1; then
        AMP_ARGS=(--amp)
    fi
}
