"""Long-context memory settings on a real training run: peak memory and tokens/s of a 2-step run for the chunked
loss, each checkpointing policy and the tiled MLP.

  python bench/bench_memory.py [--config configs/hybrid_tiny.yaml] [--seq-len 16384] [--vocab 32768] [--record]

Each setting runs `hylo.trainer.train` in its own process (batch of one sequence, 2 steps) and reads back what the run
logged: `train/mem_gb` (peak resident memory on a CPU, peak allocated on a GPU), tokens/s of step 2 (step 1 pays
for warm-up) and the first step's loss, which must be the same for every setting.  Targets (issue 17): the chunked
loss cuts the peak by at least half at equal loss and costs at most 5% tokens/s.  On a GPU a column gives
`hylo plan`'s prediction for each row (its model is of the fused GPU kernels, not of the CPU's PyTorch paths).
Prints a table (`--record` appends it to bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.record import machine, publish  # noqa: E402

SETTINGS = [  # (label, overrides)
    ("full logits (loss_chunk=0)", ["train.loss_chunk=0"]),
    ("chunked loss (4096)", []),
    ("chunked + selective AC", ["train.activation_checkpointing=selective"]),
    ("chunked + full AC", ["train.activation_checkpointing=full"]),
    ("full logits + full AC", ["train.loss_chunk=0", "train.activation_checkpointing=full"]),
    ("chunked + tiled MLP (2048)", ["model.mlp_tile=2048"]),
    ("chunked + full AC + tiled MLP", ["train.activation_checkpointing=full", "model.mlp_tile=2048"]),
]


def run(config: str, seq_len: int, vocab: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "hylo.trainer.train", "--config", config, f"run.dir={tmp}", "train.steps=2",
                "train.batch_size=1", f"train.seq_len={seq_len}", f"model.vocab_size={vocab}",
                "logging.interval=1", "logging.progress=false", "checkpoint.interval=0", "eval.interval=0",
                "schedule.warmup_steps=0", *overrides]
        res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(overrides)} failed:\n{res.stderr[-3000:]}")
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows if "train/loss" in r}
    return {"mem": max(r.get("train/mem_gb", 0.0) for r in by_step.values()),
            "tps": by_step[2]["train/tokens_per_sec"], "loss": by_step[1]["train/loss"]}


def planned_gib(config: str, seq_len: int, vocab: int, overrides: list[str]) -> float:
    from hylo.trainer.config import load_config
    from hylo.trainer.memory_plan import GiB, plan_memory

    cfg = load_config(config, ["train.batch_size=1", f"train.seq_len={seq_len}", f"model.vocab_size={vocab}",
                               *overrides])
    return plan_memory(cfg, 1, 1e9).total / GiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/hybrid_tiny.yaml")
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--only", type=int, nargs="+", help="run only these rows of SETTINGS (0 = full logits)")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    settings = [SETTINGS[i] for i in args.only] if args.only else SETTINGS

    import torch

    gpu = torch.cuda.is_available()
    results = []
    for label, overrides in settings:
        r = run(args.config, args.seq_len, args.vocab, overrides)
        if gpu:
            r["plan"] = planned_gib(args.config, args.seq_len, args.vocab, overrides)
        results.append((label, r))
        print(f"  {label}: {r}", flush=True)
    base = results[0][1]
    chunked = results[1][1]
    lines = [f"### Memory settings: 2-step runs of {args.config}, seq_len {args.seq_len}, vocab {args.vocab}, "
             f"batch 1 — {machine()}", "",
             "| setting | peak memory (GiB) | vs full logits | tokens/s | vs full logits | step-1 loss |"
             + (" hylo plan (GiB) |" if gpu else ""),
             "|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    for label, r in results:
        lines.append(f"| {label} | {r['mem']:.2f} | {r['mem'] / base['mem']:.2f}x | {r['tps']:,.0f} | "
                     f"{r['tps'] / base['tps']:.2f}x | {r['loss']:.6f} |" + (f" {r['plan']:.2f} |" if gpu else ""))
    by_label = dict(results)
    checkpointed = ""
    if "chunked + full AC" in by_label and "full logits + full AC" in by_label:
        ratio = by_label["chunked + full AC"]["mem"] / by_label["full logits + full AC"]["mem"]
        checkpointed = f", {ratio:.2f}x with full checkpointing"
    cut = chunked["mem"] / base["mem"]
    slower = 1 - chunked["tps"] / base["tps"]
    lines.append("")
    lines.append(f"Chunked loss: peak {cut:.2f}x of the full-logits run without checkpointing{checkpointed} (target "
                 f"<= 0.5x), tokens/s {abs(100 * slower):.1f}% {'slower' if slower > 0 else 'faster'} (target: at "
                 f"most 5% slower), loss difference "
                 f"{abs(chunked['loss'] - base['loss']):.2e}. Peak memory on a CPU is the process's peak resident "
                 "set, which includes the Python/torch baseline.")
    publish("\n".join(lines) + "\n", record=args.record)


if __name__ == "__main__":
    main()
