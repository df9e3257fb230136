"""Data parallelism applied to a plain model from outside: DDP, or FSDP2 (`fully_shard`) block by block."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel


def apply_data_parallel(model: nn.Module, world: int, shard: bool, device: torch.device) -> nn.Module:
    if world == 1:
        return model
    if shard:
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step (gradient accumulation)."""
    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()

