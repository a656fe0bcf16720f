#!/usr/bin/env bash
# Stops the run on every worker with SIGTERM: zoo checkpoints at the next step boundary and
# exits 0, so stopping (like a preemption notice) loses no finished step. Resume: tpu/launch.sh
# again with the same WORKDIR. The slice keeps running (and billing): tpu/teardown.sh.
#
# Usage: [TPU_NAME=...] [ZONE=...] [PROJECT=...] [WORKER=all] [TIMEOUT=600] [FORCE=1] tpu/stop.sh
#
# Waits up to TIMEOUT seconds per worker for zoo to exit (0: signal only). FORCE=1 then sends
# SIGKILL to what still runs; the run resumes from its last complete checkpoint.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

on_workers "${WORKER:-all}" "env $(quote LOG_DIR="$LOG_DIR" FORCE="${FORCE:-0}") \
bash \$HOME/$(quote "$REMOTE_DIR")/tpu/worker.sh stop $(quote "${TIMEOUT:-600}")"
