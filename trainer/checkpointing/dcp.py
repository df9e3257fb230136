"""The torch engine's checkpoints: model parameters and optimizer *tensors* through torch.distributed.checkpoint
(sharded, reshardable across DP/CP layouts), the optimizer's hyper-parameters as JSON in the trainer state.

Nothing is ever unpickled: only tensors go through DCP (the load planner refuses pickled bytes) and everything
else is JSON.  Saves can run in the background (`dcp.async_save`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.optim import Optimizer

from trainer.checkpointing.step_folder import StepFolderWriter, read_trainer_state, restore_rng
from trainer.errors import CheckpointError

# Single-process runs save without a process group on purpose.
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized")


class _NoPickleLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"checkpoint entry '{read_item.dest_index.fqn}' is pickled bytes; hylo checkpoints "
                              "hold only tensors and JSON, and it refuses to unpickle anything")


def _split_optimizer(optim_sd: dict) -> tuple[dict, list]:
    """DCP gets only tensors: the per-parameter state; the param groups' hyper-parameters go to JSON."""
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in optim_sd["param_groups"]]
    return optim_sd["state"], groups


class DCPCheckpointer(StepFolderWriter):
    """Step folders of DCP shards; `async_save` writes them in the background."""

    def __init__(self, root: Path, *, keep_last: int = 0, async_save: bool = False):
        super().__init__(root, keep_last=keep_last)
        self.async_save = async_save

    def _collect(self, model: nn.Module, optimizer: Optimizer, trainer_state: dict[str, Any]) -> tuple[dict, dict]:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        optim_tensors, groups = _split_optimizer(optim_sd)
        return {"model": model_sd, "optim": optim_tensors}, dict(trainer_state, optimizer_param_groups=groups)

    def _write(self, tmp: Path, state: dict) -> None:
        dcp.save(state, checkpoint_id=str(tmp))

    def _start(self, tmp: Path, state: dict):
        return dcp.async_save(state, checkpoint_id=str(tmp)) if self.async_save else None


def load_dcp(path: Path, model: nn.Module, optimizer: Optimizer | None) -> dict[str, Any]:
    """Restore model (and optimizer, and this rank's RNG) in place from any DP/CP layout; return the trainer
    state saved beside them."""
    path = Path(path)
    meta = read_trainer_state(path, expect_engine="torch" if optimizer is not None else None)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"checkpoint '{path}' has no DCP .metadata: it is not a train.engine=torch checkpoint "
                              "or its files were removed")
    if optimizer is None:
        state: dict[str, Any] = {"model": get_state_dict(model, [])[0]}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd["state"]}
    try:
        dcp.load(state, checkpoint_id=str(path), planner=_NoPickleLoadPlanner())
    except (Exception, CheckpointException) as err:  # CheckpointException derives from BaseException
        lines = [line for line in str(err).splitlines() if line.strip()]
        cause = lines[-1] if lines else repr(err)
        raise CheckpointError(
            f"checkpoint '{path}' does not fit this model/optimizer (different model shape or corrupt files): "
            f"{cause[:500]}"
        ) from None
    if optimizer is None:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
        return meta
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optim"], "param_groups": meta["optimizer_param_groups"]})
    restore_rng(path)
    return meta
