#!/usr/bin/env bash
# Issue 9's prepared GPU script: 1B presets vs the dense model at 8K/32K/128K, eager and compiled; one table, appended
# to bench/RESULTS.md (copied to $OUT when set).  Sized for < 8 minutes: eager at all lengths, compiled at 32K.
set -uo pipefail
# Autotune among each kernel's lean configs only (kernels/triton_support.py): time goes to measuring, not compiling.
export HYLO_AUTOTUNE=${HYLO_AUTOTUNE:-lean}
cd "$(dirname "$0")/.."
if [ -d .whl ]; then  # the GPU image lacks omegaconf/datasets: install carried wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1
nvidia-smi -L || true
status=0
timeout 300 python3 bench/bench_e2e.py --compile off --lengths 8192,32768,131072 --time-limit 90 || status=1
timeout 150 python3 bench/bench_e2e.py --compile on --lengths 32768 --time-limit 120 || status=1
[ -n "${OUT:-}" ] && cp bench/RESULTS.md "$OUT/RESULTS.md"
exit $status
