"""Recall vs layer type on MQAR (the Zoology/BASED comparison, CPU-sized): the same 2-layer model (a short
convolution, then the mixer under test) trained on the same MQAR stream, accuracy on held-out sequences.

  python bench/bench_recall.py [--pairs 8] [--seq-len 64] [--steps 400] [--mixers full,rat,based,tnl,swa]

Each mixer trains in its own `hylo.trainer.train` process (configs/mqar_tiny.yaml with the overrides); prints a table
(accuracy, training tokens/s) and appends it to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.record import machine, publish  # noqa: E402


def run(mixer: str, args) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [f"run.dir={run_dir}", f"model.pattern=[baseconv,{mixer}]", f"data.mqar.pairs={args.pairs}",
                     f"train.seq_len={args.seq_len}", f"train.steps={args.steps}", f"eval.interval={args.steps}",
                     "checkpoint.interval=0", f"model.window={args.window}", "eval.mqar_samples=512",
                     f"model.rat.chunk_size={args.chunk}"]
        res = subprocess.run([sys.executable, "-m", "hylo.trainer.train", "--config", "configs/mqar_tiny.yaml",
                              *overrides], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        if res.returncode:
            return {"error": res.stderr.strip().splitlines()[-1][:100]}
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    speed = [r["train/tokens_per_sec"] for r in rows if "train/tokens_per_sec" in r][1:]
    return {"accuracy": [r["eval/mqar_accuracy"] for r in rows if "eval/mqar_accuracy" in r][-1],
            "tokens_per_sec": sum(speed) / len(speed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--window", type=int, default=16, help="swa layers' window (shorter than the context)")
    parser.add_argument("--chunk", type=int, default=8, help="rat layers' chunk size")
    parser.add_argument("--mixers", default="full,rat,based,tnl,swa")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    lines = [f"### MQAR recall by layer type — {args.pairs} pairs in {args.seq_len} tokens, {args.steps} steps, "
             f"[baseconv, X] d=128", machine(), "",
             "| mixer X | accuracy | train tokens/s |", "|---|---|---|"]
    for mixer in args.mixers.split(","):
        r = run(mixer, args)
        lines.append(f"| {mixer} | failed: {r['error']} | |" if "error" in r else
                     f"| {mixer} | {r['accuracy']:.3f} | {r['tokens_per_sec']:,.0f} |")
        print(lines[-1], flush=True)
    publish("\n".join(lines) + "\n", record=args.record)


if __name__ == "__main__":
    main()
