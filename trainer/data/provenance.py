"""Where a run's tokens come from, recorded in every checkpoint and compared on resume.

The loader's saved position (a document index, an offset, a global sequence number) only means something for
the exact source it was taken on: with a file removed or added the same position names other documents, and
the run would go on silently on different data.  So the checkpoint records the source — each file's path, size
and modification time, or the Hugging Face dataset's name and split, or the token-shard index's checksum — and
the tokenizer's hash, and a resume on a changed source is refused with what changed, unless the user opts in
with `data.allow_source_change=true`.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Any

from hylo.trainer.config import DataConfig
from hylo.trainer.errors import DataError

MAX_LISTED = 20_000  # beyond this many files only their digest is stored (the message then cannot name a file)


def data_provenance(cfg: DataConfig, tokenizer) -> dict[str, Any]:
    """The source of `cfg` as JSON: what a resume compares against."""
    from hylo.trainer.data.shards import INDEX, is_shard_dir, tokenizer_fingerprint
    from hylo.trainer.data.sources import resolve_source

    if cfg.format == "mqar":
        return {"kind": "mqar"}
    if cfg.sources:  # a mixture: each source's own record, by name (weights are settings, not the source)
        from hylo.trainer.data.mixture import source_data

        return {"kind": "mixture", "sources": {src.name: data_provenance(source_data(cfg, src), tokenizer)
                                               for src in cfg.sources}}
    record: dict[str, Any] = {"tokenizer": tokenizer_fingerprint(tokenizer)}
    if cfg.val_fraction:  # which documents train is part of the source
        record["val_fraction"] = cfg.val_fraction
    if cfg.format == "tokens" or is_shard_dir(cfg.path):
        index = Path(cfg.path) / INDEX
        return {**record, "kind": "tokens", "path": str(Path(cfg.path).resolve()),
                "index_crc32": zlib.crc32(index.read_bytes()) if index.is_file() else None}
    builder, source = resolve_source(cfg)
    if builder == "saved":  # datasets' own fingerprints say whether the saved data changed
        states = sorted(Path(source).rglob("state.json"))
        fingerprints = {str(p.parent.relative_to(source)): json.loads(p.read_text()).get("_fingerprint")
                        for p in states}
        return {**record, "kind": "saved", "path": str(Path(source).resolve()), "split": cfg.hf_split,
                "fingerprints": fingerprints}
    if builder == "hf":
        return {**record, "kind": "hf", "name": source, "split": cfg.hf_split}
    files = []
    for name in source:
        try:
            st = os.stat(name)
        except OSError as err:
            raise DataError(f"cannot read data file '{name}': {err.strerror}") from None
        files.append([str(Path(name).resolve()), st.st_size, st.st_mtime_ns])
    digest = hashlib.sha256(repr(files).encode()).hexdigest()
    return {**record, "kind": "files", "n_files": len(files), "digest": digest,
            **({"files": files} if len(files) <= MAX_LISTED else {})}


def source_change(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """What differs between the source a checkpoint was taken on and this run's, in words; None if nothing."""
    if saved.get("kind") != now.get("kind"):
        return f"the data source changed kind ({saved.get('kind')} -> {now.get('kind')})"
    if now.get("kind") == "mixture":
        before, after = saved["sources"], now["sources"]
        changes = [f"source '{n}' was removed" for n in before if n not in after]
        changes += [f"source '{n}' was added" for n in after if n not in before]
        changes += [f"source '{n}': {change}" for n in before if n in after
                    if (change := source_change(before[n], after[n]))]
        return "; ".join(changes) or None
    if saved.get("tokenizer") != now.get("tokenizer"):
        return "the tokenizer changed (data.tokenizer holds another vocabulary)"
    if saved.get("val_fraction", 0) != now.get("val_fraction", 0):
        return (f"data.val_fraction changed ({saved.get('val_fraction', 0)} -> {now.get('val_fraction', 0)}): "
                "other documents train now")
    kind = now.get("kind")
    if kind == "tokens":
        if saved.get("index_crc32") != now.get("index_crc32"):
            return f"the token shards at {now['path']} were rewritten (their index.json changed)"
        return None
    if kind in ("hf", "saved"):  # a hub dataset by name, a save_to_disk folder by path (and its fingerprints)
        key = "name" if kind == "hf" else "path"
        if (saved.get(key), saved.get("split")) != (now.get(key), now.get("split")):
            return f"the dataset changed ({saved.get(key)}:{saved.get('split')} -> {now[key]}:{now['split']})"
        if saved.get("fingerprints") != now.get("fingerprints"):
            return f"the saved dataset in {now['path']} was saved again (its fingerprint changed)"
        return None
    if kind != "files" or saved.get("digest") == now.get("digest"):
        return None
    if "files" not in saved or "files" not in now:
        return f"the {saved.get('n_files')} data files changed ({now.get('n_files')} now)"
    before = {path: (size, mtime) for path, size, mtime in saved["files"]}
    after = {path: (size, mtime) for path, size, mtime in now["files"]}
    changes = [f"{path} was removed" for path in sorted(set(before) - set(after))]
    changes += [f"{path} was added" for path in sorted(set(after) - set(before))]
    for path in sorted(set(before) & set(after)):
        (size, mtime), (new_size, new_mtime) = before[path], after[path]
        if size != new_size:
            changes.append(f"{path} changed size ({size} -> {new_size} bytes)")
        elif mtime != new_mtime:
            changes.append(f"{path} was modified (same size, new modification time)")
    if not changes:
        return None
    more = f" (and {len(changes) - 3} more changes)" if len(changes) > 3 else ""
    return "; ".join(changes[:3]) + more


def check_source(saved: dict[str, Any] | None, now: dict[str, Any], checkpoint: str, allow: bool) -> str | None:
    """Raise DataError if the source changed since the checkpoint (unless allowed); returns a note to print."""
    if saved is None:
        return f"[hylo] note: checkpoint {checkpoint} predates data provenance records; the data is not checked"
    change = source_change(saved, now)
    if change is None:
        return None
    if allow:
        return (f"[hylo] WARNING: the data changed since {checkpoint}: {change}. Continuing as "
                "data.allow_source_change=true asks: the saved position now points into different data")
    raise DataError(f"the data changed since checkpoint {checkpoint}: {change}. Resume on the same data, or set "
                    "data.allow_source_change=true to go on with the new data (the saved position then points into "
                    "a different document order: documents may be skipped or seen twice)")
