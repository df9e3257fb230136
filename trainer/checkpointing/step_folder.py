"""What every checkpoint format shares: the step folders, their COMPLETE marker, the trainer state beside the
shards, each rank's RNG states, and the write protocol (tmp folder -> COMPLETE -> rename -> prune).

  <run>/checkpoints/step_<N>/
    ...                    the format's own files (DCP shards + .metadata, or DeepSpeed's model/optimizer states)
    trainer_state.json     step, tokens, LR schedule, data-loader position, the engine that wrote it, ...
    rng/rank_<r>.json      each rank's RNG states (torch, CUDA, numpy, python)
    MANIFEST.json          size and XXH3 hash of every file above (integrity.py), checked before loading
    COMPLETE               written last: a folder without it is never loaded

A step is written into `step_<N>.tmp/` and renamed when complete, so a crash mid-save leaves the earlier
checkpoints untouched and the partial one ignored.  A complete folder is never removed before its replacement
is in place: a re-save moves the old `step_<N>` aside to `step_<N>.old` first, pruning renames a folder to
`step_<N>.pruning` before deleting it, and `recover_leftovers` sorts out what a crash left at the next start.
Formats subclass `StepFolderWriter` with `_collect` (what to write) and `_write` (how); loaders start from
`read_trainer_state` (after `verify_checkpoint`) and end with `restore_rng`.
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
from torch.distributed.checkpoint.api import CheckpointException

from hylo.trainer.checkpointing.integrity import read_dcp_metadata, verify_files, verify_manifest, write_manifest
from hylo.trainer.errors import CheckpointError, CheckpointWriteError

TRAINER_STATE = "trainer_state.json"
MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step_(\d+)$")
LEFTOVER = re.compile(r"^step_(\d+)\.(tmp|old|pruning)$")
DISK_FULL = ("the disk is full: free space or lower checkpoint.keep_last (from 2 up, the oldest checkpoint is removed "
             "before each save, so the disk never holds more than keep_last)")
# The trainer state's required keys and their JSON types: a hand-edited or truncated file is refused by name.
STATE_SCHEMA = {"step": int, "data": dict, "scheduler": dict}


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_complete(path: Path) -> bool:
    """The marker is written after every shard and the trainer state: it says the folder is whole."""
    return (path / MARKER).is_file() and (path / TRAINER_STATE).is_file()


def incomplete_reason(path: Path) -> str:
    """Why a step folder is not complete: cut off while being written, or its trainer state removed since."""
    if not (path / MARKER).is_file():
        return f"incomplete (no {MARKER} marker: cut off while being written)"
    return f"damaged ({MARKER} is there but {TRAINER_STATE} is missing: deleted after the save?)"


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
        raise CheckpointError(f"checkpoint '{path}' is {incomplete_reason(path)}; point checkpoint.resume at an "
                              "earlier step_<N> folder")
    try:
        meta = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint '{path}': {TRAINER_STATE} is unreadable ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint '{path}': {TRAINER_STATE} is not a JSON object")
    for key, kind in STATE_SCHEMA.items():
        value = meta.get(key)
        if key not in meta:
            raise CheckpointError(f"checkpoint '{path}': {TRAINER_STATE} has no '{key}' entry (not written by "
                                  "hylo, or edited); point checkpoint.resume at another step_<N> folder")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"checkpoint '{path}': {TRAINER_STATE} has {key}={value!r}, expected a "
                                  f"{kind.__name__}")
    engine = meta.get("engine", "torch")
    if expect_engine is not None and engine != expect_engine:
        raise CheckpointError(f"checkpoint '{path}' was written by train.engine={engine}; this run uses "
                              f"train.engine={expect_engine}. Resume with the engine that wrote it, give this run "
                              "its own run.dir, or start a new run from its weights (hylo export, then "
                              "model.init_from)")
    return meta


def verified_trainer_state(path: Path) -> dict[str, Any]:
    """read_trainer_state, once trainer_state.json has matched its manifest entry: what a resume reads before the
    process group exists and the full verification runs (the config it continues with) comes only from a file
    that verifies."""
    path = Path(path)
    if is_complete(path):
        problem = verify_files(path, [TRAINER_STATE])
        if problem:
            raise CheckpointError(f"checkpoint '{path}' is corrupt: {problem}. Point checkpoint.resume at an earlier "
                                  "step_<N> folder (or checkpoint.resume=auto to take the newest that verifies)")
    return read_trainer_state(path)


def config_checkpoint(root: Path, explicit: Path | None) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint a resume takes its config from, and its trainer state: the named one, or the newest complete
    one under `root` whose trainer state verifies.  The trainer's full verification normally chooses the same
    folder; where it does not (a damaged shard), the trainer compares the two configs before loading."""
    if explicit is not None:
        return explicit, verified_trainer_state(explicit)
    for _, path in reversed(complete_checkpoints(root)):
        try:
            return path, verified_trainer_state(path)
        except CheckpointError:
            continue  # the trainer skips it too, and says so
    return None


def lineage_of(path: Path) -> str | None:
    """The lineage id a checkpoint records (every step of one run, through any number of resumes, shares it);
    None for a checkpoint written before lineages were recorded, or one whose trainer state is unreadable."""
    try:
        lineage = json.loads((Path(path) / TRAINER_STATE).read_text()).get("lineage")
    except (OSError, ValueError, AttributeError):
        return None
    return lineage if isinstance(lineage, str) else None


def foreign_checkpoints(root: Path, lineage: str, resume_from: Path | None) -> list[tuple[Path, str]]:
    """The complete checkpoints under `root` that belong to another run than the one continuing `lineage` from
    `resume_from` (None: a new run), with their lineage.  One written before lineages were recorded belongs to
    this run only when it resumes from that same folder of checkpoints."""
    ours_by_place = resume_from is not None and Path(resume_from).resolve().parent == Path(root).resolve()
    foreign = []
    for _, path in complete_checkpoints(root):
        theirs = lineage_of(path)
        if (theirs is not None and theirs != lineage) or (theirs is None and not ours_by_place):
            foreign.append((path, theirs or "unrecorded"))
    return foreign


def find_checkpoint(path: str | Path, command: str) -> Path:
    """What a user passes as `--checkpoint`: a step folder, a run's `checkpoints/` folder or a run dir (their newest
    checkpoint that verifies).  Refuses with a message naming `command` and what was looked for."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"hylo {command}: --checkpoint '{path}' does not exist; give a run dir, its "
                              "checkpoints/ folder or a step_<N> folder")
    if STEP_DIR.match(path.name) or (path / TRAINER_STATE).is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = verified_checkpoint(root, None, say=lambda msg: print(msg, flush=True))
    if found is None:
        raise CheckpointError(f"hylo {command}: no complete checkpoint under '{root}'; give a run dir, its "
                              "checkpoints/ folder or a step_<N> folder")
    print(f"[hylo] {command}: using {found} (the newest checkpoint under {root})", flush=True)
    return found


def verify_checkpoint(path: Path, checksums: bool = True) -> str | None:
    """What is wrong with a complete step folder, or None.  With `checksums`, every file must match its manifest,
    which must exist unless the run that saved the folder turned checksums off; a torch-engine folder's DCP
    metadata must read with hylo's own restricted reader, before DCP touches it.  Collective: every rank calls it,
    each hashing its share of the files."""
    path = Path(path)
    if checksums:
        problem = verify_manifest(path, skip={MARKER}, required=_saved_with_manifest(path))
        if problem:
            return problem
    if (path / ".metadata").is_file():
        try:
            read_dcp_metadata(path)
        except CheckpointError as err:
            return str(err)
    return None


def _saved_with_manifest(path: Path) -> bool:
    """Whether the run that saved this folder wrote a manifest (checkpoint.checksums, true unless turned off)."""
    try:
        return json.loads((path / TRAINER_STATE).read_text())["config"]["checkpoint"]["checksums"] is not False
    except (OSError, ValueError, KeyError, TypeError):
        return True


def verified_checkpoint(root: Path, explicit: Path | None, say=print, verify: bool = True) -> Path | None:
    """The checkpoint to resume from.  An explicit path must verify, or the run is refused; otherwise the newest
    complete checkpoint under `root` that verifies, each one skipped said out loud.  Collective.  With
    `verify=False` (checkpoint.checksums=false) the manifests are not read (the DCP metadata still is)."""
    if explicit is not None:
        read_trainer_state(explicit)  # exists and complete
        problem = verify_checkpoint(explicit, checksums=verify)
        if problem:
            raise CheckpointError(f"checkpoint '{explicit}' is corrupt: {problem}. Point checkpoint.resume at an "
                                  "earlier step_<N> folder (or checkpoint.resume=auto to take the newest that "
                                  "verifies)")
        return explicit
    rejected = []
    if root.is_dir():
        for path in sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and not is_complete(p)):
            if (path / MARKER).is_file():  # marked complete, then damaged: as loud as any corruption
                rejected.append(f"{path.name}: {incomplete_reason(path)}")
                if rank() == 0:
                    say(f"[hylo] WARNING: skipping checkpoint {path}: {incomplete_reason(path)}")
            elif rank() == 0:
                say(f"[hylo] skipping checkpoint {path}: {incomplete_reason(path)}")
    for _, path in reversed(complete_checkpoints(root)):
        problem = verify_checkpoint(path, checksums=verify)
        if problem is None:
            return path
        rejected.append(f"{path.name}: {problem}")
        if rank() == 0:
            say(f"[hylo] WARNING: skipping checkpoint {path}: it is corrupt ({problem}); trying an earlier one")
    if rejected:  # starting from scratch would silently overwrite a run that exists
        raise CheckpointError(f"every checkpoint under {root} is corrupt ({'; '.join(rejected)}). Restore one "
                              "from a backup, or move them aside to start the run again from scratch")
    return None


def recover_leftovers(root: Path, say=print) -> None:
    """What a crash during a save or a prune left behind (rank 0, before anything is loaded): a complete folder
    moved aside for its replacement is moved back if the replacement never arrived; partial folders and folders
    being pruned are removed.  One line each."""
    if rank() != 0 or not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        match = LEFTOVER.match(path.name)
        if not match:
            continue
        final = root / f"step_{match.group(1)}"
        kind = match.group(2)
        if kind == "old" and not final.exists() and is_complete(path):
            path.rename(final)
            say(f"[hylo] recovered {final.name}: a re-save was cut off before its replacement was in place")
        else:
            shutil.rmtree(path, ignore_errors=True)
            why = {"tmp": "a save cut off before it completed", "old": "replaced by a complete re-save",
                   "pruning": "a prune cut off halfway"}[kind]
            say(f"[hylo] removed {path.name} ({why})")


def _disk_full(err: BaseException) -> bool:
    """ENOSPC, also when DCP wraps it (CheckpointException carries each rank's failure as text)."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    text = str(err)
    return "No space left on device" in text or "Errno 28" in text or "unexpected pos" in text


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

    def __init__(self, root: Path, *, keep_last: int = 0, checksums: bool = True):
        self.root, self.keep_last, self.checksums = root, keep_last, checksums
        self._vote_group = None  # created on the first background save's poll, on every rank at once
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
            self._prune_before(step)
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
        except (Exception, CheckpointException) as err:  # DCP's CheckpointException included
            self._abandon(tmp, err)
        self.last_stall = time.perf_counter() - start
        return final

    def poll(self) -> None:
        """Finalise a background save once it has finished on every rank (call once per step on every rank: the
        ranks agree, so they all enter the finalising barriers at the same step)."""
        if self.pending is None:
            return
        done = self.pending[0].done()
        if dist.is_initialized():
            flag = torch.tensor([int(done)], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._agreement_group())
            done = bool(flag.item())
        if done:
            self.wait()

    def _agreement_group(self):
        """A CPU (gloo) group for `poll`'s one-integer vote, so it never needs the accelerator's group."""
        if self._vote_group is None:
            self._vote_group = dist.new_group(backend="gloo")
        return self._vote_group

    def wait(self) -> None:
        """Block until the background save (if any) is written and finalised."""
        if self.pending is None:
            return
        future, tmp, final, meta = self.pending
        self.pending = None
        try:
            future.result()
        except (Exception, CheckpointException) as err:
            self._abandon(tmp, err)
        barrier()
        self._finalise(tmp, final, meta)

    def _finalise(self, tmp: Path, final: Path, meta: dict) -> None:
        barrier()  # every rank's shards are written
        try:
            if rank() == 0:
                (tmp / TRAINER_STATE).write_text(json.dumps(meta))
            barrier()
            if self.checksums:
                write_manifest(tmp, skip={MARKER})
            if rank() == 0:
                (tmp / MARKER).write_text(f"complete at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        except OSError as err:
            self._abandon(tmp, err)
        if rank() == 0:
            self._replace(tmp, final)
            self._prune(keep=final)
        barrier()

    @staticmethod
    def _replace(tmp: Path, final: Path) -> None:
        """tmp becomes final; an existing final is moved aside first and deleted only once tmp is in place, so a
        crash at any point leaves one complete step_<N> (or a step_<N>.old that `recover_leftovers` restores)."""
        aside = final.with_name(final.name + ".old")
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            final.rename(aside)
        tmp.rename(final)
        shutil.rmtree(aside, ignore_errors=True)

    def _prune(self, keep: Path) -> None:
        if self.keep_last <= 0:
            return
        for _, path in complete_checkpoints(self.root)[: -self.keep_last]:
            if path != keep:
                self._remove(path)

    def _prune_before(self, step: int) -> None:
        """With keep_last >= 2, the checkpoints this save would prune go first, so the disk never holds more than
        keep_last (a full disk is then fixed by lowering it); keep_last=1 keeps its one checkpoint until the new one
        is complete."""
        if self.keep_last < 2:
            return
        others = [(s, path) for s, path in complete_checkpoints(self.root) if s != step]
        # never the newest one before this step: it may be the one this run resumed from, past a damaged newer one
        older = [path for s, path in others if s < step][:-1]
        for path in older[: max(len(others) + 1 - self.keep_last, 0)]:
            self._remove(path)

    @staticmethod
    def _remove(path: Path) -> None:
        doomed = path.with_name(path.name + ".pruning")  # never again taken for a complete checkpoint
        path.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    @staticmethod
    def _abandon(tmp: Path, err: BaseException) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(err):
            raise CheckpointWriteError(f"could not write checkpoint {tmp.name}: {DISK_FULL}. The partial folder "
                                       "was removed; earlier checkpoints are intact, so the run resumes from the "
                                       "last of them") from None
        if not isinstance(err, (OSError, CheckpointException)):
            raise err
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise CheckpointWriteError(f"could not write checkpoint {tmp.name}: {lines[-1] if lines else err!r}. Earlier "
                                   "checkpoints are intact; fix the cause, then resume") from None
