#!/usr/bin/env bash
# Run one jaxpost command as N processes on this machine, the way a pod runs
# it on N hosts: each process gets its own CPU devices and they talk through
# jax.distributed (gloo collectives on CPU).
#
#   launch/local.sh 2 jaxpost train --gin_file=configs/experiments/local_multihost_sft.gin ...
#
# Env: DEVICES_PER_PROCESS (default 4), PORT (default 12355; must be free),
# LOG_DIR (default ./runs/local_logs). Logs of process i go to
# $LOG_DIR/process_i.log; the script streams process 0's. When one process
# fails the others are stopped (they would otherwise wait for it in their next
# collective), the failing one is named, and the exit status is non-zero.
# Ctrl-C / SIGTERM stop all processes.
set -euo pipefail
n=${1:?usage: launch/local.sh NUM_PROCESSES COMMAND...}; shift
(( $# > 0 )) || { echo "usage: launch/local.sh NUM_PROCESSES COMMAND..." >&2; exit 2; }
port=${PORT:-12355}
per=${DEVICES_PER_PROCESS:-4}
logs=${LOG_DIR:-runs/local_logs}
mkdir -p "$logs"
pids=()
stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
}
# Background jobs of a script ignore SIGINT, so Ctrl-C is forwarded as SIGTERM.
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < n; i++)); do
  JAXPOST_COORDINATOR="127.0.0.1:$port" JAXPOST_NUM_PROCESSES="$n" JAXPOST_PROCESS_ID="$i" \
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$per ${XLA_FLAGS:-}" \
    "$@" >"$logs/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$logs/process_0.log" --pid "${pids[0]}" &
status=0
running=("${!pids[@]}")
while (( ${#running[@]} > 0 )); do
  still=()
  for i in "${running[@]}"; do
    if kill -0 "${pids[$i]}" 2>/dev/null; then
      still+=("$i")
    elif ! wait "${pids[$i]}"; then
      echo "process $i failed; see $logs/process_$i.log" >&2
      status=1
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  if (( status != 0 )); then
    stop_all
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    break
  fi
  (( ${#running[@]} == 0 )) || sleep 1
done
exit $status
