"""Checkpoints with torch.distributed.checkpoint (DCP): `<run>/checkpoints/step_<N>/`.

What a step folder holds:
  DCP shards + .metadata   model parameters and optimizer *tensors* (sharded, reshardable across DP/CP layouts)
  trainer_state.json       step, tokens, LR schedule, data-loader position, optimizer hyper-parameters
  rng/rank_<r>.json        each rank's RNG states (torch, CUDA, numpy, python)
  COMPLETE                 written last: a folder without it is never loaded
Nothing is ever unpickled: only tensors go through DCP (the load planner refuses pickled bytes) and everything
else is JSON.  A step is written into `step_<N>.tmp/` and renamed when complete, so a crash mid-save leaves the
earlier checkpoints untouched and the partial one ignored.  Saves can run in the background (`dcp.async_save`);
`keep_last` prunes old steps once a newer one is complete.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import random
import re
import shutil
import signal
import time
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.optim import Optimizer

from trainer.faults import fault_due

TRAINER_STATE = "trainer_state.json"
MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step_(\d+)$")
# Single-process runs save without a process group on purpose.
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or loaded; the message says what to do."""


class _NoPickleLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"checkpoint entry '{read_item.dest_index.fqn}' is pickled bytes; hylo checkpoints "
                              "hold only tensors and JSON, and it refuses to unpickle anything")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_complete(path: Path) -> bool:
    """The marker, the trainer state and the shards' index: DCP's .metadata, or DeepSpeed's model states."""
    shards = (path / ".metadata").is_file() or any(path.glob("*model_states.pt"))
    return (path / MARKER).is_file() and (path / TRAINER_STATE).is_file() and shards


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and is_complete(p))


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


# ---------------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
             "python": _jsonable(random.getstate()),
             "numpy": _jsonable(np.random.get_state())}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def _jsonable(x):
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


# ---------------------------------------------------------------------------------------------------- save
def _split_optimizer(optim_sd: dict) -> tuple[dict, list]:
    """DCP gets only tensors: the per-parameter state; the param groups' hyper-parameters go to JSON."""
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in optim_sd["param_groups"]]
    return optim_sd["state"], groups


class Checkpointer:
    """Saves (sync or async), prunes, and finalises checkpoints for one run."""

    def __init__(self, root: Path, *, keep_last: int = 0, async_save: bool = False):
        self.root, self.keep_last, self.async_save = root, keep_last, async_save
        self.pending: tuple[Future, Path, Path, dict] | None = None
        self.last_stall = 0.0  # seconds the last save blocked the training loop

    def save(self, step: int, model: nn.Module, optimizer: Optimizer, trainer_state: dict[str, Any]) -> Path:
        """Write step_<step>; returns its final path (complete now, or once the background write finishes)."""
        start = time.perf_counter()
        self.wait()  # one save in flight at a time
        final, tmp = self.root / f"step_{step}", self.root / f"step_{step}.tmp"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                (tmp / "rng").mkdir(parents=True)
            except OSError as err:
                self._abandon(tmp, err)
        _barrier()
        state, meta = self._collect(model, optimizer, trainer_state)
        try:
            (tmp / "rng" / f"rank_{_rank()}.json").write_text(json.dumps(rng_state()))
            if fault_due("kill_in_save", trainer_state["step"], _rank()):
                self._write(tmp, state)
                os.kill(os.getpid(), signal.SIGKILL)
            if self.async_save:
                future = dcp.async_save(state, checkpoint_id=str(tmp))
                self.pending = (future, tmp, final, meta)
            else:
                self._write(tmp, state)
                self._finalise(tmp, final, meta)
        except OSError as err:
            self._abandon(tmp, err)
        self.last_stall = time.perf_counter() - start
        return final

    def _collect(self, model: nn.Module, optimizer: Optimizer, trainer_state: dict[str, Any]) -> tuple[dict, dict]:
        """(tensors for the shards, JSON metadata)."""
        model_sd, optim_sd = get_state_dict(model, optimizer)
        optim_tensors, groups = _split_optimizer(optim_sd)
        return {"model": model_sd, "optim": optim_tensors}, dict(trainer_state, optimizer_param_groups=groups)

    def _write(self, tmp: Path, state: dict) -> None:
        dcp.save(state, checkpoint_id=str(tmp))

    def poll(self) -> None:
        """Finalise a background save if it has finished (call once per step)."""
        if self.pending is not None and self.pending[0].done():
            self.wait()

    def wait(self) -> None:
        """Block until the background save (if any) is written and finalised."""
        if self.pending is None:
            return
        future, tmp, final, meta = self.pending
        self.pending = None
        try:
            future.result()
        except OSError as err:
            self._abandon(tmp, err)
        _barrier()
        self._finalise(tmp, final, meta)

    def _finalise(self, tmp: Path, final: Path, meta: dict) -> None:
        _barrier()  # every rank's shards are written
        if _rank() == 0:
            try:
                (tmp / TRAINER_STATE).write_text(json.dumps(meta))
                (tmp / MARKER).write_text(f"complete at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            except OSError as err:
                self._abandon(tmp, err)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune(keep=final)
        _barrier()

    def _prune(self, keep: Path) -> None:
        if self.keep_last <= 0:
            return
        for _, path in complete_checkpoints(self.root)[: -self.keep_last]:
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _abandon(tmp: Path, err: OSError) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        hint = " (the disk is full)" if err.errno == errno.ENOSPC else ""
        raise CheckpointError(f"could not write checkpoint {tmp.name}{hint}: {err}. Earlier checkpoints are intact; "
                              "free space or point run.dir elsewhere, then resume") from None


# ---------------------------------------------------------------------------------------------------- load
def load_checkpoint(path: Path, model: nn.Module, optimizer: Optimizer | None) -> dict[str, Any]:
    """Restore model (and optimizer) in place from any DP/CP layout; return the trainer state saved beside them."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if not is_complete(path):
        raise CheckpointError(
            f"checkpoint '{path}' is incomplete (no {MARKER} marker, .metadata or {TRAINER_STATE}): it was cut off "
            "while being written; point checkpoint.resume at an earlier step_<N> folder"
        )
    try:
        meta = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint '{path}': {TRAINER_STATE} is unreadable ({err})") from None
    if meta.get("engine", "torch") == "deepspeed":
        if optimizer is not None:
            raise CheckpointError(f"checkpoint '{path}' was written by train.engine=deepspeed; resume it with "
                                  "train.engine=deepspeed, or start a new run from its weights (hylo export, then "
                                  "model.init_from)")
        from trainer.deepspeed_engine import consolidated_weights  # weights only: eval, generate, export

        try:
            model.load_state_dict(consolidated_weights(path))
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint '{path}' does not fit this model: {str(err).splitlines()[0]}") from None
        return meta
    if optimizer is None:
        model_sd = get_state_dict(model, [])[0]
        state: dict[str, Any] = {"model": model_sd}
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
    else:
        groups = meta["optimizer_param_groups"]
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict={"state": state["optim"], "param_groups": groups})
    rng = path / "rng" / f"rank_{_rank()}.json"
    if rng.is_file():  # absent when resuming on more ranks than saved: those start from the seed
        set_rng_state(json.loads(rng.read_text()))
    return meta
