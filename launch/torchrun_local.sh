#!/usr/bin/env bash
# Single node, N processes (CPU with gloo, or one GPU each with NCCL).
#   launch/torchrun_local.sh 4 parallel.tp=2 parallel.pp=2
# Every argument after the process count is a Hydra override.
set -euo pipefail
NPROC=${1:?usage: $0 NPROC [hydra overrides...]}
shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export WANDB_MODE=${WANDB_MODE:-offline}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m nanomt.train "$@"
