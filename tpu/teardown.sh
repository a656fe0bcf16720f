#!/usr/bin/env bash
# Deletes the TPU VM slice. Billing stops only here: a stopped run still costs every chip-hour.
# The workdir (gs://...) is kept; the workers' disks, with the logs in ~/zoo-logs, are not
# (copy them first: FETCH=DIR tpu/logs.sh).
#
# Usage: [TPU_NAME=zoo-pod] [ZONE=us-central2-b] [PROJECT=...] [YES=1] tpu/teardown.sh
#
# YES=1 skips gcloud's confirmation prompt.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

flags=()
if [ "${YES:-0}" = 1 ]; then flags+=(--quiet); fi
tpu_vm delete "$TPU_NAME" ${flags[@]+"${flags[@]}"}
