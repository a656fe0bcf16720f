#!/usr/bin/env bash
# Shows the run's log: by default follows worker 0's (zoo's progress and metrics come from
# process 0; the others show their own errors). Ctrl-C stops following, not the run.
#
# Usage: [TPU_NAME=...] [ZONE=...] [PROJECT=...] [WORKER=0|1|...|all] [LINES=100] [FOLLOW=1]
#        [FETCH=DIR] tpu/logs.sh
#
# WORKER=all: every worker's status (running or not) and its last LINES lines, each prefixed
# with its host name (FOLLOW does not apply). FETCH=DIR: copies every worker's log into DIR
# (do this before tpu/teardown.sh, which deletes the workers' disks).
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

worker="${WORKER:-0}"
lines="$(quote "${LINES:-100}")"
logs="\$HOME/$(quote "$LOG_DIR")/worker-*.log"

if [ -n "${FETCH:-}" ]; then
  mkdir -p "$FETCH"
  tpu_vm scp --worker=all "$TPU_NAME:$LOG_DIR/worker-*.log" "$FETCH/"
  echo "copied the workers' logs into $FETCH" >&2
elif [ "$worker" = all ]; then
  # tqdm redraws its bar with carriage returns: one line per redraw here.
  on_workers all "env $(quote LOG_DIR="$LOG_DIR") \
bash \$HOME/$(quote "$REMOTE_DIR")/tpu/worker.sh status; cat $logs \
2>/dev/null | tr '\\r' '\\n' | sed '/^[[:space:]]*\$/d' | tail -n $lines \
| sed \"s/^/[\$(hostname)] /\""
elif [ "${FOLLOW:-1}" = 1 ]; then
  on_workers "$worker" "tail -n $lines -F $logs"
else
  on_workers "$worker" "tail -n $lines $logs"
fi
