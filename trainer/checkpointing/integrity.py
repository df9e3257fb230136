"""Checksums for step folders: a manifest of every file's size and XXH3-64 hash, written when a save completes
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
from pathlib import Path

import torch.distributed as dist
import xxhash

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


def verify_manifest(folder: Path, skip: set[str]) -> str | None:
    """What is wrong with the folder's files, or None if every one matches its manifest entry.  Collective: every
    rank calls it.  A folder without a manifest (written before hylo kept them) passes unverified."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return None
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
