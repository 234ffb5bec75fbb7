#!/usr/bin/env bash
# Runs one mlx-med command on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- mlx-med train \
#       --config configs/ehr/pretrain.py:base --workdir gs://bucket/runs/ehr_base \
#       --config.data.meds_root=/mnt/meds --config.mesh.shape.fsdp=-1 --config.mesh.shape.data=1
#
# The same command runs on all workers (`--worker=all`); `--distributed` makes the
# program call jax.distributed.initialize(), which finds the coordinator itself on
# TPU VMs. The repo is synced to each worker and installed into a venv there first.
set -euo pipefail

if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE [PROJECT] -- COMMAND..." >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 2
PROJECT_FLAG=()
if [ "${1:-}" != "--" ]; then PROJECT_FLAG=(--project "$1"); shift; fi
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "$0: no command given after --" >&2; exit 2; }

REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)
REMOTE_DIR=${REMOTE_DIR:-mlx_med}
GCLOUD=(gcloud compute tpus tpu-vm)

# 1. Copy the working tree to every worker (no venv, no runs).
tar -C "$REPO_DIR" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/mlx_med_src.tgz .
"${GCLOUD[@]}" scp /tmp/mlx_med_src.tgz "$TPU_NAME":/tmp/ --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all
# 2. Install (idempotent) and run the same command everywhere.
CMD=$(printf '%q ' "$@")
"${GCLOUD[@]}" ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command "
  set -e
  mkdir -p ~/$REMOTE_DIR && tar -C ~/$REMOTE_DIR -xzf /tmp/mlx_med_src.tgz
  cd ~/$REMOTE_DIR
  [ -d .venv ] || python3 -m venv .venv
  .venv/bin/pip install -q -e . 'jax[tpu]'
  export PATH=\$PWD/.venv/bin:\$PATH
  $CMD --distributed
"
