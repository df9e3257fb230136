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

from hylo.trainer.errors import DataError

INDEX = "index.json"
FORMAT = "hylo-tokens-v1"


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def write_shards(texts: Iterable[str], tokenizer, out: Path, shard_tokens: int = 100_000_000,
                 batch: int = 64) -> dict:
    """Tokenize `texts` (EOS after each) into DIR/tokens_NNNNN.bin + index.json; returns the index."""
    from hylo.trainer.data.tokenizer import eos_id

    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32
    eos = eos_id(tokenizer)
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
    """Global sequence stream over token shards with the SequencePacker interface.

    Each epoch is a seeded shuffle of the corpus cut into windows of seq_len (+1 target token); sequence g is
    window perm_epoch[g mod n] of epoch g // n, so the state is the next global index.  A resume at another
    seq_len (training in stages of growing length) first reads the rest of the interrupted epoch in its old order
    — the old windows not yet read, laid end to end and cut into windows of the new length — then starts the next
    epoch at the new length: no token of the interrupted epoch is repeated, and at most one new window's worth at
    its very end (fewer than seq_len tokens) is dropped.
    """

    def __init__(self, shards: TokenShards, seq_len: int, seed: int):
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        self.n = self._windows(seq_len)
        self.next_index = 0
        self.carry: dict | None = None  # the rest of an epoch read at another length: see the class docstring
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _windows(self, seq_len: int) -> int:
        n = (self.shards.total - 1) // seq_len
        if n < 1:
            raise DataError(f"token shards '{self.shards.path}' hold {self.shards.total} tokens: fewer than one "
                            f"sequence of {seq_len + 1}")
        return n

    def _perm(self, epoch: int, n: int) -> np.ndarray:
        if (epoch, n) not in self._perms:
            self._perms = {(epoch, n): np.random.default_rng([self.seed, epoch]).permutation(n)}
        return self._perms[(epoch, n)]

    def _sequence(self, g: int) -> np.ndarray:
        epoch, j = divmod(g, self.n)
        start = int(self._perm(epoch, self.n)[j]) * self.seq_len
        return self.shards.slice(start, start + self.seq_len + 1)

    def _carried(self, i: int) -> np.ndarray:
        """Sequence i of the carried rest of an epoch: tokens [i*T, i*T + T + 1) of the old windows end to end."""
        c, t = self.carry, self.seq_len
        old_t, perm = c["seq_len"], self._perm(c["epoch"], c["n"])
        parts, pos, need = [], i * t, t + 1
        while need:
            unit, offset = divmod(pos, old_t)
            start = int(perm[c["start"] + unit]) * old_t + offset
            take = min(need, old_t - offset)
            parts.append(self.shards.slice(start, start + take))
            pos, need = pos + take, need - take
        return np.concatenate(parts)

    def _carried_count(self) -> int:
        c = self.carry
        return ((c["n"] - c["start"]) * c["seq_len"] - 1) // self.seq_len

    def next_sequence(self, keep: bool = True) -> np.ndarray | None:
        if self.carry is not None:
            i = self.carry["taken"]
            out = self._carried(i) if keep else None
            self.carry["taken"] += 1
            if self.carry["taken"] >= self._carried_count():
                self.carry = None
            return out
        out = self._sequence(self.next_index) if keep else None
        self.next_index += 1
        return out

    def skip(self, n: int) -> None:
        """Pass over the next n sequences (other ranks' rows) without reading them: an index step."""
        if self.carry is not None:
            for _ in range(n):
                self.next_sequence(keep=False)
        else:
            self.next_index += n

    def left_in_epoch(self) -> int | None:
        """Sequences before the epoch changes (None while reading the rest of an epoch at another length)."""
        return None if self.carry is not None else self.n - self.next_index % self.n

    def state_dict(self) -> dict:
        return {"kind": "tokens", "next_index": self.next_index, "carry": dict(self.carry) if self.carry else None}

    def epoch(self) -> int:
        """The epoch of the next sequence (the rest of an epoch read at another length counts as the one before)."""
        return self.next_index // self.n - (1 if self.carry is not None else 0)

    def load_state_dict(self, state: dict, saved_seq_len: int | None = None) -> None:
        if state.get("kind") != "tokens":
            raise DataError("the data state was saved by the streaming loader, not by token shards; resume with "
                            "the same data.path")
        if saved_seq_len is None or saved_seq_len == self.seq_len:
            self.next_index, self.carry = state["next_index"], state.get("carry")
            return
        if state.get("carry"):
            raise DataError(f"the checkpoint is still reading the rest of an epoch begun at another length "
                            f"(seq_len {state['carry']['seq_len']}); change train.seq_len again only after it "
                            f"(resume at seq_len={saved_seq_len} first)")
        old_n = self._windows(saved_seq_len)
        epoch, start = divmod(state["next_index"], old_n)
        self.carry = {"seq_len": saved_seq_len, "epoch": epoch, "start": start, "n": old_n, "taken": 0}
        if self._carried_count() <= 0:
            self.carry = None
        self.next_index = (epoch + 1) * self.n  # then the next epoch, at the new length


class ShardDocuments:
    """The documents of token shards, for a mixture source that shapes its documents (min_doc_tokens,
    upsample_long): the stream is cut at its EOS tokens (one scan when opened: 8 bytes per document kept), and each
    epoch reads the documents in a seeded order.  The DocumentStream interface (trainer/data/sources.py) with tokens for
    text: `iterate(epoch, state)` yields (epoch, state before the document, its tokens with their EOS) endlessly,
    the state being the document's place in its epoch's order, so a resume continues exactly."""

    pretokenized = True
    SCAN = 1 << 24  # tokens compared with EOS at a time (bounded temporary memory on big shards)

    def __init__(self, shards: TokenShards, eos: int, seed: int):
        self.shards, self.seed = shards, seed
        ends = [np.flatnonzero(shards.slice(a, min(a + self.SCAN, shards.total)) == eos) + a
                for a in range(0, shards.total, self.SCAN)]
        ends = np.concatenate([np.zeros(0, np.int64), *ends]).astype(np.int64) + 1  # one past each EOS
        if shards.total and (not len(ends) or ends[-1] != shards.total):  # a tail with no EOS after it
            ends = np.append(ends, shards.total)
        if not len(ends):
            raise DataError(f"token shards '{shards.path}' hold no tokens")
        self.bounds = np.concatenate([[0], ends])  # document i: tokens [bounds[i], bounds[i + 1])
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def _perm(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch, 1]).permutation(len(self)))
        return self._order[1]

    def check_readable(self) -> None:
        """Opening the shards checked them (index, sizes, CRC32); the EOS scan read them whole."""

    def iterate(self, epoch: int = 0, state: dict | None = None):
        doc = 0 if state is None else int(state["doc"])
        while True:
            order = self._perm(epoch)
            for j in range(doc, len(order)):
                i = int(order[j])
                yield epoch, {"doc": j}, self.shards.slice(int(self.bounds[i]), int(self.bounds[i + 1]))
            epoch, doc = epoch + 1, 0
