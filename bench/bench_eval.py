"""Evaluation and generation throughput on the CPU, per layer type.

  python bench/bench_eval.py [--no-record]

Models: 4 layers at d 256 of one layer type each (random weights: throughput does not depend on them).
  eval tok/s     `perplexity` over 4 x 4 sequences of 512 tokens (forward only)
  gen tok/s @P   greedy decoding of 32 tokens through the recurrent caches after a P-token prompt
Prints a table and appends it to bench/RESULTS.md.  (The GPU comparison at 4K/32K context is issue 8's GPU part.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.record import machine, publish  # noqa: E402

TYPES = {"full (softmax)": ["full"], "swa (W=256)": ["swa"], "rat (L=16)": ["rat"], "based": ["based"],
         "tnl": ["tnl"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--prompts", type=int, nargs="+", default=[256, 2048])
    args = parser.parse_args()
    import torch

    from models import HybridLM
    from trainer.config import ModelConfig
    from trainer.evaluate import perplexity

    torch.manual_seed(0)
    rows = ["### bench_eval: evaluation and generation throughput per layer type (4 layers, d 256, CPU)",
            machine(),
            "", "| layer type | eval tok/s (T=512) | " + " | ".join(f"gen tok/s @{p}" for p in args.prompts) + " |",
            "|---|---:|" + "---:|" * len(args.prompts)]
    for name, pattern in TYPES.items():
        cfg = ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, pattern=pattern, window=256)
        model = HybridLM(cfg).eval()
        batches = [torch.randint(0, 4096, (4, 513)) for _ in range(4)]
        perplexity(model, batches[:1], 64)  # warm-up
        start = time.perf_counter()
        perplexity(model, batches, 64)
        eval_rate = 4 * 4 * 512 / (time.perf_counter() - start)
        gen = []
        for p in args.prompts:
            prompt = torch.randint(0, 4096, (1, p))
            with torch.no_grad():
                caches = None
                for pos in range(p):
                    _, caches = model.step(prompt[:, pos], pos, caches)
                token = prompt[:, -1]
                start = time.perf_counter()
                for pos in range(p, p + 32):
                    logits, caches = model.step(token, pos, caches)
                    token = logits.argmax(-1)
            gen.append(32 / (time.perf_counter() - start))
        rows.append(f"| {name} | {eval_rate:,.0f} | " + " | ".join(f"{g:,.0f}" for g in gen) + " |")
        print(rows[-1], flush=True)
    table = "\n".join(rows + [""])
    publish(table, record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
