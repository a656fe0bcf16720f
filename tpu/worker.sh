#!/usr/bin/env bash
# Runs ON one TPU worker; launch.sh, stop.sh and logs.sh call it on every worker over ssh.
#
# Usage: bash ~/zoo/tpu/worker.sh start CONFIG WORKDIR [zoo pretrain args ...]
#        bash ~/zoo/tpu/worker.sh stop [TIMEOUT_SECONDS=600]    (0: signal, do not wait)
#        bash ~/zoo/tpu/worker.sh status
#
# start: exports the jax.distributed settings (below), then runs `zoo pretrain` in the
#   background with nohup, appending to ~/$LOG_DIR/worker-N.log (N: the worker number); the
#   pid goes to ~/$LOG_DIR/pretrain.pid. Refuses to start a second run.
# stop: SIGTERM. zoo then checkpoints at the next step boundary (all processes agree on the
#   step, so one signalled worker is enough) and exits 0. Waits for the exit; FORCE=1 sends
#   SIGKILL after the timeout (the run then resumes from its last complete checkpoint).
#
# jax.distributed on a TPU VM: a multi-host slice needs one process per worker joined by
# jax.distributed. zoo's CLI initialises it from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
# and JAX_PROCESS_ID (or --coordinator-address, --num-processes, --process-id); here they are
# read from the TPU VM's metadata exactly as JAX's own TPU detection does (coordinator: the
# first worker's address, port 8476; process id: agent-worker-number). Values already set in
# the environment win; a single-host slice runs as one process.
set -euo pipefail

LOG_DIR="$HOME/${LOG_DIR:-zoo-logs}"
CODE="$HOME/${REMOTE_DIR:-zoo}"
ZOO="$HOME/${VENV:-zoo-venv}/bin/zoo"
PID_FILE="$LOG_DIR/pretrain.pid"
# The TPU VM's own metadata server (tests point METADATA_URL at a fake one).
METADATA_URL="${METADATA_URL:-http://metadata.google.internal/computeMetadata/v1}"

metadata() {
  curl -sf --connect-timeout 2 --max-time 5 -H 'Metadata-Flavor: Google' \
    "$METADATA_URL/instance/attributes/$1"
}

# alive PID: a live process (a zombie that no parent has reaped yet does not count).
alive() {
  local state
  state="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
  state="${state// /}"
  [ -n "$state" ] && [ "${state#Z}" = "$state" ]
}

# running_pid: prints the pid of this worker's zoo run, fails if there is none.
running_pid() {
  local pid
  [ -f "$PID_FILE" ] && pid="$(cat "$PID_FILE")" && [ -n "$pid" ] && alive "$pid" \
    && echo "$pid"
}

distributed_env() {
  if [ -n "${JAX_COORDINATOR_ADDRESS:-}${JAX_NUM_PROCESSES:-}${JAX_PROCESS_ID:-}" ]; then
    return 0                                       # given by the caller
  fi
  local endpoints worker hosts
  endpoints="$(metadata worker-network-endpoints)" || return 0   # not a TPU VM
  worker="$(metadata agent-worker-number)" || return 0
  IFS=, read -r -a hosts <<< "$endpoints"          # "unknown:unknown:10.0.0.2,..."
  if [ "${#hosts[@]}" -le 1 ]; then return 0; fi   # single-host slice: one process
  export JAX_COORDINATOR_ADDRESS="${hosts[0]##*:}:${COORDINATOR_PORT:-8476}"
  export JAX_NUM_PROCESSES="${#hosts[@]}"
  export JAX_PROCESS_ID="$worker"
}

start() {
  if [ "$#" -lt 2 ]; then echo "usage: worker.sh start CONFIG WORKDIR [args ...]" >&2; exit 2; fi
  local config="$1" workdir="$2" pid worker log
  shift 2
  mkdir -p "$LOG_DIR"
  if pid="$(running_pid)"; then
    echo "$(hostname): zoo is already running (pid $pid); tpu/stop.sh first" >&2
    exit 1
  fi
  distributed_env
  worker="${JAX_PROCESS_ID:-0}"
  log="$LOG_DIR/worker-$worker.log"
  cd "$CODE"
  local who="worker $worker of ${JAX_NUM_PROCESSES:-1}"
  who+=" (coordinator ${JAX_COORDINATOR_ADDRESS:-none})"
  echo "==== $(date -u +%FT%TZ) $(hostname): $who: zoo pretrain --config $config" \
       "--workdir $workdir $*" >> "$log"
  PYTHONUNBUFFERED=1 nohup "$ZOO" pretrain --config "$config" --workdir "$workdir" "$@" \
    >> "$log" 2>&1 < /dev/null &
  echo "$!" > "$PID_FILE"
  echo "$(hostname): worker $worker started zoo (pid $!), log $log"
}

stop() {
  local timeout="${1:-600}" pid i
  if ! pid="$(running_pid)"; then
    rm -f "$PID_FILE"
    echo "$(hostname): no zoo run"
    return 0
  fi
  kill -TERM "$pid"
  echo "$(hostname): sent SIGTERM to zoo (pid $pid): it checkpoints at the next step and exits"
  if [ "$timeout" = 0 ]; then return 0; fi
  for ((i = 0; i < timeout; i++)); do
    alive "$pid" || break
    sleep 1
  done
  if alive "$pid"; then
    if [ "${FORCE:-0}" != 1 ]; then
      echo "$(hostname): zoo (pid $pid) still runs after ${timeout}s; FORCE=1 kills it" >&2
      exit 1
    fi
    kill -KILL "$pid"
    echo "$(hostname): killed zoo (pid $pid); it resumes from its last complete checkpoint"
  else
    echo "$(hostname): zoo exited"
  fi
  rm -f "$PID_FILE"
}

status() {
  local pid last
  last="$(tail -q -n 1 "$LOG_DIR"/worker-*.log 2>/dev/null | tr '\r' '\n' \
    | sed '/^[[:space:]]*$/d' | tail -n 1)" || true
  if pid="$(running_pid)"; then
    echo "$(hostname): running (pid $pid): ${last:-no log yet}"
  else
    echo "$(hostname): not running; last log line: ${last:-none}"
  fi
}

command="${1:-}"
shift || true
case "$command" in
  start) start "$@" ;;
  stop) stop "$@" ;;
  status) status ;;
  *) echo "usage: worker.sh start CONFIG WORKDIR [args ...] | stop [TIMEOUT] | status" >&2
     exit 2 ;;
esac
