#!/usr/bin/env bash
# Run main.py under torchrun on this node and end the way main.py ends: with its exit status and,
# when it failed, its one-line error as the last line printed. train.sh and evaluate.sh use it.
#
#   tools/launch.sh NPROC [main.py args...]
#
# Stopping: SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) sent to this script or to its process group (as
# schedulers and terminals do) reaches torchrun once, as SIGTERM (SIGINT for SIGINT); torchrun
# passes it to every rank, which finishes its step, saves it and exits 0 (130 for SIGINT).
# torchrun's own report goes to a file, printed only when no rank could say what happened.
# Environment: PORT (rendezvous port, default 29501), TORCHRUN (launcher, default torchrun, else
# python3 -m torch.distributed.run),
# SHUTDOWN_TIMEOUT (seconds torchrun waits for the ranks to save before killing them, default 120).
set -uo pipefail

NPROC=$1
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RESULTS=$(mktemp -d "${TMPDIR:-/tmp}/dat-launch.XXXXXX") || {
    echo "error: cannot create a temporary folder in ${TMPDIR:-/tmp} (set TMPDIR to a writable folder)" >&2
    exit 2
}
trap 'rm -rf "$RESULTS"' EXIT
export DAT_RESULT_DIR=$RESULTS TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-120}

if [ -z "${TORCHRUN:-}" ]; then
    if command -v torchrun >/dev/null 2>&1; then
        TORCHRUN=torchrun
    elif python3 -c 'import torch' >/dev/null 2>&1; then
        TORCHRUN="python3 -m torch.distributed.run"
    else
        echo "error: torchrun not found: activate the Python environment that has torch (e.g. . .venv/bin/activate)" >&2
        exit 2
    fi
fi

# torchrun gets a process group of its own, so that a signal sent to ours reaches it once (from
# the traps below) rather than twice, which would cut its graceful shutdown short.
set -m
# shellcheck disable=SC2086  # TORCHRUN may be a command with arguments
${TORCHRUN} --nproc_per_node "$NPROC" --master_port "${PORT:-29501}" \
    "$ROOT/main.py" "$@" 2> "$RESULTS/stderr" &
PID=$!
set +m
trap 'kill -TERM "$PID" 2>/dev/null' TERM USR1
trap 'kill -INT "$PID" 2>/dev/null' INT

status=0
while :; do
    wait "$PID"
    status=$?
    kill -0 "$PID" 2>/dev/null || break      # else a trapped signal interrupted the wait
done

# The ranks' own results: the first error, else an interruption, else success.
pick=
pick_code=
for rank in $(seq 0 $((NPROC - 1))); do
    file=$RESULTS/rank$rank
    [ -f "$file" ] || continue
    code=$(head -n 1 "$file")
    case "$code" in ''|*[!0-9]*) continue ;; esac     # an unfinished or unreadable report
    case "$code:$pick_code" in
        0:) pick=$file pick_code=0 ;;
        130:|130:0) pick=$file pick_code=130 ;;
        0:*|130:*) ;;
        *:|*:0|*:130) pick=$file pick_code=$code ;;
    esac
done
reported=$(find "$RESULTS" -name 'rank*' | wc -l)
if [ -n "$pick" ] && { [ "$pick_code" != 0 ] || [ "$reported" -eq "$NPROC" ]; }; then
    message=$(sed -n 2p "$pick")
    [ -n "$message" ] && echo "$message" >&2
    exit "$pick_code"
fi
# No rank could report (a crash, or torchrun failed to start them): torchrun's account is needed.
cat "$RESULTS/stderr" >&2
exit "$status"
