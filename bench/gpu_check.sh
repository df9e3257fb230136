#!/usr/bin/env bash
# The prepared GPU script (device tool).  Sections, default "kernels":
#   kernels  (issue 4) the Triton kernels' correctness suite on CUDA (bf16 and fp32 vs the fp64 oracles), then
#            bench/bench_kernels.py: fwd+bwd vs SDPA flash at B*T=64K, H=16, D=128, T in 4K/16K/64K
#   engines  (issue 7) torch DDP/FSDP2 vs DeepSpeed ZeRO-1/2/3 step time for hybrid_1b at 4K
#   trainer  (issue 2) trainer overhead and data headroom, tiny and ~125M
#   generation (issue 8) eval and cached-generation tokens/s per layer type, 1B-shaped models, 4K and 32K prompts
# Tables are appended to bench/RESULTS.md (copied to $OUT when set).  `kernels` is sized for < 8 minutes.
# The GPU image lacks omegaconf/datasets/deepspeed: carry wheels in .whl/ (pip download ... -d .whl on this side).
set -uo pipefail
# Autotune among each kernel's lean configs only (kernels/triton_support.py): time goes to measuring, not compiling.
export HYLO_AUTOTUNE=${HYLO_AUTOTUNE:-lean}
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1
nvidia-smi -L || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
status=0
for section in "${@:-kernels}"; do
  case "$section" in
    kernels)
      timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_triton_attention.py tests/test_triton_linear.py \
        tests/test_triton_rat.py || status=1
      timeout 240 python3 bench/bench_kernels.py || status=1 ;;
    engines)
      timeout 420 python3 bench/bench_engines.py --config configs/hybrid_1b.yaml --nproc 1 --steps 6 --warmup 3 \
        train.seq_len=4096 train.batch_size=1 || status=1 ;;
    trainer)
      python3 bench/bench_trainer.py --config configs/tiny.yaml --steps 60 --warmup 10 || status=1
      python3 bench/bench_trainer.py --config configs/gpu_125m.yaml --steps 20 --warmup 5 || status=1
      python3 bench/bench_trainer.py --config configs/gpu_125m.yaml --steps 20 --warmup 5 train.compile=true || status=1 ;;
    generation)
      timeout 420 python3 bench/bench_eval.py --device cuda --d-model 2048 --n-layers 24 --heads 16 \
        --prompts 4096 32768 || status=1 ;;
    *) echo "gpu_check.sh: unknown section '$section' (kernels, engines, trainer, generation)" >&2; status=2 ;;
  esac
done
[ -n "${OUT:-}" ] && cp bench/RESULTS.md "$OUT/RESULTS.md"
exit $status
