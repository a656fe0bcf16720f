# Settings shared by the tpu/ scripts (sourced by them, not run). Every setting is an
# environment variable with a default; export it once or put it before each command, e.g.
#   export TPU_NAME=zoo-pod ZONE=us-central2-b ACCELERATOR_TYPE=v4-32
#   tpu/create.sh && tpu/install.sh && CONFIG=... WORKDIR=gs://... tpu/launch.sh
# shellcheck shell=bash

TPU_NAME="${TPU_NAME:-zoo-pod}"
ZONE="${ZONE:-us-central2-b}"             # v4 lives in us-central2-b; v5e e.g. in us-west4-a
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
PROJECT="${PROJECT:-}"                    # empty: gcloud's configured project
REMOTE_DIR="${REMOTE_DIR:-zoo}"           # the checkout on every worker, under ~
VENV="${VENV:-zoo-venv}"                  # the Python environment on every worker, under ~
LOG_DIR="${LOG_DIR:-zoo-logs}"            # per-worker log and pid file, under ~

# install.sh replaces ~/$REMOTE_DIR: each of these must name a folder strictly under ~.
for dir in "$REMOTE_DIR" "$VENV" "$LOG_DIR"; do
  case "/$dir/" in
    //*|*/./*|*/../*) echo "REMOTE_DIR, VENV, LOG_DIR: $dir is not a folder under ~" >&2
                      exit 2 ;;
  esac
done

# The TPU VM image that matches each TPU generation (`gcloud compute tpus tpu-vm versions
# list --zone=$ZONE` lists them all).
default_runtime_version() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "tpu-ubuntu2204-base" ;;
  esac
}
RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}"

# gcloud reads the project from this variable (no empty --project flag, no bash 4 arrays:
# macOS still ships bash 3.2).
if [ -n "$PROJECT" ]; then export CLOUDSDK_CORE_PROJECT="$PROJECT"; fi

# tpu_vm SUBCOMMAND ARGS...: `gcloud compute tpus tpu-vm` in the zone.
tpu_vm() {
  local sub="$1"
  shift
  gcloud compute tpus tpu-vm "$sub" "$@" --zone="$ZONE"
}

# on_workers WORKER COMMAND: runs the shell string COMMAND on worker WORKER (0, 1, ... or
# all: every worker of the slice at once, which is how a multi-host JAX program starts).
on_workers() {
  tpu_vm ssh "$TPU_NAME" --worker="$1" --command="$2"
}

# quote ARGS...: ARGS as one string that a remote bash splits back into the same words.
quote() {
  local words=""
  if [ "$#" -gt 0 ]; then words="$(printf '%q ' "$@")"; fi
  printf '%s' "${words% }"
}
