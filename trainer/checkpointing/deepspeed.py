"""The DeepSpeed engine's checkpoints: DeepSpeed's own files (`engine.save_checkpoint`) inside hylo's step
folders, so the COMPLETE marker, `keep_last`, `checkpoint.resume=auto`, the data-loader position and the RNG
states work as with the torch engine.

DeepSpeed writes its files with `torch.save` (pickles): load only checkpoints you trust.  They resume on the same
number of ranks and ZeRO stage (DeepSpeed's universal-checkpoint conversion handles other layouts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hylo.trainer.checkpointing.step_folder import StepFolderWriter, read_trainer_state, restore_rng
from hylo.trainer.errors import CheckpointError, ConfigError


def require_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("train.engine=deepspeed needs DeepSpeed: pip install 'hylo[deepspeed]' (on machines "
                          "without a GPU also export DS_ACCELERATOR=cpu)") from None
    return deepspeed


class DeepSpeedCheckpointer(StepFolderWriter):
    """hylo's step folders around `engine.save_checkpoint` (DeepSpeed gathers model and optimizer states itself)."""

    def __init__(self, root: Path, engine, *, keep_last: int = 0, checksums: bool = True):
        super().__init__(root, keep_last=keep_last, checksums=checksums)
        self.engine = engine

    def _collect(self, model, optimizer, trainer_state: dict[str, Any]) -> tuple[None, dict]:
        return None, dict(trainer_state)

    def _write(self, tmp: Path, state: None) -> None:
        self.engine.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False)


def load_deepspeed(path: Path, engine, zero_stage: int) -> dict[str, Any]:
    """Restore a DeepSpeed engine (model, optimizer) and this rank's RNG from a step folder; return the trainer
    state saved beside them."""
    path = Path(path)
    meta = read_trainer_state(path, expect_engine="deepspeed")
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    saved = (meta.get("world_size"), meta.get("zero_stage"))
    if saved != (world, zero_stage):
        raise CheckpointError(
            f"checkpoint '{path}' was written by {saved[0]} rank(s) at ZeRO stage {saved[1]}; this run has "
            f"{world} at stage {zero_stage}. Resume with the same layout, or convert it with DeepSpeed's "
            "ds_to_universal.py")
    try:
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False)
    except (RuntimeError, OSError, KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint '{path}' does not fit this model/optimizer (different model shape "
                              f"or corrupt files): {str(err).splitlines()[0][:500]}") from None
    if loaded is None:
        raise CheckpointError(f"DeepSpeed found no loadable checkpoint in '{path}'")
    restore_rng(path)
    return meta


def consolidated_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model weights of a DeepSpeed step folder, gathered from its ZeRO partitions (for eval,
    generate and export, which run without DeepSpeed's engine)."""
    meta = read_trainer_state(path, expect_engine="deepspeed")
    if meta.get("zero_stage", 0) == 0:  # no partitions: the module's weights are stored whole
        states = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    require_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # optional dependency

    return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)


def load_deepspeed_weights(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    try:
        model.load_state_dict(consolidated_weights(path))
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint '{path}' does not fit this model: {str(err).splitlines()[0]}") from None
    return read_trainer_state(path)
