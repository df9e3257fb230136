"""The torch engine's checkpoints: model parameters and optimizer *tensors* through torch.distributed.checkpoint
(sharded, reshardable across DP/CP layouts), the optimizer's hyper-parameters as JSON in the trainer state.

Nothing is unpickled but DCP's own metadata: only tensors go through DCP (the load planner refuses pickled
bytes), everything else is JSON, and DCP's `.metadata` file (a pickle) is read by an unpickler that admits only
the types DCP writes there (integrity.py's `read_dcp_metadata`, also run when a checkpoint is verified), as
`torch.load(weights_only=True)` does for tensors.  Saves
can run in the background (`dcp.async_save`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.optim import Optimizer

from hylo.trainer.checkpointing.integrity import read_dcp_metadata
from hylo.trainer.checkpointing.step_folder import StepFolderWriter, read_trainer_state, restore_rng
from hylo.trainer.errors import CheckpointError

# Single-process runs save without a process group on purpose.
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized")


class _NoPickleLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"checkpoint entry '{read_item.dest_index.fqn}' is pickled bytes; hylo checkpoints "
                              "hold only tensors and JSON, and it refuses to unpickle anything")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, with the .metadata read by hylo's restricted unpickler instead of `pickle.load`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_dcp_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _split_optimizer(optim_sd: dict) -> tuple[dict, list]:
    """DCP gets only tensors: the per-parameter state; the param groups' hyper-parameters go to JSON."""
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in optim_sd["param_groups"]]
    return optim_sd["state"], groups


class DCPCheckpointer(StepFolderWriter):
    """Step folders of DCP shards; `async_save` writes them in the background."""

    def __init__(self, root: Path, *, keep_last: int = 0, async_save: bool = False, checksums: bool = True):
        super().__init__(root, keep_last=keep_last, checksums=checksums)
        self.async_save = async_save
        # A background save's collectives run on a group of their own (as torchtitan's async mode does): on the
        # training group they would interleave with DDP's/FSDP's and the preemption vote, and hang or abort.
        self.save_group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None

    def _collect(self, model: nn.Module, optimizer: Optimizer, trainer_state: dict[str, Any]) -> tuple[dict, dict]:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        optim_tensors, groups = _split_optimizer(optim_sd)
        return {"model": model_sd, "optim": optim_tensors}, dict(trainer_state, optimizer_param_groups=groups)

    def _write(self, tmp: Path, state: dict) -> None:
        dcp.save(state, checkpoint_id=str(tmp))

    def _start(self, tmp: Path, state: dict):
        if not self.async_save:
            return None
        return dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.save_group)


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
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=_NoPickleLoadPlanner())
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint '{path}': {err}") from None
    except (Exception, CheckpointException) as err:  # CheckpointException derives from BaseException
        if "hylo refuses to unpickle" in str(err) or "is unreadable" in str(err):  # wrapped by DCP on many ranks
            lines = [line for line in str(err).splitlines() if "CheckpointError" in line or "refuses" in line]
            raise CheckpointError(f"checkpoint '{path}': {(lines or [str(err)])[-1][-400:]}") from None
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
