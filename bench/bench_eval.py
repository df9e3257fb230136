"""Evaluation and generation throughput on the CPU, per layer type.

  python bench/bench_eval.py [--record]
  python bench/bench_eval.py --device cuda --d-model 2048 --n-layers 24 --heads 16 --prompts 4096 32768  (GPU)

Models: --n-layers layers at --d-model of one layer type each (random weights: throughput does not depend on
them; default 4 x 256).
  eval tok/s     `perplexity` over 4 x 4 sequences of 512 tokens (forward only)
  gen tok/s @P   greedy decoding of --new-tokens tokens through the recurrent caches after a P-token prompt
                 (the prompt itself goes through `prefill`, one parallel pass)
Prints a table (`--record` appends it to bench/RESULTS.md).
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
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--prompts", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    import torch

    from hylo.models.lm import HybridLM
    from hylo.trainer.config import ModelConfig
    from hylo.trainer.evaluation.evaluate import perplexity

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = [f"### bench_eval: evaluation and generation throughput per layer type ({args.n_layers} layers, "
            f"d {args.d_model}, {device.type}, {dtype})",
            machine(),
            "", "| layer type | eval tok/s (T=512) | " + " | ".join(f"gen tok/s @{p}" for p in args.prompts) + " |",
            "|---|---:|" + "---:|" * len(args.prompts)]
    for name, pattern in TYPES.items():
        cfg = ModelConfig(vocab_size=4096, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.heads,
                          pattern=pattern, window=256)
        model = HybridLM(cfg).to(device, dtype).eval()
        batches = [torch.randint(0, 4096, (4, 513), device=device) for _ in range(4)]
        perplexity(model, batches[:1], 64)  # warm-up
        sync()
        start = time.perf_counter()
        perplexity(model, batches, 64)
        sync()
        eval_rate = 4 * 4 * 512 / (time.perf_counter() - start)
        gen = []
        for p in args.prompts:
            prompt = torch.randint(0, 4096, (1, p), device=device)
            with torch.no_grad():
                logits, caches = model.prefill(prompt)
                token = logits.argmax(-1)
                sync()
                start = time.perf_counter()
                for pos in range(p, p + args.new_tokens):
                    logits, caches = model.step(token, pos, caches)
                    token = logits.argmax(-1)
                sync()
            gen.append(args.new_tokens / (time.perf_counter() - start))
        rows.append(f"| {name} | {eval_rate:,.0f} | " + " | ".join(f"{g:,.0f}" for g in gen) + " |")
        print(rows[-1], flush=True)
    table = "\n".join(rows + [""])
    publish(table, record=args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
