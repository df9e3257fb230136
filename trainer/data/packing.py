"""Documents -> packed sequences: the packer of one document stream (EOS after each document, windows of
seq_len + 1 tokens, stride seq_len) and the packer of one source of a mixture."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from hylo.trainer.config import DataConfig
from hylo.trainer.data.sources import TOKENIZE_GROUP, DocumentStream
from hylo.trainer.data.tokenizer import eos_id
from hylo.trainer.errors import DataError


class SequencePacker:
    """Packs the document stream, EOS after each document, into windows of seq_len + 1 tokens, stride seq_len.

    Every token is a prediction target exactly once.  `state` names the document holding the next window's
    first token, the offset into it, and the next global sequence index.

    Shaping (a mixture's per-source settings): `min_doc_tokens` drops shorter documents; `upsample` = (min_tokens,
    factor) repeats documents of at least min_tokens tokens `factor` times per epoch, each copy placed 2-16
    documents after the one before (by the seed, so never back to back), copies left at an epoch's end opening the
    next.  The resume point of a shaped stream is then (the source's state before its next document, that
    document's ordinal in the epoch, the copies already placed before it, the copies still pending — each by the
    source state that re-reads it), so a resume re-reads pending copies and continues bit-exactly.
    """

    def __init__(self, docs: DocumentStream, tokenizer, seq_len: int, *, min_doc_tokens: int = 0,
                 upsample: tuple[int, int] = (0, 1), seed: int = 0):
        self.docs = docs
        self.tokenizer = tokenizer
        self.eos = eos_id(tokenizer)
        self.seq_len = seq_len
        self.min_doc_tokens, self.upsample, self.seed = min_doc_tokens, upsample, seed
        self.shaped = min_doc_tokens > 0 or upsample[1] > 1
        self._queue: deque[tuple[int, Any, np.ndarray]] = deque()  # (epoch, resume point, tokens) not consumed
        self._offset = 0  # into the first queued document
        self._next_index = 0
        self._start = {"epoch": 0, "doc_state": None, "offset": 0, "next_index": 0}
        self._source: Iterator | None = None

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") in ("tokens", "mixture"):
            raise DataError(f"the data state was saved by the {state['kind']} loader; resume with the same data "
                            "settings (data.path or data.sources)")
        state = dict(state)
        doc_state = state.get("doc_state")
        shaped_state = isinstance(doc_state, dict) and "ordinal" in doc_state
        if doc_state is not None and shaped_state and not self.shaped:  # shaping turned off: plain from here
            state["doc_state"] = doc_state["doc_state"]  # (copies still pending are not placed)
        elif doc_state is not None and not shaped_state and self.shaped:  # turned on (a new stage): from here
            state["doc_state"] = {"doc_state": doc_state, "ordinal": 0, "emitted": 0, "pending": []}
        self._start = state
        self._queue.clear()
        self._source = None

    def state_dict(self) -> dict:
        if self._source is None:
            return dict(self._start)
        self._fill(1)
        epoch, doc_state, _ = self._queue[0]
        return {"epoch": epoch, "doc_state": doc_state, "offset": self._offset, "next_index": self._next_index}

    def epoch(self) -> int:
        """The epoch of the document holding the next token (asked after every sequence of a mixture: no state
        dict built)."""
        if self._source is None:
            return self._start["epoch"]
        self._fill(1)
        return self._queue[0][0]

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(enc.ids + [self.eos], dtype=np.int32)
                for enc in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def _originals(self, epoch: int, state):
        """(epoch, source state before it, tokens) of every document of the source, tokenized in groups."""
        source = self.docs.iterate(epoch, state)
        if getattr(self.docs, "pretokenized", False):  # token shards cut into documents: tokens already
            yield from source
            return
        while True:
            group = [next(source) for _ in range(TOKENIZE_GROUP)]
            yield from ((e, st, tokens) for (e, st, _), tokens in
                        zip(group, self._encode([text for _, _, text in group]), strict=True))

    def _documents(self, epoch: int, resume):
        """(epoch, resume point, tokens) of the packed document stream from a resume point."""
        if not self.shaped:
            yield from self._originals(epoch, resume)
            return
        resume = resume or {"doc_state": None, "ordinal": 0, "emitted": 0, "pending": []}
        # a pending copy: [due ordinal, epoch and source state that re-read it, its tokens]
        pending = [[due, ep, st, self._reread(ep, st)] for due, ep, st in resume["pending"]]
        ordinal, skip, current = resume["ordinal"], resume["emitted"], epoch
        min_long, factor = self.upsample
        for e, st, tokens in self._originals(epoch, resume["doc_state"]):
            if e != current:  # a new epoch: copies left over open it, spaced as they were; ordinals restart
                for copy in pending:
                    copy[0] = max(0, copy[0] - ordinal)
                current, ordinal = e, 0
            due = [copy for copy in pending if copy[0] <= ordinal]
            snapshot = [[d, ep, cst] for d, ep, cst, _ in pending]
            for k, copy in enumerate(due[skip:], start=skip):
                yield e, {"doc_state": st, "ordinal": ordinal, "emitted": k, "pending": snapshot}, copy[3]
            skip = 0
            pending = [copy for copy in pending if copy[0] > ordinal]
            if len(tokens) - 1 >= self.min_doc_tokens:
                yield e, {"doc_state": st, "ordinal": ordinal, "emitted": len(due), "pending": snapshot}, tokens
                if factor > 1 and len(tokens) - 1 >= min_long:
                    rng = random.Random(f"{self.seed}/{e}/{ordinal}")
                    at = ordinal
                    for _ in range(factor - 1):
                        at += rng.randint(2, 16)
                        pending.append([at, e, st, tokens])
                    pending.sort(key=lambda copy: copy[0])  # (stable: copies due together keep their order)
            ordinal += 1

    def _reread(self, epoch: int, state) -> np.ndarray:
        _, _, text = next(self.docs.iterate(epoch, state))
        return text if getattr(self.docs, "pretokenized", False) else self._encode([text])[0]

    def _fill(self, tokens_needed: int) -> None:
        if self._source is None:
            s = self._start
            self._source = self._documents(s["epoch"], s["doc_state"])
            self._offset, self._next_index = s["offset"], s["next_index"]
        while sum(len(t) for _, _, t in self._queue) - self._offset < tokens_needed:
            self._queue.append(next(self._source))

    def next_sequence(self, keep: bool = True) -> np.ndarray | None:
        """The next global sequence (seq_len + 1 tokens), or None when `keep` is False (skipped cheaply)."""
        t = self.seq_len
        self._fill(t + 1)
        out = None
        if keep:
            parts, need, offset = [], t + 1, self._offset
            for _, _, tokens in self._queue:
                piece = tokens[offset : offset + need]
                parts.append(piece)
                need -= len(piece)
                offset = 0
                if need == 0:
                    break
            out = np.concatenate(parts)
        self._offset += t
        while self._offset >= len(self._queue[0][2]):
            self._offset -= len(self._queue.popleft()[2])
        self._next_index += 1
        return out


def source_packer(cfg: DataConfig, source, tokenizer, seq_len: int, seed: int):
    """The packer of one source of a mixture: its own path and reading settings, its own shuffle, its document
    shaping (token shards that shape are read as documents: trainer/data/shards.py's ShardDocuments)."""
    from hylo.trainer.data.mixture import source_data, source_seed
    from hylo.trainer.data.shards import ShardDocuments, ShardSequences, TokenShards, is_shard_dir

    data, own_seed = source_data(cfg, source), source_seed(seed, source.name)
    up = source.upsample_long
    if data.format == "tokens" or is_shard_dir(data.path):
        if cfg.val_fraction:
            raise DataError(f"data.sources '{source.name}': data.val_fraction holds out documents of streaming "
                            "sources; this one is token shards (pre-tokenize its held-out documents apart)")
        shards = TokenShards(data.path, tokenizer, verify=data.verify)
        if source.min_doc_tokens or up.factor > 1:  # shaping needs documents: the shards cut at their EOS tokens
            docs = ShardDocuments(shards, eos_id(tokenizer), own_seed)
            return SequencePacker(docs, tokenizer, seq_len, min_doc_tokens=source.min_doc_tokens,
                                  upsample=(up.min_tokens, up.factor), seed=own_seed)
        return ShardSequences(shards, seq_len, own_seed)
    return SequencePacker(DocumentStream(data, own_seed), tokenizer, seq_len, min_doc_tokens=source.min_doc_tokens,
                          upsample=(up.min_tokens, up.factor), seed=own_seed)

