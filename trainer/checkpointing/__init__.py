"""Checkpoints: step folders shared by every format (`step_folder`), the torch engine's DCP shards (`dcp`) and
the DeepSpeed engine's own files (`deepspeed`).  `load_weights` reads the model weights of either, for eval,
generate and export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from hylo.trainer.checkpointing.dcp import DCPCheckpointer, load_dcp
from hylo.trainer.checkpointing.deepspeed import load_deepspeed_weights
from hylo.trainer.checkpointing.step_folder import (
    MARKER,
    TRAINER_STATE,
    complete_checkpoints,
    config_checkpoint,
    find_checkpoint,
    is_complete,
    latest_checkpoint,
    read_trainer_state,
    recover_leftovers,
    verified_checkpoint,
    verify_checkpoint,
)
from hylo.trainer.errors import CheckpointError

__all__ = ["MARKER", "TRAINER_STATE", "CheckpointError", "DCPCheckpointer", "complete_checkpoints", "config_checkpoint",
           "find_checkpoint", "is_complete", "latest_checkpoint", "load_weights", "read_trainer_state",
           "recover_leftovers", "verified_checkpoint", "verify_checkpoint"]

WEIGHT_LOADERS = {"torch": lambda path, model: load_dcp(path, model, None), "deepspeed": load_deepspeed_weights}


def load_weights(path: Path, model: nn.Module) -> dict[str, Any]:
    """Load a step folder's model weights, whichever engine wrote it; returns its trainer state."""
    engine = read_trainer_state(Path(path)).get("engine", "torch")
    problem = verify_checkpoint(Path(path))
    if problem:
        raise CheckpointError(f"checkpoint '{path}' is corrupt: {problem}")
    if engine not in WEIGHT_LOADERS:
        raise CheckpointError(f"checkpoint '{path}' was written by an unknown engine '{engine}'")
    return WEIGHT_LOADERS[engine](Path(path), model)
