"""Verifying a step folder before anything loads it: checksums of every file, and DCP's metadata read by hylo's own
restricted unpickler (so a crafted or truncated `.metadata` is one line, and auto-resume falls back past it,
before DCP ever touches it).

Checksums: a manifest of every file's size and XXH3-64 hash, written when a save completes
and checked before anything is loaded, so a flipped bit, a zeroed block or an edited JSON file is refused by name
instead of silently changing the run.

  <step folder>/MANIFEST.json   {"format": 1, "hash": "xxh3_64", "files": {"<relative path>": [size, hash], ...}}

XXH3 over a memory map of each file runs at memory speed (~14 GB/s on one core here, CRC32 ~2 GB/s), so checking
costs a fraction of the load that follows it, which then reads the same pages from the cache.

Both sides split the work over the ranks (rank r hashes every world-th file, the results are gathered), so a
large checkpoint costs one read of each byte in all, shared by the ranks.  The manifest covers every file but
itself and the COMPLETE marker, which is written after it.
"""

from __future__ import annotations

import json
import mmap
import pickle
from pathlib import Path

import torch
import torch.distributed as dist
import xxhash
from torch.distributed.checkpoint.metadata import Metadata

from hylo.trainer.errors import CheckpointError

MANIFEST = "MANIFEST.json"
FORMAT = 1
HASH = "xxh3_64"


def file_hash(path: Path) -> int:
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:  # an empty file cannot be memory-mapped
            return xxhash.xxh3_64_intdigest(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return xxhash.xxh3_64_intdigest(mapped)


def _files(folder: Path, skip: set[str]) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name not in skip)


def _share(items: list[str]) -> list[str]:
    """This rank's part of `items`."""
    if not dist.is_initialized():
        return items
    return items[dist.get_rank()::dist.get_world_size()]


def _gather(part: dict) -> dict:
    if not dist.is_initialized():
        return part
    parts: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def write_manifest(folder: Path, skip: set[str]) -> None:
    """Every rank calls this once the folder's files are all written; rank 0 writes the manifest."""
    names = _files(folder, skip | {MANIFEST})
    entries = _gather({name: [(folder / name).stat().st_size, file_hash(folder / name)] for name in _share(names)})
    if not dist.is_initialized() or dist.get_rank() == 0:
        manifest = {"format": FORMAT, "hash": HASH, "files": entries}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=0, sort_keys=True))


def verify_manifest(folder: Path, skip: set[str], required: bool = True) -> str | None:
    """What is wrong with the folder's files, or None if every one matches its manifest entry.  Collective: every
    rank calls it.  A missing manifest is a failure unless not `required` (the run that saved the folder had
    checkpoint.checksums=false)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        if not required:
            return None
        return (f"its {MANIFEST} is missing (deleted after the save?), so its files cannot be verified; restore "
                "it, or load it unverified with checkpoint.checksums=false")
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("hash") != HASH:
            return f"its {MANIFEST} uses the hash {manifest.get('hash')!r}, which this hylo does not know"
        expected = {str(k): (int(v[0]), int(v[1])) for k, v in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        return f"its {MANIFEST} is unreadable ({err})"
    present = set(_files(folder, skip | {MANIFEST}))
    if missing := sorted(set(expected) - present):
        return f"file {missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    if extra := sorted(present - set(expected)):
        return f"file {extra[0]} is not in its {MANIFEST} (added after the save?)"
    problems = {}
    for name in _share(sorted(expected)):
        size, crc = expected[name]
        actual_size = (folder / name).stat().st_size
        if actual_size != size:
            problems[name] = f"file {name} has {actual_size} bytes, the save wrote {size}"
        elif file_hash(folder / name) != crc:
            problems[name] = f"file {name} does not match its checksum (changed or damaged on disk)"
    problems = _gather(problems)
    return problems[min(problems)] if problems else None


def verify_files(folder: Path, names: list[str]) -> str | None:
    """What is wrong with these few files of the folder (not collective: a small file read before the process
    group exists, e.g. the trainer state a resume takes its config from), or None if each matches its manifest
    entry or the folder was saved without a manifest (checkpoint.checksums=false)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return None  # verify_manifest, run before anything else is loaded, says whether one was required
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {MANIFEST} is unreadable ({err})"
    for name in names:
        if name not in files:
            return f"file {name} is not in its {MANIFEST} (added after the save?)"
        size, crc = int(files[name][0]), int(files[name][1])
        path = folder / name
        if not path.is_file():
            return f"file {name} is missing"
        if path.stat().st_size != size or file_hash(path) != crc:
            return f"file {name} does not match its checksum (changed or damaged on disk)"
    return None


# ------------------------------------------------------------------------------------------ DCP's .metadata
# What DCP's .metadata holds: its metadata classes, tensor sizes, dtypes and layouts, and file paths.
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_METADATA_TYPES = {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                   "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"}
_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("torch.distributed.checkpoint.filesystem",
            "_StorageInfo"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
            ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module == _METADATA_MODULE and name in _METADATA_TYPES) or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise CheckpointError(f"its .metadata asks to load {module}.{name}, which is not part of DCP's metadata; "
                              "hylo refuses to unpickle it (the file was crafted or damaged)")


def read_dcp_metadata(folder: Path) -> Metadata:
    """DCP's `.metadata` of a step folder, admitting only the types DCP writes there (as
    `torch.load(weights_only=True)` does for tensors); a CheckpointError saying what is wrong otherwise."""
    try:
        with open(folder / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - missing, truncated or garbage: any reading or unpickling error
        raise CheckpointError(f"its .metadata is unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"its .metadata holds a {type(metadata).__name__}, not DCP metadata")
    return metadata
