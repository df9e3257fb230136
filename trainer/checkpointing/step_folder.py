"""What every checkpoint format shares: the step folders, their COMPLETE marker, the trainer state beside the
shards, each rank's RNG states, and the write protocol (tmp folder -> COMPLETE -> rename -> prune).

  <run>/checkpoints/step_<N>/
    ...                    the format's own files (DCP shards + .metadata, or DeepSpeed's model/optimizer states)
    trainer_state.json     step, tokens, LR schedule, data-loader position, the engine that wrote it, ...
    rng/rank_<r>.json      each rank's RNG states (torch, CUDA, numpy, python)
    COMPLETE               written last: a folder without it is never loaded

A step is written into `step_<N>.tmp/` and renamed when complete, so a crash mid-save leaves the earlier
checkpoints untouched and the partial one ignored.  Formats subclass `StepFolderWriter` with `_collect` (what to
write) and `_write` (how); loaders start from `read_trainer_state` and end with `restore_rng`.
"""

from __future__ import annotations

import base64
import errno
import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trainer.errors import CheckpointError, CheckpointWriteError

TRAINER_STATE = "trainer_state.json"
MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step_(\d+)$")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_complete(path: Path) -> bool:
    """The marker is written after every shard and the trainer state: it alone says the folder is whole."""
    return (path / MARKER).is_file() and (path / TRAINER_STATE).is_file()


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and is_complete(p))


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def read_trainer_state(path: Path, expect_engine: str | None = None) -> dict[str, Any]:
    """trainer_state.json of a complete step folder; with `expect_engine`, refuse one written by another engine."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if not is_complete(path):
        raise CheckpointError(f"checkpoint '{path}' is incomplete (no {MARKER} marker or {TRAINER_STATE}): it was "
                              "cut off while being written; point checkpoint.resume at an earlier step_<N> folder")
    try:
        meta = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint '{path}': {TRAINER_STATE} is unreadable ({err})") from None
    engine = meta.get("engine", "torch")
    if expect_engine is not None and engine != expect_engine:
        raise CheckpointError(f"checkpoint '{path}' was written by train.engine={engine}; this run uses "
                              f"train.engine={expect_engine}. Resume with the engine that wrote it, or start a new "
                              f"run from its weights (hylo export, then model.init_from)")
    return meta


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


def restore_rng(path: Path) -> None:
    """This rank's RNG states from a step folder; absent when resuming on more ranks than saved (those ranks keep
    the seed's)."""
    saved = path / "rng" / f"rank_{rank()}.json"
    if saved.is_file():
        set_rng_state(json.loads(saved.read_text()))


def _jsonable(x):
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


# ---------------------------------------------------------------------------------------------------- write
class StepFolderWriter:
    """Saves, finalises and prunes the step folders of one run; a format fills in `_collect` and `_write`.

    `save` writes synchronously unless the format starts a background write in `_start` (returning a future);
    `poll` finalises a finished background write, `wait` blocks for it."""

    def __init__(self, root: Path, *, keep_last: int = 0):
        self.root, self.keep_last = root, keep_last
        self.pending: tuple[Any, Path, Path, dict] | None = None  # (future, tmp, final, trainer state)
        self.last_stall = 0.0  # seconds the last save blocked the training loop

    def _collect(self, model, optimizer, trainer_state: dict[str, Any]) -> tuple[Any, dict]:
        """(what `_write` writes, the JSON trainer state)."""
        raise NotImplementedError

    def _write(self, tmp: Path, state: Any) -> None:
        raise NotImplementedError

    def _start(self, tmp: Path, state: Any):
        """Begin writing in the background and return a future, or None to write now."""
        return None

    def save(self, step: int, model, optimizer, trainer_state: dict[str, Any]) -> Path:
        """Write step_<step>; returns its final path (complete now, or once the background write finishes)."""
        start = time.perf_counter()
        self.wait()  # one save in flight at a time
        final, tmp = self.root / f"step_{step}", self.root / f"step_{step}.tmp"
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                (tmp / "rng").mkdir(parents=True)
            except OSError as err:
                self._abandon(tmp, err)
        barrier()
        state, meta = self._collect(model, optimizer, trainer_state)
        try:
            (tmp / "rng" / f"rank_{rank()}.json").write_text(json.dumps(rng_state()))
            future = self._start(tmp, state)
            if future is not None:
                self.pending = (future, tmp, final, meta)
            else:
                self._write(tmp, state)
                self._finalise(tmp, final, meta)
        except OSError as err:
            self._abandon(tmp, err)
        self.last_stall = time.perf_counter() - start
        return final

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
        barrier()
        self._finalise(tmp, final, meta)

    def _finalise(self, tmp: Path, final: Path, meta: dict) -> None:
        barrier()  # every rank's shards are written
        if rank() == 0:
            try:
                (tmp / TRAINER_STATE).write_text(json.dumps(meta))
                (tmp / MARKER).write_text(f"complete at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            except OSError as err:
                self._abandon(tmp, err)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune(keep=final)
        barrier()

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
        raise CheckpointWriteError(f"could not write checkpoint {tmp.name}{hint}: {err}. Earlier checkpoints are "
                                   "intact; free space or point run.dir elsewhere, then resume") from None
