"""Checkpoint save/load time and how long a save stalls training, sync vs async (`dcp.async_save`).

  python bench/bench_checkpoint.py [--no-record]

For each model size: build the model and AdamW state as the trainer does (one process), then time
  sync save    the whole `Checkpointer.save` (write + finalise)
  async stall  how long `Checkpointer.save` blocks the caller (staging the state); the write continues behind
  async total  until the background write is finalised
  load         `load_checkpoint` into a fresh model and optimizer
Target (issue 6): the async stall is <= 20% of a synchronous save.  Prints a table, appends to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.record import machine, publish  # noqa: E402

SIZES = {"tiny (configs/tiny.yaml)": [], "~50M (d 640 x 8)": ["model.d_model=640", "model.n_layers=8"],
         "~125M (configs/gpu_125m.yaml)": ["--config", "configs/gpu_125m.yaml"]}


def build(overrides: list[str]):
    import torch

    from models import HybridLM
    from trainer.config import load_config
    from trainer.optim import build_optimizer

    config = None
    if overrides[:1] == ["--config"]:
        config, overrides = overrides[1], overrides[2:]
    cfg = load_config(config, overrides + ["model.vocab_size=4096"])
    model = HybridLM(cfg.model)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    for p in model.parameters():  # materialise Adam's moments as a trained run would have them
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return model, optimizer, cfg


def measure(overrides: list[str], reps: int = 3) -> dict:
    from trainer.checkpointing.dcp import DCPCheckpointer as Checkpointer
    from trainer.checkpointing.dcp import load_dcp as load_checkpoint

    model, optimizer, cfg = build(overrides)
    n = sum(p.numel() for p in model.parameters())
    state = {"step": 1, "tokens": 0, "scheduler": {}, "data": {}}
    out = {"params": n}
    with tempfile.TemporaryDirectory() as root:
        sync = Checkpointer(Path(root) / "sync")
        times = []
        for i in range(reps):
            start = time.perf_counter()
            sync.save(i + 1, model, optimizer, state)
            times.append(time.perf_counter() - start)
        out["sync"] = min(times)
        background = Checkpointer(Path(root) / "async", async_save=True)
        stalls, totals = [], []
        for i in range(reps):
            start = time.perf_counter()
            background.save(i + 1, model, optimizer, state)
            stalls.append(background.last_stall)
            background.wait()
            totals.append(time.perf_counter() - start)
        out["stall"], out["async_total"] = min(stalls), min(totals)
        model2, optimizer2, _ = build(overrides)
        start = time.perf_counter()
        load_checkpoint(Path(root) / "sync" / f"step_{reps}", model2, optimizer2)
        out["load"] = time.perf_counter() - start
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    rows = ["### bench_checkpoint: save / load / async stall (one process, local disk)",
            f"{machine()} · best of 3",
            "", "| model | params | sync save s | async stall s | stall / sync | async total s | load s |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    ok = True
    for name, overrides in SIZES.items():
        r = measure(overrides)
        ratio = r["stall"] / r["sync"]
        ok &= ratio <= 0.2 if r["params"] > 20e6 else True
        rows.append(f"| {name} | {r['params'] / 1e6:.1f}M | {r['sync']:.3f} | {r['stall']:.3f} | {ratio:.0%} | "
                    f"{r['async_total']:.3f} | {r['load']:.3f} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows + [""])
    publish(table, record=not args.no_record)
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
