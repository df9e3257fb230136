"""What an engine is: it owns the model's training step (forward and backward over the micro-batches, gradient
clipping, the optimizer step) and its checkpoint format, and declares what it can do, so the trainer and the
config check ask the declaration instead of the engine's name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from hylo.parallel.activation_offload import ActivationOffload
from hylo.trainer.data.documents import DocumentMasking
from hylo.trainer.data.loader import inputs_and_targets

if TYPE_CHECKING:
    from hylo.trainer.checkpointing.step_folder import StepFolderWriter
    from hylo.trainer.config import Config


@dataclass
class StepResult:
    loss: torch.Tensor  # the step's mean loss over its micro-batches (a 0-d tensor on the device: no host sync)
    grad_norm: torch.Tensor  # global gradient norm before clipping (0-d tensor)
    stepped: bool  # False only when the engine skipped a non-finite step (train.nan_policy=skip)


def saved_for_backward(offload: bool, device: torch.device):
    """The context a micro-batch's forward runs in: train.activation_offload moves what it saves to the host."""
    return ActivationOffload(device) if offload else contextlib.nullcontext()


@dataclass
class MicroBatch:
    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None  # None: 0..T-1 of each row
    cu_seqlens: torch.Tensor | None  # packed documents (data.document_masking)

    def loss(self, model: nn.Module, loss_chunk: int, objective: Objective | None = None) -> torch.Tensor:
        """The next-token loss, or `objective`'s (train.objective: trainer/distillation/objectives.py)."""
        if objective is not None:
            return objective(model, self)
        return model(self.inputs, self.positions, targets=self.targets, loss_chunk=loss_chunk,
                     cu_seqlens=self.cu_seqlens)


# train.objective other than lm: (model, micro-batch) -> the micro-batch's loss, called inside the engine's step
Objective = Callable[[nn.Module, "MicroBatch"], torch.Tensor]


def micro_batches(batch: torch.Tensor, positions: torch.Tensor | None,
                  documents: DocumentMasking | None = None) -> Iterator[tuple[int, MicroBatch]]:
    """(index, micro-batch) for each micro-batch of a step's batch (micro-batches, sequences, [2,] T + 1); with
    context parallelism each rank takes its positions of every sequence; with document masking the sequences
    become one packed sequence with its document boundaries."""
    for i in range(batch.shape[0]):
        if documents is None:
            inputs, targets = inputs_and_targets(batch[i], positions)
            yield i, MicroBatch(inputs, targets, positions, None)
        else:  # the boundaries come from the whole rows, then each CP rank keeps its own tokens
            packed = documents.pack(*inputs_and_targets(batch[i]), local=positions)
            yield i, MicroBatch(packed.inputs, packed.targets, packed.positions, packed.cu_seqlens)


class Engine:
    """The interface the trainer drives.  Subclasses set `model` (what is called) and `optimizer` (what the LR
    schedule drives) and declare their capabilities below."""

    name: ClassVar[str]
    # The declaration: the config check refuses settings that need a capability the engine lacks.
    can_skip_nonfinite: ClassVar[bool] = False  # leave the optimizer untouched when the gradient norm is not finite
    exposes_gradients: ClassVar[bool] = False  # calls `on_gradients(model)` between backward and optimizer step
    can_save_async: ClassVar[bool] = False  # checkpoint.async_save
    can_shard_parameters_fsdp: ClassVar[bool] = False  # parallel.dp_shard (FSDP2)

    model: nn.Module
    optimizer: torch.optim.Optimizer

    @classmethod
    def config_problem(cls, cfg: Config) -> str | None:
        """Engine-specific settings this engine refuses, beyond the declared capabilities."""
        return None

    def train_step(self, batch: torch.Tensor, positions: torch.Tensor | None, *, skip_nonfinite: bool = False,
                   on_gradients: Callable[[nn.Module], None] | None = None,
                   documents: DocumentMasking | None = None, objective: Objective | None = None) -> StepResult:
        raise NotImplementedError

    def autocast(self):
        return contextlib.nullcontext()

    def checkpointer(self, root: Path) -> StepFolderWriter:
        raise NotImplementedError

    def load(self, path: Path) -> dict[str, Any]:
        """Restore model, optimizer and RNG from a step folder; return the trainer state saved with them."""
        raise NotImplementedError

    def trainer_state_extras(self) -> dict[str, Any]:
        """What this engine records in trainer_state.json beside the trainer's own counters."""
        return {"engine": self.name}


def capability_problem(engine: type[Engine], cfg: Config) -> str | None:
    """Why `cfg` asks the engine for something it does not declare, or None."""
    name = f"train.engine={engine.name}"
    if cfg.train.nan_policy == "skip" and not engine.can_skip_nonfinite:
        return (f"train.nan_policy=skip is not supported with {name}: it applies the optimizer step before the "
                "gradient norm can be checked; use train.nan_policy=stop")
    if cfg.checkpoint.async_save and not engine.can_save_async:
        return (f"checkpoint.async_save is not supported with {name}: it writes its checkpoints synchronously; "
                "drop checkpoint.async_save or use train.engine=torch")
    if cfg.parallel.dp_shard and not engine.can_shard_parameters_fsdp:
        return (f"parallel.dp_shard=true (FSDP2) is not supported with {name}, which shards the model itself "
                "(with train.engine=deepspeed use deepspeed.zero_stage=3 instead of parallel.dp_shard)")
    return engine.config_problem(cfg)
