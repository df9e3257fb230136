"""`train.engine=torch`: DDP or FSDP2 applied to the plain model from outside, bf16 autocast, clip_grad_norm_,
AdamW, and DCP checkpoints (trainer/checkpointing/dcp.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hylo.parallel.data_parallel import apply_data_parallel, gradient_sync
from hylo.trainer.checkpointing.dcp import DCPCheckpointer, load_dcp
from hylo.trainer.data.documents import DocumentMasking
from hylo.trainer.engines.base import Engine, Objective, StepResult, micro_batches, saved_for_backward
from hylo.trainer.engines.optim import build_optimizer

if TYPE_CHECKING:
    from hylo.trainer.config import Config


def use_bf16(cfg: Config, device: torch.device) -> bool:
    return cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")


class TorchEngine(Engine):
    name = "torch"
    can_skip_nonfinite = True
    exposes_gradients = True
    can_save_async = True
    can_shard_parameters_fsdp = True

    def __init__(self, model: nn.Module, cfg: Config, world: int, device: torch.device):
        self.model = apply_data_parallel(model, world, cfg.parallel.dp_shard, device)
        self.optimizer = build_optimizer(self.model, cfg, device)
        self.cfg, self.device = cfg, device
        self.max_norm = cfg.train.grad_clip or float("inf")

    def autocast(self):
        if use_bf16(self.cfg, self.device):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, batch: torch.Tensor, positions: torch.Tensor | None, *, skip_nonfinite: bool = False,
                   on_gradients: Callable[[nn.Module], None] | None = None,
                   documents: DocumentMasking | None = None, objective: Objective | None = None) -> StepResult:
        """Forward and backward over the micro-batches (gradients accumulate, synchronised at the last one),
        clip, then step — or, with `skip_nonfinite`, leave the weights alone when the norm is not finite (the one
        host synchronisation of a step, and only with train.nan_policy=skip)."""
        accum = batch.shape[0]
        step_loss = torch.zeros((), device=self.device)
        for i, micro in micro_batches(batch, positions, documents):
            with gradient_sync(self.model, i == accum - 1):  # DDP's no_sync must cover the backward too
                with self.autocast(), saved_for_backward(self.cfg.train.activation_offload, self.device):
                    loss = micro.loss(self.model, self.cfg.train.loss_chunk, objective) / accum
                loss.backward()
            step_loss += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if on_gradients is not None:
            on_gradients(self.model)
        stepped = not (skip_nonfinite and not bool(torch.isfinite(norm)))
        if stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(step_loss, norm, stepped)

    def checkpointer(self, root: Path) -> DCPCheckpointer:
        c = self.cfg.checkpoint
        return DCPCheckpointer(root, keep_last=c.keep_last, async_save=c.async_save, checksums=c.checksums)

    def load(self, path: Path) -> dict[str, Any]:
        return load_dcp(path, self.model, self.optimizer)
