"""The training engines behind one small interface, so the loop in trainer/train.py has a single path.

  TorchEngine      DDP or FSDP2 applied to the plain model from outside, bf16 autocast, clip_grad_norm_, DCP
                   checkpoints (trainer/checkpoint.py)
  DeepSpeedEngine  ZeRO 0-3 via deepspeed.initialize; clips and steps inside its own step()
                   (trainer/deepspeed_engine.py)

Both offer: `model` (what the loop calls), `optimizer` (what the LR schedule drives), `checkpointer(root)`,
`load(path)`, `forward_backward(batch, positions, poison)`, `clip_gradients()`, `optimizer_step()`, `zero_grad()`
and `autocast()`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from parallel.data_parallel import apply_data_parallel, gradient_sync
from trainer.checkpoint import Checkpointer, load_checkpoint
from trainer.config import Config
from trainer.data import inputs_and_targets
from trainer.optim import build_optimizer


def use_bf16(cfg: Config, device: torch.device) -> bool:
    return cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")


class TorchEngine:
    name = "torch"

    def __init__(self, model: nn.Module, cfg: Config, world: int, device: torch.device):
        self.model = apply_data_parallel(model, world, cfg.parallel.dp_shard, device)
        self.optimizer = build_optimizer(self.model, cfg, device)
        self.cfg, self.device = cfg, device

    def autocast(self):
        if use_bf16(self.cfg, self.device):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def checkpointer(self, root: Path) -> Checkpointer:
        c = self.cfg.checkpoint
        return Checkpointer(root, keep_last=c.keep_last, async_save=c.async_save)

    def load(self, path: Path) -> dict[str, Any]:
        return load_checkpoint(path, self.model, self.optimizer)

    def forward_backward(self, batch: torch.Tensor, cp_positions: torch.Tensor | None,
                         poison: bool = False) -> torch.Tensor:
        """Forward and backward over the micro-batches of one step (gradients accumulate); returns the step's
        loss.  batch: (micro-batches, sequences, [2,] seq_len + 1); with context parallelism each rank takes its
        positions of every sequence.  `poison` turns the loss into NaN (fault-injection tests only)."""
        accum = batch.shape[0]
        step_loss = torch.zeros((), device=self.device)
        for i in range(accum):
            inputs, targets = inputs_and_targets(batch[i], cp_positions)
            with gradient_sync(self.model, i == accum - 1), self.autocast():
                logits = self.model(inputs, cp_positions)
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()) / accum
                if poison:
                    loss = loss * float("nan")
                loss.backward()
            step_loss += loss.detach()
        return step_loss

    def clip_gradients(self) -> torch.Tensor:
        """Clip to train.grad_clip (0 = no clipping); returns the global norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip or float("inf"))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


def build_engine(model: nn.Module, cfg: Config, world: int, micro: int, accum: int, device: torch.device):
    """`train.engine`'s engine around a plain (possibly context-parallel, checkpointed, compiled) model."""
    if cfg.train.engine == "deepspeed":
        from trainer.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, micro, accum, bf16=use_bf16(cfg, device))
    return TorchEngine(model, cfg, world, device)
