"""Pre-tokenized token shards: written once by `hylo tokenize --out DIR`, streamed from disk as memmaps.

DIR/index.json lists the shards (`tokens_NNNNN.bin`, uint16 when the vocabulary fits, else uint32) with their
token counts and CRC32s, plus the tokenizer's fingerprint.  The token stream is the shards concatenated (EOS after
every document).  Sequence j covers tokens [j*T, j*T + T + 1); each epoch visits all of them in a seeded random
order, so global sequence g is (epoch g // n, the (g % n)-th of that epoch's permutation) — a function of
(seed, epoch, g) alone.  The loader's state is just the next global index, so a run saved on 4 ranks resumes on
2 or 8 with no sequence skipped or repeated.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from trainer.errors import DataError

INDEX = "index.json"
FORMAT = "hylo-tokens-v1"


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def write_shards(texts: Iterable[str], tokenizer, out: Path, shard_tokens: int = 100_000_000,
                 batch: int = 64) -> dict:
    """Tokenize `texts` (EOS after each) into DIR/tokens_NNNNN.bin + index.json; returns the index."""
    from trainer.tokenizer import EOS

    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32
    eos = tokenizer.token_to_id(EOS)
    shards, current, count, crc = [], None, 0, 0

    def close():
        nonlocal current, count, crc
        if current is not None:
            current.close()
            shards[-1].update(tokens=count, crc32=crc)
        current, count, crc = None, 0, 0

    def write(ids: np.ndarray):
        nonlocal current, count, crc
        while len(ids):
            if current is None:
                name = f"tokens_{len(shards):05d}.bin"
                shards.append({"file": name})
                current = open(out / name, "wb")  # noqa: SIM115 (closed in close())
            room = shard_tokens - count
            part, ids = ids[:room], ids[room:]
            data = part.astype(dtype).tobytes()
            current.write(data)
            crc = zlib.crc32(data, crc)
            count += len(part)
            if count == shard_tokens:
                close()

    pending: list[str] = []
    for text in texts:
        pending.append(text)
        if len(pending) == batch:
            for enc in tokenizer.encode_batch(pending, add_special_tokens=False):
                write(np.asarray(enc.ids + [eos]))
            pending = []
    for enc in tokenizer.encode_batch(pending, add_special_tokens=False) if pending else []:
        write(np.asarray(enc.ids + [eos]))
    close()
    index = {"format": FORMAT, "dtype": np.dtype(dtype).name, "eos": eos,
             "vocab_size": tokenizer.get_vocab_size(), "tokenizer": tokenizer_fingerprint(tokenizer),
             "total_tokens": sum(s["tokens"] for s in shards), "shards": shards}
    (out / INDEX).write_text(json.dumps(index, indent=1))
    return index


def is_shard_dir(path: str) -> bool:
    return bool(path) and (Path(path) / INDEX).is_file()


class TokenShards:
    """The concatenated token stream of a shard directory, checked against its index when opened."""

    def __init__(self, path: str | Path, tokenizer=None, verify: bool = True):
        self.path = Path(path)
        try:
            self.index = json.loads((self.path / INDEX).read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"token shards '{path}': cannot read {INDEX} ({err}); rewrite them with "
                             "`hylo tokenize --out`") from None
        if self.index.get("format") != FORMAT:
            raise DataError(f"token shards '{path}': {INDEX} is not a {FORMAT} index")
        if tokenizer is not None and self.index["tokenizer"] != tokenizer_fingerprint(tokenizer):
            raise DataError(f"token shards '{path}' were written with another tokenizer than data.tokenizer; "
                             "point data.tokenizer at the one used by `hylo tokenize --out`")
        dtype = np.dtype(self.index["dtype"])
        self.arrays, self.files = [], []
        for shard in self.index["shards"]:
            file = self.path / shard["file"]
            expected = shard["tokens"] * dtype.itemsize
            size = file.stat().st_size if file.is_file() else -1
            if size != expected:
                what = "is missing" if size < 0 else f"has {size} bytes, the index says {expected}"
                raise DataError(f"token shard {file} {what} (truncated or replaced); re-run `hylo tokenize --out`")
            arr = np.memmap(file, dtype=dtype, mode="r") if expected else np.zeros(0, dtype)
            if verify and zlib.crc32(arr.tobytes()) != shard["crc32"]:
                raise DataError(f"token shard {file} fails its CRC32 check (corrupted); re-run `hylo tokenize --out`")
            self.arrays.append(arr)
            self.files.append((file, expected))
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        self.total = int(self.starts[-1])

    def slice(self, start: int, stop: int) -> np.ndarray:
        parts = []
        for i, arr in enumerate(self.arrays):
            lo, hi = max(start, self.starts[i]), min(stop, self.starts[i + 1])
            if lo < hi:
                file, expected = self.files[i]
                # a memory-mapped file truncated under us kills the process with SIGBUS on the next read
                if os.stat(file).st_size < expected:
                    raise DataError(f"token shard {file} shrank while training read it (truncated or replaced); "
                                    "restore it or re-run `hylo tokenize --out`, then resume")
                parts.append(arr[lo - self.starts[i]:hi - self.starts[i]])
        return np.concatenate(parts).astype(np.int32)


class ShardSequences:
    """Global sequence stream over token shards with the SequencePacker interface; state = next global index."""

    def __init__(self, shards: TokenShards, seq_len: int, seed: int):
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        self.n = (shards.total - 1) // seq_len
        if self.n < 1:
            raise DataError(f"token shards '{shards.path}' hold {shards.total} tokens: fewer than one sequence of "
                             f"{seq_len + 1}")
        self.next_index = 0
        self._perm_epoch, self._perm = -1, None

    def _sequence(self, g: int) -> np.ndarray:
        epoch, j = divmod(g, self.n)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        start = int(self._perm[j]) * self.seq_len
        return self.shards.slice(start, start + self.seq_len + 1)

    def next_sequence(self, keep: bool = True) -> np.ndarray | None:
        out = self._sequence(self.next_index) if keep else None
        self.next_index += 1
        return out

    def state_dict(self) -> dict:
        return {"kind": "tokens", "next_index": self.next_index}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "tokens":
            raise DataError("the data state was saved by the streaming loader, not by token shards; resume with "
                             "the same data.path")
        self.next_index = state["next_index"]
