"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine/linear/constant schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from hylo.trainer.config import Config


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    fused = {"on": True, "off": False, "auto": device.type == "cuda"}[cfg.optim.fused]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.train.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=fused or None,
    )


def lr_factor(step: int, cfg: Config) -> float:
    """Multiplier of train.lr at optimizer step `step` (0-based): linear warmup, then the chosen decay."""
    warmup, total, floor = cfg.schedule.warmup_steps, cfg.train.steps, cfg.schedule.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if cfg.schedule.decay == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule.decay == "linear":
        return floor + (1 - floor) * (1 - progress)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
