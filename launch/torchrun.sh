#!/usr/bin/env bash
# Launch hylo with torchrun on this node.  Single node:   launch/torchrun.sh --config configs/X.yaml [key=value ...]
# Multi-node: run the same line on every node with NNODES, MASTER_ADDR (the first node) and MASTER_PORT set.
#   NNODES=4 GPUS_PER_NODE=8 MASTER_ADDR=node001 launch/torchrun.sh --config configs/hybrid_1b.yaml
# On a CPU box GPUS_PER_NODE is the number of worker processes (gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")}
if [ "$NNODES" -eq 1 ]; then
  exec torchrun --standalone --nproc_per_node="$GPUS_PER_NODE" -m hylo.trainer.train "$@"
fi
: "${MASTER_ADDR:?set MASTER_ADDR to the first node's address for a multi-node run}"
exec torchrun --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" --rdzv_backend=c10d \
  --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id="${RUN_ID:-hylo}" -m hylo.trainer.train "$@"
