#!/usr/bin/env bash
# Starts `zoo pretrain` on every worker of the slice, in the background (nohup): one process
# per worker, which join into one jax.distributed run (see tpu/worker.sh). Each worker logs to
# its own ~/zoo-logs/worker-N.log (tpu/logs.sh). Returns once all have started.
#
# Usage: CONFIG=experiments/pod_mae_vitl16_imagenet.py:v4-32 WORKDIR=gs://BUCKET/RUN \
#        [DATA_DIR=gs://BUCKET/tensorflow_datasets] [REMOTE_ENV='K=V ...'] [TPU_NAME=...] \
#        [ZONE=...] [PROJECT=...] tpu/launch.sh [more zoo pretrain args, e.g. --set k=v]
#
# Resume after tpu/stop.sh or a preemption: run the same command again (same WORKDIR); zoo
# continues from the latest complete checkpoint there. DATA_DIR becomes $ZOO_DATA_DIR on the
# workers (the TFDS data dir when the config leaves data.data_dir unset). REMOTE_ENV: extra
# environment for zoo, e.g. REMOTE_ENV='JAX_COMPILATION_CACHE_DIR=gs://BUCKET/jax_cache'.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [ -z "${CONFIG:-}" ] || [ -z "${WORKDIR:-}" ]; then
  echo "usage: CONFIG=experiments/FILE.py[:ARG] WORKDIR=gs://BUCKET/RUN tpu/launch.sh" \
       "[zoo pretrain args ...]" >&2
  exit 2
fi
case "$WORKDIR" in
  gs://*) ;;
  *) echo "warning: WORKDIR=$WORKDIR is not gs://: every worker must see the same" \
          "directory (checkpoints are written by all of them)" >&2 ;;
esac

env_words=(LOG_DIR="$LOG_DIR" REMOTE_DIR="$REMOTE_DIR" VENV="$VENV")
if [ -n "${DATA_DIR:-}" ]; then env_words+=(ZOO_DATA_DIR="$DATA_DIR"); fi
if [ -n "${COORDINATOR_PORT:-}" ]; then env_words+=(COORDINATOR_PORT="$COORDINATOR_PORT"); fi

on_workers all "env $(quote "${env_words[@]}") ${REMOTE_ENV:-} \
bash \$HOME/$(quote "$REMOTE_DIR")/tpu/worker.sh start $(quote "$CONFIG" "$WORKDIR" "$@")"
echo "started on every worker of $TPU_NAME; follow with: tpu/logs.sh (WORKER=all: every one)" >&2
