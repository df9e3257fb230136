"""Held-out perplexity, overall and by position bucket (how well the model uses long contexts, and whether it
extrapolates past its training length).  Used by `hylo eval` and by periodic evaluation during training
(`eval.interval`), logged as eval/loss, eval/ppl and eval/ppl_by_position/<lo>-<hi>.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist

from hylo.trainer.checkpointing.export import load_trained_model
from hylo.trainer.config import DataConfig, held_out_data
from hylo.trainer.data.documents import DocumentMasking, document_masking
from hylo.trainer.data.loader import DataLoader
from hylo.trainer.data.tokenizer import load_tokenizer
from hylo.trainer.errors import ConfigError, DataError


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: Iterable[torch.Tensor], bucket: int,
               positions: torch.Tensor | None = None, autocast=None, loss_chunk: int = 0,
               documents: DocumentMasking | None = None, sources: list[list[str]] | None = None,
               source_names: list[str] | None = None) -> dict:
    """batches of (B, T+1) token windows -> {"loss", "ppl", "tokens", "buckets": [{lo, hi, loss, ppl, tokens}]}.

    `positions`: the global positions of the tokens this rank holds (context parallelism); sums are all-reduced
    over every rank when a process group is up, so each rank returns the same numbers.  `documents`: the run's
    document masking, applied as in training (buckets stay by position in the window).  `sources`: for a
    mixture, the source of each row of each batch; the result then also holds each of `source_names`' loss."""
    sums = counts = None
    names = source_names or []
    by_source = None  # (sources, 2): summed NLL and tokens of each source's rows
    for b, batch in enumerate(batches):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        pos = torch.arange(inputs.shape[1], device=inputs.device) if positions is None else positions
        with autocast or torch.autocast(inputs.device.type, enabled=False):
            # per-token NLL, through the head loss_chunk tokens at a time (the full logits never exist)
            if documents is None:
                if positions is not None:
                    inputs, targets = inputs[:, positions], targets[:, positions]
                nll = model(inputs, None if positions is None else positions, targets=targets,
                            loss_chunk=loss_chunk, reduction="none")
            else:  # boundaries from the whole rows, then this CP rank's tokens of each
                packed = documents.pack(inputs, targets, local=positions)
                nll = model(packed.inputs, packed.positions, targets=packed.targets, loss_chunk=loss_chunk,
                            reduction="none", cu_seqlens=packed.cu_seqlens).view(inputs.shape[0], -1)
        n_buckets = int(pos.max()) // bucket + 1
        if sums is None:
            size = max(n_buckets, -(-int(batch.shape[1] - 1) // bucket))
            sums = torch.zeros(size, dtype=torch.float64, device=inputs.device)
            counts = torch.zeros(size, dtype=torch.float64, device=inputs.device)
        if sources is not None:
            if by_source is None:
                by_source = torch.zeros(len(names), 2, dtype=torch.float64, device=inputs.device)
            rows = torch.tensor([names.index(name) for name in sources[b]], device=nll.device)
            by_source[:, 0].index_add_(0, rows, nll.double().sum(1))
            by_source[:, 1].index_add_(0, rows, torch.full(rows.shape, float(nll.shape[1]), dtype=torch.float64,
                                                           device=nll.device))
        which = (pos // bucket).expand_as(nll)
        sums.index_add_(0, which.flatten(), nll.flatten().double())
        counts.index_add_(0, which.flatten(), torch.ones_like(nll.flatten(), dtype=torch.float64))
    if sums is None:
        raise DataError("no evaluation batches")
    if dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(counts)
        if by_source is not None:
            dist.all_reduce(by_source)
    total_loss = (sums.sum() / counts.sum()).item()
    buckets = [{"lo": i * bucket, "hi": (i + 1) * bucket, "loss": (s / c).item(), "ppl": math.exp((s / c).item()),
                "tokens": int(c.item())} for i, (s, c) in enumerate(zip(sums, counts, strict=True)) if c > 0]
    result = {"loss": total_loss, "ppl": math.exp(total_loss), "tokens": int(counts.sum().item()), "buckets": buckets}
    if by_source is not None:
        result["sources"] = {name: {"loss": (s / c).item(), "tokens": int(c.item())}
                             for name, (s, c) in zip(names, by_source, strict=True) if c > 0}
    return result


def eval_scalars(result: dict) -> dict[str, float]:
    scalars = {"eval/loss": result["loss"], "eval/ppl": result["ppl"]}
    for name, source in result.get("sources", {}).items():
        scalars[f"eval/loss/{name}"] = source["loss"]
    for b in result["buckets"]:
        scalars[f"eval/ppl_by_position/{b['lo']:06d}-{b['hi']:06d}"] = b["ppl"]
    return scalars


def eval_batches(data: DataConfig, tokenizer, seq_len: int, batch_size: int, n_batches: int, rank: int = 0,
                 world: int = 1) -> tuple[list[torch.Tensor], list[list[str]] | None]:
    """The first n_batches global batches of the held-out data (the same every time), this rank's share; and for
    a mixture the source of each row (else None)."""
    loader = DataLoader(data, tokenizer, seq_len=seq_len, global_batch=batch_size * world,
                        micro_batch=batch_size, rank=rank, world=world, seed=0)
    try:
        batches, sources = [], []
        for _ in range(n_batches):
            batches.append(next(loader).flatten(0, 1).long())
            sources.append(loader.last_sources)
        return batches, (sources if data.sources else None)
    finally:
        loader.close()


def passkey_lengths(cfg) -> list[int]:
    """eval.passkey_lengths, or a quarter, half, all and twice the training length (extrapolation)."""
    t = cfg.train.seq_len
    return list(cfg.eval.passkey_lengths) or [max(64, t // 4), max(64, t // 2), t, 2 * t]


def run_eval_tasks(model, cfg, tokenizer, device, ppl_batches, positions, logger, step: int,
                   autocast=contextlib.nullcontext, ppl_sources: list[list[str]] | None = None) -> dict[str, float]:
    """Periodic evaluation of `eval.tasks` during training -> scalars under eval/ (the passkey heat-map goes to
    TensorBoard as an image).  mqar and passkey need whole sequences (refused under context parallelism)."""
    from hylo.trainer.data.mqar import mqar_spec
    from hylo.trainer.evaluation.recall import heatmap_image, mqar_accuracy, passkey_grid

    scalars: dict[str, float] = {}
    if "ppl" in cfg.eval.tasks and ppl_batches is not None:
        bucket = cfg.eval.bucket or default_bucket(cfg.eval.seq_len or cfg.train.seq_len)
        scalars.update(eval_scalars(perplexity(model, ppl_batches, bucket, positions, autocast(),
                                                cfg.train.loss_chunk, document_masking(cfg, tokenizer),
                                                ppl_sources, [src.name for src in cfg.data.sources])))
    if "mqar" in cfg.eval.tasks:
        with autocast():
            scalars["eval/mqar_accuracy"] = mqar_accuracy(model, mqar_spec(cfg), cfg.eval.mqar_samples, device=device)
    if "passkey" in cfg.eval.tasks:
        lengths, depths = passkey_lengths(cfg), list(cfg.eval.passkey_depths)
        with autocast():
            grid = passkey_grid(model, tokenizer, lengths, depths, cfg.eval.passkey_trials, device=device)
        scalars["eval/passkey_accuracy"] = float(grid.mean())
        for i, length in enumerate(lengths):
            for j, depth in enumerate(depths):
                scalars[f"eval/passkey/len{length:06d}/depth{depth:.2f}"] = float(grid[i, j])
        logger.image("eval/passkey_heatmap", heatmap_image(grid), step)
    return scalars


def default_bucket(seq_len: int) -> int:
    """1K-token buckets for long contexts, 8 buckets for short ones."""
    return 1024 if seq_len >= 8192 else max(1, seq_len // 8)


def run(args) -> int:
    """`hylo eval` (arguments: trainer/arguments.py)."""
    model, cfg = load_trained_model(Path(args.checkpoint), "eval")
    model.eval()
    if args.task == "ppl":
        return _eval_ppl(model, cfg, args)
    if args.task == "mqar":
        return _eval_mqar(model, cfg, args)
    return _eval_passkey(model, cfg, load_tokenizer(cfg.data.tokenizer), args)


def _eval_ppl(model, cfg, args) -> int:
    seq_len = args.seq_len or cfg.train.seq_len
    data, note = held_out_data(cfg, args.data)
    if note:
        print(note + " (or --data)", flush=True)
    if data.split == "val":
        print(f"[hylo] perplexity on the run's held-out documents (data.val_fraction={cfg.data.val_fraction} of "
              f"{cfg.data.path or 'the bundled corpus'})", flush=True)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    batches, sources = eval_batches(data, tokenizer, seq_len, args.batch_size, args.batches)
    result = perplexity(model, batches, args.bucket or default_bucket(seq_len), loss_chunk=cfg.train.loss_chunk,
                        documents=document_masking(cfg, tokenizer),  # as the run trained
                        sources=sources, source_names=[src.name for src in data.sources])
    print(f"[hylo] {args.checkpoint}: loss {result['loss']:.4f}, ppl {result['ppl']:.2f} over {result['tokens']:,} "
          f"tokens at length {seq_len} (trained at {cfg.train.seq_len})")
    for b in result["buckets"]:
        print(f"  positions {b['lo']:>6}-{b['hi']:<6} ppl {b['ppl']:9.2f}  ({b['tokens']:,} tokens)")
    for name, source in result.get("sources", {}).items():
        print(f"  source {name}: loss {source['loss']:.4f} ({source['tokens']:,} tokens)")
    print(json.dumps(result))
    return 0


def _eval_mqar(model, cfg, args) -> int:
    from hylo.trainer.data.mqar import mqar_spec
    from hylo.trainer.evaluation.recall import mqar_accuracy

    spec = mqar_spec(cfg)
    spec.seq_len = args.seq_len or spec.seq_len
    spec.pairs = args.pairs or spec.pairs
    try:
        spec.check()
    except ValueError as err:
        raise ConfigError(f"--pairs/--seq-len: {err}") from None
    if model.cfg.vocab_size < spec.vocab:
        raise ConfigError(f"MQAR with {spec.n_keys} keys and {spec.n_values} values needs {spec.vocab} token ids; "
                         f"this model has {model.cfg.vocab_size}")
    accuracy = mqar_accuracy(model, spec, n=args.samples)
    print(f"[hylo] {args.checkpoint}: MQAR accuracy {accuracy:.4f} ({spec.pairs} pairs, length {spec.seq_len}, "
          f"{args.samples} sequences)")
    print(json.dumps({"task": "mqar", "accuracy": accuracy, "pairs": spec.pairs, "seq_len": spec.seq_len}))
    return 0


def _eval_passkey(model, cfg, tokenizer, args) -> int:
    from hylo.trainer.evaluation.recall import passkey_grid

    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else passkey_lengths(cfg)
    depths = [float(x) for x in args.depths.split(",")]
    if any(not 0 <= d <= 1 for d in depths):
        raise ConfigError(f"--depths must lie in [0, 1], got {depths}")
    grid = passkey_grid(model, tokenizer, lengths, depths, args.trials)
    print(f"[hylo] {args.checkpoint}: passkey accuracy {grid.mean():.3f} (rows: length, columns: depth)")
    print("  length " + " ".join(f"{d:>6.2f}" for d in depths))
    for length, row in zip(lengths, grid, strict=True):
        print(f"  {length:>6} " + " ".join(f"{v:>6.2f}" for v in row))
    if args.heatmap:
        from hylo.trainer.evaluation.report import plot_heatmap

        plot_heatmap(grid, lengths, depths, "passkey accuracy", Path(args.heatmap))
        print(f"[hylo] heat-map written to {args.heatmap}")
    print(json.dumps({"task": "passkey", "lengths": lengths, "depths": depths, "accuracy": grid.tolist()}))
    return 0
