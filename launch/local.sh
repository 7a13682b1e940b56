#!/usr/bin/env bash
# Run one jaxpost command as N processes on this machine, the way a pod runs
# it on N hosts: each process gets its own CPU devices and they talk through
# jax.distributed (gloo collectives on CPU).
#
#   launch/local.sh 2 jaxpost train --gin_file=configs/experiments/demo/sft.gin
#
# Env: DEVICES_PER_PROCESS (default 4), PORT (default 12355), LOG_DIR (default
# ./runs/local_logs). Logs of process i go to $LOG_DIR/process_i.log; the
# script streams process 0 and fails if any process fails.
set -euo pipefail
n=${1:?usage: launch/local.sh NUM_PROCESSES COMMAND...}; shift
port=${PORT:-12355}
per=${DEVICES_PER_PROCESS:-4}
logs=${LOG_DIR:-runs/local_logs}
mkdir -p "$logs"
pids=()
for ((i = 0; i < n; i++)); do
  JAXPOST_COORDINATOR="127.0.0.1:$port" JAXPOST_NUM_PROCESSES="$n" JAXPOST_PROCESS_ID="$i" \
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$per ${XLA_FLAGS:-}" \
    "$@" >"$logs/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$logs/process_0.log" --pid "${pids[0]}" &
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $logs/process_$i.log" >&2
    status=1
  fi
done
exit $status
