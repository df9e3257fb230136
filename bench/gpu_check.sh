#!/usr/bin/env bash
# The prepared GPU script (device tool).  With no arguments it runs "smoke kernels masked e2e", sized to finish in
# under 8 minutes on an H100/H200 from a cold start (about 7 by the 2026-11-30 H200 lease; every step has its own
# timeout; each row reaches bench/RESULTS.md as soon as it is measured, so a timeout keeps what was done):
#   smoke    (~30 s) bench/gpu_smoke.py: every Triton kernel in bf16 on CUDA vs the chunk path, fwd+bwd
#   kernels  bench/bench_kernels.py: fwd+bwd of every op vs SDPA flash at 4K and 64K (B*T=64K, H=16, D=128, bf16;
#            RAT as the layer calls it)
#   e2e      bench/bench_e2e.py: dense_1b vs hybrid_1b tokens/s, MFU, peak memory at 32K and 128K (eager, bf16,
#            activation checkpointing)
# Other sections, by name:
#   masked   (issue 18) bench/bench_kernels.py --masked: each Triton op on one packed 64K sequence with documents of
#            mean 1K and 4K and as one document, vs unmasked
#   tests    the Triton kernels' correctness suite on CUDA (bf16 and fp32 vs the fp64 oracles)
#   engines  (issue 7) torch DDP/FSDP2 vs DeepSpeed ZeRO-1/2/3 step time for hybrid_1b at 4K
#   trainer  (issue 2) trainer overhead and data headroom, tiny and ~125M
#   generation (issue 8) eval and cached-generation tokens/s per layer type, 1B-shaped models, 4K and 32K prompts
#   backends (issue 26) hybrid_1b at 32K as auto picks its kernels vs RAT's softmax on torch's flash kernel
#            (model.rat.backend=flash) vs every attention layer on the Triton kernels (model.attn.backend=triton)
#   profile  (issue 27) bench/bench_profile.py: where hybrid_1b's step goes at 32K, per layer type and op class
#   loss     (issue 27) bench/bench_loss.py: head + cross-entropy, hylo's chunked loss vs full logits, torch's
#            linear_cross_entropy (torch >= 2.13), Liger and cut-cross-entropy (carry liger-kernel and
#            cut-cross-entropy as wheels), bf16, 16K tokens, d 2048, vocab 32K and 128K
#   compile  (issue 27) dense_1b and hybrid_1b at 32K, eager vs compiled blocks (monitors off, as auto compiles)
#   policies (issue 27) hybrid_1b at 32K and 128K with full vs selective checkpointing (what auto picks on an H200)
# Tables are appended to bench/RESULTS.md (copied to $OUT when set).
# The GPU image lacks omegaconf/datasets/deepspeed: carry wheels in .whl/ (pip download ... -d .whl on this side);
# fla-core and einops too, for the kernels section's flash-linear-attention rows, and liger-kernel and
# cut-cross-entropy for the loss section (pip download --no-deps fla-core einops liger-kernel cut-cross-entropy -d .whl).
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
[ $# -eq 0 ] && set -- smoke kernels masked e2e
# Keep $OUT's copy of the results current: after every section, and on the way out (a kill of the whole script).
save() { if [ -n "${OUT:-}" ]; then cp bench/RESULTS.md "$OUT/RESULTS.md"; fi; }
trap save EXIT
for section in "$@"; do
  case "$section" in
    smoke)
      timeout 90 python3 bench/gpu_smoke.py --record || status=1 ;;
    kernels)
      timeout 140 python3 bench/bench_kernels.py --record --lengths 4096,65536 || status=1 ;;
    masked)
      timeout 120 python3 bench/bench_kernels.py --record --masked --lengths 65536 || status=1 ;;
    e2e)
      # (2026-11-30, H200: a 128K step of either 1B model takes ~30-40 s with full checkpointing; 55 s per run
      # was too short for warm-up + 3 steps)
      timeout 300 python3 bench/bench_e2e.py --configs dense_1b,hybrid_1b --lengths 32768,131072 --compile off \
        --steps 2 --warmup 1 --time-limit 130 || status=1 ;;
    tests)
      timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_triton_attention.py tests/test_triton_linear.py \
        tests/test_triton_rat.py tests/test_triton_compile.py || status=1 ;;
    engines)
      timeout 420 python3 bench/bench_engines.py --record --config configs/hybrid_1b.yaml --nproc 1 --steps 6 --warmup 3 \
        train.seq_len=4096 train.batch_size=1 || status=1 ;;
    trainer)
      python3 bench/bench_trainer.py --record --config configs/tiny.yaml --steps 60 --warmup 10 || status=1
      python3 bench/bench_trainer.py --record --config configs/gpu_125m.yaml --steps 20 --warmup 5 || status=1
      python3 bench/bench_trainer.py --record --config configs/gpu_125m.yaml --steps 20 --warmup 5 train.compile=true || status=1 ;;
    backends)
      timeout 200 python3 bench/bench_e2e.py --configs dense_1b,hybrid_1b,hybrid_1b:model.rat.backend=flash,hybrid_1b:model.attn.backend=triton \
        --lengths 32768 --compile off --steps 2 --warmup 1 --time-limit 60 || status=1 ;;
    profile)
      timeout 240 python3 bench/bench_profile.py --record --config configs/hybrid_1b.yaml train.seq_len=32768 \
        train.batch_size=1 train.micro_batch_size=1 train.dtype=bf16 train.activation_checkpointing=full || status=1 ;;
    loss)
      timeout 180 python3 bench/bench_loss.py --record --dtype bf16 --tokens 16384 --d-model 2048 --vocab 32768,131072 \
        --repeats 5 || status=1 ;;
    compile)
      timeout 420 python3 bench/bench_e2e.py --configs dense_1b,hybrid_1b --lengths 32768 --compile off,on \
        --steps 2 --warmup 2 --time-limit 150 || status=1 ;;
    policies)
      timeout 480 python3 bench/bench_e2e.py --configs dense_1b,hybrid_1b,hybrid_1b:train.activation_checkpointing=selective \
        --lengths 32768,131072 --compile off --steps 2 --warmup 1 --time-limit 130 || status=1 ;;
    generation)
      timeout 420 python3 bench/bench_eval.py --record --device cuda --d-model 2048 --n-layers 24 --heads 16 \
        --prompts 4096 32768 || status=1 ;;
    *) echo "gpu_check.sh: unknown section '$section' (smoke, kernels, masked, e2e, tests, engines, trainer, backends, profile, loss, compile, policies, generation)" >&2
       status=2 ;;
  esac
  save
done
exit $status
