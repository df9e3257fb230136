"""`train.engine=deepspeed`: the same model, data, schedule and logging inside `deepspeed.initialize` (ZeRO 0-3).

One source of truth: the DeepSpeed config is generated from ours (micro-batch and accumulation from
`train.batch_size`/`train.micro_batch_size`, clipping from `train.grad_clip`, bf16 from `train.dtype`, the stage
from `deepspeed.zero_stage`); `deepspeed.config` adds raw DeepSpeed keys on top but may not restate those.
Context parallelism works unchanged: the CP ops are swapped into the plain model before DeepSpeed wraps it, and
DeepSpeed averages gradients over every rank exactly as the torch engine does.  Checkpoints: DeepSpeed's own files
in hylo's step folders (trainer/checkpointing/deepspeed.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hylo.trainer.checkpointing.deepspeed import DeepSpeedCheckpointer, load_deepspeed, require_deepspeed
from hylo.trainer.data.documents import DocumentMasking
from hylo.trainer.engines.base import Engine, Objective, StepResult, micro_batches, saved_for_backward
from hylo.trainer.engines.optim import build_optimizer

if TYPE_CHECKING:
    from hylo.trainer.config import Config

# DeepSpeed still calls torch.distributed's deprecated collective names (_all_gather_base, ...); torch warns about
# each, on every rank, which buried a run's own lines under ~120 of them.  Ours to silence: DeepSpeed's to fix.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"torch\.distributed\.\w+ is a private function", category=FutureWarning)

# Keys hylo derives from its own config; restating them in deepspeed.config would create a second truth.
DERIVED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
           "bf16", "fp16", "zero_optimization.stage", "optimizer", "scheduler")


def deepspeed_config(c: Config, micro: int, accum: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON for this run, derived from ours, with `deepspeed.config` merged on top."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": c.train.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": c.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,  # hylo's AdamW (decay on matrices only) is a client optimizer
        "steps_per_print": 10**9,  # hylo logs; keep DeepSpeed's own step prints out of the way
        "wall_clock_breakdown": False,
    }
    for key, value in c.deepspeed.config.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


class DeepSpeedEngine(Engine):
    """A plain (possibly context-parallel) model and hylo's optimizer inside `deepspeed.initialize`.  DeepSpeed
    clips and steps inside its own `step()` at the last micro-batch, so the gradients are never exposed before
    the step and a non-finite step cannot be skipped (both declared)."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, c: Config, micro: int, accum: int, bf16: bool):
        deepspeed = require_deepspeed()
        self.config = deepspeed_config(c, micro, accum, bf16)
        device = next(model.parameters()).device
        self.optimizer = build_optimizer(model, c, device)  # the LR schedule drives its param groups
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.config,
                                               dist_init_required=False)
        self.model = self.engine
        self.keep_last, self.zero_stage = c.checkpoint.keep_last, c.deepspeed.zero_stage
        self.checksums, self.loss_chunk = c.checkpoint.checksums, c.train.loss_chunk
        self.offload = c.train.activation_offload

    @classmethod
    def config_problem(cls, c: Config) -> str | None:
        ds = c.deepspeed
        if ds.zero_stage not in (0, 1, 2, 3):
            return f"deepspeed.zero_stage={ds.zero_stage} is not one of 0, 1, 2, 3"
        if c.model.mlp_tile and ds.zero_stage == 3:
            return ("model.mlp_tile is not supported with deepspeed.zero_stage=3: ZeRO-3 partitions the MLP weights "
                    "the tiled MLP takes as inputs; use zero_stage 2, or train.engine=torch with FSDP2")
        for key in DERIVED:
            head, _, tail = key.partition(".")
            if head in ds.config and (not tail or tail in (ds.config[head] or {})):
                return (f"deepspeed.config.{key} is derived from hylo's config (train.batch_size, "
                        "train.micro_batch_size, train.grad_clip, train.dtype, deepspeed.zero_stage, optim.*, "
                        "schedule.*); set it there instead")
        return None

    def train_step(self, batch: torch.Tensor, positions: torch.Tensor | None, *, skip_nonfinite: bool = False,
                   on_gradients: Callable[[nn.Module], None] | None = None,
                   documents: DocumentMasking | None = None, objective: Objective | None = None) -> StepResult:
        """DeepSpeed scales each micro-batch's loss by 1/accum, reduces the gradients and, at the last micro-batch,
        clips and steps the optimizer (and zeroes the gradients)."""
        accum = batch.shape[0]
        step_loss = torch.zeros((), device=batch.device)
        for _, micro in micro_batches(batch, positions, documents):
            with saved_for_backward(self.offload, batch.device):
                loss = micro.loss(self.engine, self.loss_chunk, objective)
            self.engine.backward(loss)
            self.engine.step()
            step_loss += loss.detach() / accum
        norm = self.engine.get_global_grad_norm()  # the norm DeepSpeed saw before clipping
        return StepResult(step_loss, torch.as_tensor(float("nan") if norm is None else float(norm)), True)

    def checkpointer(self, root: Path) -> DeepSpeedCheckpointer:
        return DeepSpeedCheckpointer(root, self.engine, keep_last=self.keep_last,
                                     checksums=self.checksums)

    def load(self, path: Path) -> dict[str, Any]:
        return load_deepspeed(path, self.engine, self.zero_stage)

    def trainer_state_extras(self) -> dict[str, Any]:
        return {"engine": self.name, "zero_stage": self.zero_stage}
