#!/usr/bin/env bash
# TPU VM pod slices with gcloud: create, install jaxpost on every worker, run
# one command on all workers, stream logs, tear down.
#
#   export TPU_NAME=jaxpost-v5p-64 ZONE=us-east5-a ACCELERATOR=v5p-64 VERSION=v2-alpha-tpuv5
#   launch/tpu_pod.sh create
#   launch/tpu_pod.sh install              # copies this checkout, pip installs jaxpost[tpu]
#   launch/tpu_pod.sh run jaxpost train --gin_file=configs/experiments/sft_llama3_8b.gin
#   launch/tpu_pod.sh logs                 # tail worker 0's log
#   launch/tpu_pod.sh delete
#
# Every worker runs the same command; jaxpost.distributed.initialize() (with
# JAXPOST_DISTRIBUTED=auto) finds the other workers through the TPU metadata.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v5p-8}
VERSION=${VERSION:-v2-alpha-tpuv5}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"
}
case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
      --accelerator-type="$ACCELERATOR" --version="$VERSION" ${SPOT:+--spot} ;;
  install)
    here=$(cd "$(dirname "$0")/.." && pwd)
    tar -C "$here" --exclude=.git --exclude=runs --exclude=.venv -czf /tmp/jaxpost_src.tgz .
    gcloud compute tpus tpu-vm scp /tmp/jaxpost_src.tgz "$TPU_NAME":~/ --zone="$ZONE" $PROJECT_FLAG --worker=all
    ssh_all "mkdir -p ~/jaxpost && tar -xzf ~/jaxpost_src.tgz -C ~/jaxpost && pip install -q -e '~/jaxpost[tpu]'" ;;
  run)
    shift
    cmd=$(printf '%q ' "$@")
    ssh_all "cd ~/jaxpost && JAXPOST_DISTRIBUTED=auto nohup $cmd > ~/jaxpost_run.log 2>&1 & echo started on \$(hostname)" ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=0 --command="tail -f ~/jaxpost_run.log" ;;
  stop)
    ssh_all "pkill -f 'jaxpost train' || true" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --quiet ;;
  *)
    echo "usage: $0 create|install|run CMD...|logs|stop|delete" >&2; exit 2 ;;
esac
