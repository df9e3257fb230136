#!/usr/bin/env bash
# Launch hylo with DeepSpeed's launcher and the DeepSpeed engine (ZeRO stage from deepspeed.zero_stage).
#   Single node:  launch/deepspeed.sh --config configs/hybrid_1b.yaml deepspeed.zero_stage=3
#   Multi-node:   HOSTFILE=launch/hostfile.example launch/deepspeed.sh --config configs/hybrid_1b.yaml
# The hostfile lists one '<hostname> slots=<gpus>' line per node; DeepSpeed reaches the nodes over passwordless
# ssh (pdsh) and the first host is the rendezvous address.  On a CPU box: DS_ACCELERATOR=cpu GPUS_PER_NODE=2.
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")}
python3 -c "import deepspeed" 2>/dev/null || { echo "launch/deepspeed.sh: DeepSpeed is not installed: pip install 'hylo[deepspeed]'" >&2; exit 2; }
if [ -n "${HOSTFILE:-}" ]; then
  NNODES=${NNODES:-$(grep -cvE '^\s*(#|$)' "$HOSTFILE")}
  exec python3 -m hylo.trainer.cli launch --engine deepspeed --hostfile "$HOSTFILE" --nodes "$NNODES" \
    --gpus-per-node "$GPUS_PER_NODE" --master-port "${MASTER_PORT:-29500}" -- "$@"
fi
exec python3 -m hylo.trainer.cli launch --engine deepspeed --gpus-per-node "$GPUS_PER_NODE" \
  --master-port "${MASTER_PORT:-29500}" -- "$@"
