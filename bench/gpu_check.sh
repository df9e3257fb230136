#!/usr/bin/env bash
# The one prepared GPU script (device tool): trainer-vs-bare-loop and data headroom for the tiny config and the
# ~125M config at 4K, eager and compiled.  Results are appended to bench/RESULTS.md (copied to $OUT when set).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then  # the GPU image lacks omegaconf/datasets: install carried wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1
nvidia-smi -L || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
status=0
python3 bench/bench_trainer.py --config configs/tiny.yaml --steps 60 --warmup 10 || status=1
python3 bench/bench_trainer.py --config configs/gpu_125m.yaml --steps 20 --warmup 5 || status=1
python3 bench/bench_trainer.py --config configs/gpu_125m.yaml --steps 20 --warmup 5 train.compile=true || status=1
[ -n "${OUT:-}" ] && cp bench/RESULTS.md "$OUT/RESULTS.md"
exit $status
