"""Checkpoints with torch.distributed.checkpoint (DCP): `<run>/checkpoints/step_<N>/`.

Model and optimizer go through DCP (sharded, reshardable; FSDP2/DDP/single-process alike); the small trainer
state (step, tokens, schedule, data-loader position) is JSON beside them, so loading unpickles nothing.  A step
is written into `step_<N>.tmp/` and renamed once every rank has finished, so a folder named `step_<N>` is complete.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.optim import Optimizer

TRAINER_STATE = "trainer_state.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
# Single-process runs save without a process group on purpose.
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / TRAINER_STATE).is_file()


def latest_checkpoint(root: Path) -> Path | None:
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and is_complete(p)]
    return max(steps)[1] if steps else None


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: Optimizer,
                    trainer_state: dict[str, Any], is_main: bool) -> Path:
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    if is_main:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state))
    _barrier()
    if is_main:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    _barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """Restore model and optimizer in place; return the trainer state saved beside them."""
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if not is_complete(path):
        raise ValueError(
            f"checkpoint '{path}' is incomplete (no .metadata or {TRAINER_STATE}): it was probably cut off while "
            "being written; point checkpoint.resume at an earlier step_<N> folder"
        )
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as err:  # CheckpointException derives from BaseException
        cause = [line for line in str(err).splitlines() if line.strip()][-1]
        raise ValueError(
            f"checkpoint '{path}' does not fit this model/optimizer (different model shape or corrupt files): "
            f"{cause[:500]}"
        ) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads((path / TRAINER_STATE).read_text())
