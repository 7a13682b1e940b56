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
# Ctrl-C / SIGTERM stop all processes; a training run saves a checkpoint of a
# step they all agree on first (also when only one process gets SIGTERM) and
# exits 130 / 143, which this script passes on rather than calling it a failure.
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
# Background jobs of a script ignore SIGINT, so Ctrl-C is forwarded as SIGTERM. A training run then
# saves a checkpoint at a step all processes agree on before it exits: wait for that.
on_signal() {
  stop_all
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
for ((i = 0; i < n; i++)); do
  JAXPOST_COORDINATOR="127.0.0.1:$port" JAXPOST_NUM_PROCESSES="$n" JAXPOST_PROCESS_ID="$i" \
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$per ${XLA_FLAGS:-}" \
    "$@" >"$logs/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$logs/process_0.log" --pid "${pids[0]}" &
status=0
failed=0
running=("${!pids[@]}")
while (( ${#running[@]} > 0 )); do
  still=()
  for i in "${running[@]}"; do
    if kill -0 "${pids[$i]}" 2>/dev/null; then
      still+=("$i")
      continue
    fi
    code=0
    wait "${pids[$i]}" || code=$?
    if (( code == 130 || code == 143 )); then
      # Stopped by a signal at a step every process agreed on, after saving it: the others stop there too.
      (( status != 0 )) || status=$code
    elif (( code != 0 )); then
      echo "process $i failed; see $logs/process_$i.log" >&2
      status=1
      failed=1
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  if (( failed )); then
    stop_all
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    break
  fi
  (( ${#running[@]} == 0 )) || sleep 1
done
exit $status
