#!/usr/bin/env bash
# Several nodes without SLURM: run this once on every node, each with its own node rank.
# torchrun's c10d rendezvous meets at MASTER_ADDR:MASTER_PORT (a TCP store on node 0).
#   node 0: launch/torchrun_multinode.sh --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 \
#               --nproc-per-node 8 model=gpt_1_3b parallel.tp=8 parallel.pp=2
#   node 1: launch/torchrun_multinode.sh --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 \
#               --nproc-per-node 8 model=gpt_1_3b parallel.tp=8 parallel.pp=2
# Each option can come from the environment instead: NNODES, NODE_RANK, MASTER_ADDR,
# MASTER_PORT (default 29500), NPROC_PER_NODE (default: the GPUs, or 1), RUN_ID (the
# rendezvous id, the same on every node). --dry-run prints the torchrun command and exits.
# Every other argument is a Hydra override; give every node the same hydra.run.dir on a shared
# file system (or let rank 0 choose outputs/<date>/<time> for all of them).
set -euo pipefail
DRY_RUN=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nnodes) NNODES=$2; shift 2 ;;
        --node-rank) NODE_RANK=$2; shift 2 ;;
        --master-addr) MASTER_ADDR=$2; shift 2 ;;
        --master-port) MASTER_PORT=$2; shift 2 ;;
        --nproc-per-node) NPROC_PER_NODE=$2; shift 2 ;;
        --run-id) RUN_ID=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        *) break ;;
    esac
done
: "${NNODES:?set --nnodes or NNODES}"
: "${NODE_RANK:?set --node-rank or NODE_RANK (0 .. NNODES-1)}"
: "${MASTER_ADDR:?set --master-addr or MASTER_ADDR (the address of node 0)}"
MASTER_PORT=${MASTER_PORT:-29500}
RUN_ID=${RUN_ID:-nanomt}
if [[ -z ${NPROC_PER_NODE:-} ]]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    [[ $NPROC_PER_NODE -gt 0 ]] || NPROC_PER_NODE=1
fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export WANDB_MODE=${WANDB_MODE:-offline}
CMD=("$PY" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK"
     --nproc_per_node="$NPROC_PER_NODE" --rdzv_backend=c10d
     --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RUN_ID"
     -m nanomt.train "$@")
if [[ $DRY_RUN == 1 ]]; then
    echo "${CMD[*]}"
    exit 0
fi
exec "${CMD[@]}"
