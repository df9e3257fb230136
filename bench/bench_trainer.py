"""Trainer overhead and data-pipeline headroom, side by side in one run.

  python bench/bench_trainer.py [--config configs/tiny.yaml] [--steps 60] [key=value ...]

Three phases, each in its own process (so peak memory is its own):
  trainer   the full `hylo.trainer.train` loop (logging, progress bar, prefetching loader; checkpoints off)
  bare      the same model and batch size: forward, backward, AdamW step, nothing else (batches pre-made)
  data      the data loader alone, producing the same batches as fast as it can
MFU on CPU is against a measured fp32 matmul, not a datasheet peak.
Targets: trainer tokens/s within 10% of bare; data tokens/s >= 5x what training consumes.
Prints a table (`--record` appends it to bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.record import machine, publish  # noqa: E402


def peak_mem_gb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def phase_trainer(cfg, steps: int, warmup: int) -> dict:
    from hylo.trainer.runtime.distributed import init_distributed
    from hylo.trainer.train import train

    with tempfile.TemporaryDirectory() as run_dir:
        cfg.run.dir, cfg.train.steps, cfg.checkpoint.interval = run_dir, warmup + steps, 0
        cfg.logging.interval = warmup  # windows of `warmup` steps; the ones after step `warmup` are timed
        train(cfg)
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "train/tokens_per_sec" in r]  # not the sink-monitor rows
    timed = [r for r in rows if r["step"] > warmup]
    tokens = [(r["step"] - prev["step"]) * cfg.train.batch_size * cfg.train.seq_len
              for prev, r in zip(rows, rows[1:], strict=False) if r["step"] > warmup]
    seconds = sum(n / r["train/tokens_per_sec"] for n, r in zip(tokens, timed, strict=True))
    device = init_distributed(cfg.train.device).device
    return {"tokens_per_sec": sum(tokens) / seconds, "mfu": sum(r["train/mfu"] for r in timed) / len(timed),
            "peak_mem_gb": timed[-1].get("train/mem_gb", peak_mem_gb(device))}


def phase_bare(cfg, steps: int, warmup: int) -> dict:
    import torch
    import torch.nn.functional as F

    from hylo.models.lm import HybridLM
    from hylo.trainer.config import compile_choice
    from hylo.trainer.data.loader import DataLoader
    from hylo.trainer.data.tokenizer import load_tokenizer
    from hylo.trainer.runtime.distributed import init_distributed

    device = init_distributed(cfg.train.device).device
    torch.manual_seed(cfg.train.seed)
    tok = load_tokenizer(cfg.data.tokenizer)
    cfg.model.vocab_size = cfg.model.vocab_size or 64 * -(-tok.get_vocab_size() // 64)
    micro = cfg.train.micro_batch_size or cfg.train.batch_size
    cfg.data.prefetch = 0
    loader = DataLoader(cfg.data, tok, seq_len=cfg.train.seq_len, global_batch=cfg.train.batch_size,
                        micro_batch=micro, seed=cfg.train.seed)
    batches = [next(loader).to(device).long() for _ in range(4)]
    model = HybridLM(cfg.model).to(device)
    if compile_choice(cfg, device.type)[0]:
        for block in model.blocks:
            block.compile(fullgraph=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, fused=device.type == "cuda" or None)
    use_bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")

    def step(batch):
        for mb in batch:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(mb[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), mb[:, 1:].flatten()) / len(batch)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(batches[i % 4])
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % 4])
    sync(device)
    elapsed = time.perf_counter() - start
    return {"tokens_per_sec": steps * cfg.train.batch_size * cfg.train.seq_len / elapsed,
            "peak_mem_gb": peak_mem_gb(device)}


def phase_data(cfg, steps: int, warmup: int) -> dict:
    from hylo.trainer.data.loader import DataLoader
    from hylo.trainer.data.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.data.tokenizer)
    cfg.data.prefetch = 0  # measure the producer itself, not a queue
    loader = DataLoader(cfg.data, tok, seq_len=cfg.train.seq_len, global_batch=cfg.train.batch_size,
                        micro_batch=cfg.train.micro_batch_size or cfg.train.batch_size, seed=cfg.train.seed)
    next(loader)  # opens the dataset
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    n = max(steps, 4_000_000 // tokens_per_step)  # enough tokens to tokenize many documents, not slice one
    start = time.perf_counter()
    for _ in range(n):
        next(loader)
    elapsed = time.perf_counter() - start
    return {"tokens_per_sec": n * cfg.train.batch_size * cfg.train.seq_len / elapsed}


PHASES = {"trainer": phase_trainer, "bare": phase_bare, "data": phase_data}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    if args.phase:
        from hylo.trainer.config import load_config

        cfg = load_config(args.config, args.overrides + ["logging.progress=false"])
        print("RESULT " + json.dumps(PHASES[args.phase](cfg, args.steps, args.warmup)), flush=True)
        return 0

    results = {}
    for phase in ("bare", "trainer", "data"):
        cmd = [sys.executable, __file__, "--phase", phase, "--config", args.config, "--steps", str(args.steps),
               "--warmup", str(args.warmup), *args.overrides]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
            return 1
        results[phase] = json.loads(lines[-1][len("RESULT "):])

    bare, trainer, data = results["bare"]["tokens_per_sec"], results["trainer"]["tokens_per_sec"], \
        results["data"]["tokens_per_sec"]
    overhead = 1 - trainer / bare
    headroom = data / trainer
    config_name = Path(args.config).name + (" " + " ".join(args.overrides) if args.overrides else "")
    table = "\n".join([
        f"### bench_trainer: {config_name}",
        f"{machine()} · {args.steps} timed steps after {args.warmup} warm-up",
        "",
        "| phase | tokens/s | peak memory (GiB) | note |",
        "|---|---:|---:|---|",
        f"| bare loop | {bare:,.0f} | {results['bare']['peak_mem_gb']:.2f} | forward+backward+AdamW only |",
        f"| trainer | {trainer:,.0f} | {results['trainer']['peak_mem_gb']:.2f} | "
        f"MFU {results['trainer']['mfu']:.1%}; overhead vs bare {overhead:+.1%} (target <= 10%) |",
        f"| data pipeline | {data:,.0f} | - | {headroom:.1f}x what training consumes (target >= 5x) |",
        "",
    ])
    publish(table, record=args.record)
    return 0 if overhead <= 0.10 and headroom >= 5 else 3


if __name__ == "__main__":
    sys.exit(main())
