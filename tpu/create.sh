#!/usr/bin/env bash
# Creates the TPU VM slice (all its workers).
#
# Usage: [TPU_NAME=zoo-pod] [ZONE=us-central2-b] [ACCELERATOR_TYPE=v4-32] [PROJECT=...]
#        [RUNTIME_VERSION=<by generation>] [SPOT=1 | PREEMPTIBLE=1] tpu/create.sh [gcloud flags]
#
# SPOT=1: a spot slice (much cheaper; can be preempted at any time, see tpu/README.md).
# PREEMPTIBLE=1: the older preemptible kind (also stopped after 24 h). Extra arguments go to
# `gcloud compute tpus tpu-vm create` as they are (e.g. --service-account=..., --network=...).
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

flags=()
if [ "${SPOT:-0}" = 1 ]; then flags+=(--spot); fi
if [ "${PREEMPTIBLE:-0}" = 1 ]; then flags+=(--preemptible); fi

echo "creating $TPU_NAME: $ACCELERATOR_TYPE, image $RUNTIME_VERSION, zone $ZONE" >&2
tpu_vm create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
  --version="$RUNTIME_VERSION" ${flags[@]+"${flags[@]}"} "$@"
