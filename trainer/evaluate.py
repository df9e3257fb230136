"""Held-out perplexity, overall and by position bucket (how well the model uses long contexts, and whether it
extrapolates past its training length).  Used by `hylo eval` and by periodic evaluation during training
(`eval.interval`), logged as eval/loss, eval/ppl and eval/ppl_by_position/<lo>-<hi>.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.config import DataConfig


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: Iterable[torch.Tensor], bucket: int,
               positions: torch.Tensor | None = None, autocast=None) -> dict:
    """batches of (B, T+1) token windows -> {"loss", "ppl", "tokens", "buckets": [{lo, hi, loss, ppl, tokens}]}.

    `positions`: the global positions of the tokens this rank holds (context parallelism); sums are all-reduced
    over every rank when a process group is up, so each rank returns the same numbers."""
    sums = counts = None
    for batch in batches:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        pos = torch.arange(inputs.shape[1], device=inputs.device) if positions is None else positions
        if positions is not None:
            inputs, targets = inputs[:, positions], targets[:, positions]
        with autocast or torch.autocast(inputs.device.type, enabled=False):
            logits = model(inputs, None if positions is None else positions)
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
        n_buckets = int(pos.max()) // bucket + 1
        if sums is None:
            size = max(n_buckets, -(-int(batch.shape[1] - 1) // bucket))
            sums = torch.zeros(size, dtype=torch.float64, device=inputs.device)
            counts = torch.zeros(size, dtype=torch.float64, device=inputs.device)
        which = (pos // bucket).expand_as(nll)
        sums.index_add_(0, which.flatten(), nll.flatten().double())
        counts.index_add_(0, which.flatten(), torch.ones_like(nll.flatten(), dtype=torch.float64))
    if sums is None:
        raise ValueError("no evaluation batches")
    if dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    total_loss = (sums.sum() / counts.sum()).item()
    buckets = [{"lo": i * bucket, "hi": (i + 1) * bucket, "loss": (s / c).item(), "ppl": math.exp((s / c).item()),
                "tokens": int(c.item())} for i, (s, c) in enumerate(zip(sums, counts, strict=True)) if c > 0]
    return {"loss": total_loss, "ppl": math.exp(total_loss), "tokens": int(counts.sum().item()), "buckets": buckets}


def eval_scalars(result: dict) -> dict[str, float]:
    scalars = {"eval/loss": result["loss"], "eval/ppl": result["ppl"]}
    for b in result["buckets"]:
        scalars[f"eval/ppl_by_position/{b['lo']:06d}-{b['hi']:06d}"] = b["ppl"]
    return scalars


def eval_batches(data: DataConfig, tokenizer, seq_len: int, batch_size: int, n_batches: int, rank: int = 0,
                 world: int = 1) -> list[torch.Tensor]:
    """The first n_batches global batches of the held-out data (the same every time), this rank's share."""
    from trainer.data import DataLoader

    loader = DataLoader(data, tokenizer, seq_len=seq_len, global_batch=batch_size * world,
                        micro_batch=batch_size, rank=rank, world=world, seed=0)
    try:
        return [next(loader).flatten(0, 1).long() for _ in range(n_batches)]
    finally:
        loader.close()


def default_bucket(seq_len: int) -> int:
    """1K-token buckets for long contexts, 8 buckets for short ones."""
    return 1024 if seq_len >= 8192 else max(1, seq_len // 8)


def eval_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hylo eval", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="a step_<N> folder")
    parser.add_argument("--task", choices=["ppl"], default="ppl")
    parser.add_argument("--data", default="bundled:val", help="held-out data (default: the bundled corpus's "
                                                               "validation split)")
    parser.add_argument("--seq-len", type=int, default=0, help="0 = the training length; longer to extrapolate")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--bucket", type=int, default=0, help="tokens per position bucket (0 = automatic)")
    args = parser.parse_args(argv)
    from trainer.checkpoint import CheckpointError
    from trainer.config import ConfigError
    from trainer.export import load_trained_model
    from trainer.tokenizer import load_tokenizer

    try:
        model, cfg = load_trained_model(Path(args.checkpoint))
        seq_len = args.seq_len or cfg.train.seq_len
        data = DataConfig(**{**cfg.data.__dict__, "path": args.data, "prefetch": 0})
        batches = eval_batches(data, load_tokenizer(cfg.data.tokenizer), seq_len, args.batch_size, args.batches)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as err:
        print(f"[hylo] error: {err}", file=sys.stderr)
        return 2
    model.eval()
    result = perplexity(model, batches, args.bucket or default_bucket(seq_len))
    print(f"[hylo] {args.checkpoint}: loss {result['loss']:.4f}, ppl {result['ppl']:.2f} over {result['tokens']:,} "
          f"tokens at length {seq_len} (trained at {cfg.train.seq_len})")
    for b in result["buckets"]:
        print(f"  positions {b['lo']:>6}-{b['hi']:<6} ppl {b['ppl']:9.2f}  ({b['tokens']:,} tokens)")
    print(json.dumps(result))
    return 0
