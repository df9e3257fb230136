"""Streaming data: documents -> tokens -> packed sequences -> this rank's share of each step's batch.

The order of sequences depends only on (seed, epoch, position in the corpus), never on the number of ranks:
every rank reads and tokenizes the same document stream, packs it into the same global sequence stream
(sequence g covers tokens [g*T, g*T + T + 1)), and step s uses global sequences [s*B, (s+1)*B), of which rank r
takes the r-th contiguous slice.  So no two ranks see the same sequence, a 2-rank run sees exactly the batch a
1-rank run sees, and the loader state (which document heads the stream, the offset into it, and the next global
sequence index) is the same on every rank.

The cost is that each rank tokenizes the whole stream; the tokenizer is Rust and batched, and the benchmark
checks that it outruns training.  For many ranks, pre-tokenize once instead (`hylo tokenize --out DIR`, read by
trainer/shards.py with random access).  Both paths resume exactly, on the same or a different number of ranks,
as long as the global batch size stays the same.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import queue
import random
import sysconfig
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from trainer.config import DataConfig
from trainer.errors import DataError
from trainer.tokenizer import EOS

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text"}
JSON_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
TOKENIZE_GROUP = 32  # documents per batched tokenizer call
SNIFF_BYTES = 4096  # read from the start of every text file to refuse binary files before a run starts


def bundled_corpus_files(split: str = "train") -> list[str]:
    """The Python standard library's own source: real text that ships with every Python.

    About 1 file in 50 (chosen by a hash of its relative path, so the split is stable) is held out as `val`.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")) or "__pycache__" in rel:
            continue
        held_out = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 50 == 0
        if held_out == (split == "val"):
            files.append(str(path))
    if not files:
        raise DataError(f"found no Python source files under {root} to use as the bundled corpus")
    return files


def _builder_for(files: list[str], fmt: str) -> str:
    if fmt in ("text", "jsonl", "parquet"):
        return {"text": "text", "jsonl": "json", "parquet": "parquet"}[fmt]
    suffixes = {Path(f).suffix.lower() for f in files}
    if suffixes <= PARQUET_SUFFIXES:
        return "parquet"
    if suffixes <= JSON_SUFFIXES:
        return "json"
    if suffixes & (PARQUET_SUFFIXES | JSON_SUFFIXES):
        raise DataError(
            f"data.path mixes file kinds {sorted(suffixes)}; point it at one kind or set data.format explicitly"
        )
    return "text"


def resolve_source(cfg: DataConfig) -> tuple[str, list[str] | str]:
    """(datasets builder, data files) for local data, or ("hf", name) for a Hugging Face dataset name.

    Fails with a clear message when the path does not exist or holds nothing readable.
    """
    if cfg.format == "hf":
        if not cfg.path:
            raise DataError("data.format=hf needs data.path set to a Hugging Face dataset name")
        return "hf", cfg.path
    if cfg.path in ("", "bundled:train", "bundled:val"):
        return "text", bundled_corpus_files("val" if cfg.path == "bundled:val" else "train")
    path = Path(cfg.path).expanduser()
    if any(ch in cfg.path for ch in "*?["):
        files = sorted(f for f in glob.glob(os.path.expanduser(cfg.path), recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"data.path glob '{cfg.path}' matches no files")
    elif path.is_file():
        files = [str(path)]
    elif path.is_dir():
        known = TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in known)
        if not files:
            raise DataError(
                f"data.path folder '{path}' holds no data files (looked for {sorted(known)} recursively)"
            )
    else:
        raise DataError(
            f"data.path '{cfg.path}' does not exist. Give a file, a folder or a glob of text/JSONL/Parquet files, "
            "leave it empty for the bundled corpus, or set data.format=hf for a Hugging Face dataset name"
        )
    return _builder_for(files, cfg.format), files


def _read_error(err: Exception) -> str:
    """One line for an error raised while reading the data files (the datasets library wraps many)."""
    if isinstance(err, OSError):
        name = err.filename or (err.args[0] if len(err.args) == 1 else None)
        reason = err.strerror or ("no such file" if isinstance(err, FileNotFoundError) else type(err).__name__)
        if name:
            return (f"cannot read data file '{name}': {reason}. Restore the file (a resume then continues where "
                    "the last checkpoint left off) or point data.path at data that is complete")
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    cause = err.__cause__ or err.__context__
    detail = f"{type(err).__name__}: {lines[0] if lines else err!r}"[:400]
    if cause is not None and str(cause).strip():
        detail += f" (caused by {type(cause).__name__}: {str(cause).strip().splitlines()[0][:300]})"
    return f"could not read the data: {detail}"


# C0 control characters text does not hold (tab, newlines, form feed and escape are text); about 1 byte in 10 of
# random or compiled data is one of them.
BINARY_CONTROLS = [chr(c) for c in range(32) if chr(c) not in "\t\n\r\x0b\x0c\x1b"]


def looks_like_text(text: str) -> bool:
    """False for what a binary file decodes to: a NUL, or more than 1% control characters.  (Undecodable bytes
    alone do not make a file binary: text in a legacy encoding, as the stdlib's koi8-r test module, decodes to
    many replacement characters and is still text.)"""
    if "\x00" in text:
        return False
    return sum(text.count(c) for c in BINARY_CONTROLS) * 100 <= len(text)


def held_out(text: str, fraction: float) -> bool:
    """Whether a document belongs to the validation split: a hash of its text, so the split is the same on every
    rank, in every epoch, after any resume and for any reader of the same data."""
    return xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass")) < fraction * 2**64


def not_text(file: str) -> str:
    return (f"data file {file} is not text (it holds NUL or other control bytes: a binary file, or text in UTF-16?); "
            "remove it from data.path (or convert it to UTF-8)")


class DocumentStream:
    """An endless, rank-independent stream of documents: epoch after epoch, files in a seeded order.

    Yields (epoch, resume_state, text), where resume_state restores the stream to just before that document.
    """

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg = cfg
        self.seed = seed
        self.builder, self.source = resolve_source(cfg)

    def _dataset(self, epoch: int):
        if self.builder != "hf":
            os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files: never look for a hub
        from datasets import load_dataset
        from datasets.utils import logging as datasets_logging

        datasets_logging.set_verbosity(datasets_logging.CRITICAL)  # read errors are hylo's one line, not its logs

        if self.builder == "hf":
            try:
                ds = load_dataset(self.source, split=self.cfg.hf_split, streaming=True)
            except Exception as err:
                raise DataError(
                    f"could not open Hugging Face dataset '{self.source}' (split '{self.cfg.hf_split}'): {err}. "
                    "Offline machines need local files in data.path instead."
                ) from None
            ds.set_epoch(epoch)
            return ds
        files = list(self.source)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(files)
        # Real corpora hold the odd non-UTF-8 byte (the stdlib has latin-1 test files): replace, never crash.
        text_kwargs = {"sample_by": "document", "encoding_errors": "replace"}
        kwargs: dict[str, Any] = text_kwargs if self.builder == "text" else {}
        return load_dataset(self.builder, data_files=files, split="train", streaming=True, **kwargs)

    def _binary_file(self, sniff: int = SNIFF_BYTES) -> str | None:
        """The first text file whose first `sniff` bytes (-1: all of it) are not text: at start-up, and to name the
        file when a document turns out not to be text."""
        for file in self.source if self.builder == "text" else ():
            try:
                with open(file, "rb") as f:
                    head = f.read(sniff)
            except OSError:
                continue  # unreadable files are reported by the read itself
            if not looks_like_text(head.decode("utf-8", errors="replace")):
                return file
        return None

    def _bad_json_line(self) -> str | None:
        """'file:line: what is wrong' for the first line of a JSON-lines file that does not parse, or None (the
        datasets library reads JSON in blocks and reports a block's row, not the file or its line)."""
        if self.builder != "json":
            return None
        for file in self.source:
            try:
                with open(file, encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError:
                return None  # reported by the read error itself
            try:
                json.loads(text)
                continue  # one JSON document (an array of records): not lines
            except ValueError:
                pass
            for number, line in enumerate(text.splitlines(), 1):
                try:
                    if line.strip():
                        json.loads(line)
                except ValueError as err:
                    return (f"data file {file}, line {number} is not valid JSON ({err.msg}, column {err.colno}); "
                            "fix or remove that line")
        return None

    def check_readable(self) -> None:
        """Read up to the first document with text, so unreadable or empty data fails before a run starts, and
        refuse text files that are binary (the first few KB of each)."""
        if binary := self._binary_file():
            raise DataError(not_text(binary))
        for epoch, _, text in self.iterate():
            if text.strip() or epoch > 0:
                return

    def iterate(self, epoch: int = 0, state: dict | None = None) -> Iterator[tuple[int, dict, str]]:
        while True:
            ds = self._dataset(epoch)
            # The position of the next document is where the stream stands now: the state just loaded, or the
            # epoch's start.  (A dataset reports a loaded state only once it iterates: asking it before would tag
            # the first document after a resume with the start of the corpus, and a save inside that document
            # would point back there.)
            before = ds.state_dict()
            if state is not None:
                ds.load_state_dict(state)
                before, state = copy.deepcopy(state), None
            empty_epoch = True
            has_text = epoch > 0  # one epoch with text is proof enough
            examples = iter(ds)
            while True:
                try:
                    example = next(examples)
                except StopIteration:
                    break
                except Exception as err:  # noqa: BLE001 - a file removed or unreadable mid-run, a malformed line
                    raise DataError(self._bad_json_line() or _read_error(err)) from None
                text = example.get(self.cfg.text_field)
                if text is None:
                    raise DataError(
                        f"documents have no field '{self.cfg.text_field}' (fields: {sorted(example)}); "
                        "set data.text_field"
                    )
                if self.builder == "text" and not looks_like_text(text):  # binary past the start of a file
                    raise DataError(not_text(self._binary_file(sniff=-1) or f"one of {len(self.source)} files"))
                if self.cfg.val_fraction and held_out(text, self.cfg.val_fraction) != (self.cfg.split == "val"):
                    before = ds.state_dict()  # the other split's document: passed over, the position moves on
                    continue
                empty_epoch = False
                has_text = has_text or bool(text.strip())
                yield epoch, before, text
                before = ds.state_dict()
            if empty_epoch:
                raise DataError(f"the data source {str(self.source)[:200]} yielded no documents")
            if not has_text:  # training would see nothing but end-of-document tokens
                raise DataError(f"the data source {str(self.source)[:200]} holds no text (every document is empty)")
            epoch += 1


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
        self.eos = tokenizer.token_to_id(EOS)
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
    shaping (token shards that shape are read as documents: trainer/shards.py's ShardDocuments)."""
    from trainer.mixture import source_data, source_seed
    from trainer.shards import ShardDocuments, ShardSequences, TokenShards, is_shard_dir

    data, own_seed = source_data(cfg, source), source_seed(seed, source.name)
    up = source.upsample_long
    if data.format == "tokens" or is_shard_dir(data.path):
        if cfg.val_fraction:
            raise DataError(f"data.sources '{source.name}': data.val_fraction holds out documents of streaming "
                            "sources; this one is token shards (pre-tokenize its held-out documents apart)")
        shards = TokenShards(data.path, tokenizer, verify=data.verify)
        if source.min_doc_tokens or up.factor > 1:  # shaping needs documents: the shards cut at their EOS tokens
            docs = ShardDocuments(shards, tokenizer.token_to_id(EOS), own_seed)
            return SequencePacker(docs, tokenizer, seq_len, min_doc_tokens=source.min_doc_tokens,
                                  upsample=(up.min_tokens, up.factor), seed=own_seed)
        return ShardSequences(shards, seq_len, own_seed)
    return SequencePacker(DocumentStream(data, own_seed), tokenizer, seq_len, min_doc_tokens=source.min_doc_tokens,
                          upsample=(up.min_tokens, up.factor), seed=own_seed)


class DataLoader:
    """Per step: this rank's share of the global batch as a (micro_steps, micro_batch, seq_len + 1) tensor.

    A background thread packs `prefetch` steps ahead; each prepared step carries the loader state *after* it,
    so `state_dict()` describes exactly the batches handed out, never the ones merely prefetched.
    """

    def __init__(self, cfg: DataConfig, tokenizer, *, seq_len: int, global_batch: int, micro_batch: int,
                 rank: int = 0, world: int = 1, seed: int = 0):
        if global_batch % world or (global_batch // world) % micro_batch:
            raise ValueError(f"global batch {global_batch} does not split into {world} ranks x {micro_batch}")
        from trainer.mixture import MixturePacker
        from trainer.shards import ShardSequences, TokenShards, is_shard_dir

        if cfg.sources:  # a weighted mixture (trainer/mixture.py); its notes come from rank 0
            self.packer = MixturePacker(cfg, lambda source: source_packer(cfg, source, tokenizer, seq_len, seed),
                                        say=(lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None))
        elif cfg.format == "tokens" or is_shard_dir(cfg.path):  # pre-tokenized: random access, reshardable
            if cfg.val_fraction:
                raise DataError("data.val_fraction holds out documents of a streaming source; token shards are "
                                "already tokenized: pre-tokenize the held-out documents into shards of their own "
                                "and give them to eval.data_path (or train on the source files)")
            self.packer = ShardSequences(TokenShards(cfg.path, tokenizer, verify=cfg.verify), seq_len, seed)
        else:
            self.packer = SequencePacker(DocumentStream(cfg, seed), tokenizer, seq_len)
        self.seq_len, self.global_batch, self.micro_batch = seq_len, global_batch, micro_batch
        self.rank, self.world, self.prefetch = rank, world, cfg.prefetch
        self._state = self.packer.state_dict()
        self.last_sources: list[str] | None = None  # a mixture: the source of each row of the last batch
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        self._stop = threading.Event()

    def check_readable(self) -> None:
        """Fail now, with the data's own error, if the stream cannot yield text (token shards were checked when
        opened)."""
        if isinstance(self.packer, SequencePacker):
            self.packer.docs.check_readable()
        for packer in getattr(self.packer, "packers", {}).values():  # each source of a mixture
            if isinstance(packer, SequencePacker):
                packer.docs.check_readable()

    def _skip(self, n: int) -> None:
        """Pass over n global sequences (the other ranks' rows): in one call where the packer can (token shards,
        a mixture of them), else one by one."""
        if hasattr(self.packer, "skip"):
            self.packer.skip(n)
        else:
            for _ in range(n):
                self.packer.next_sequence(keep=False)

    def _next_step(self) -> tuple[torch.Tensor, dict, list[str] | None]:
        local = self.global_batch // self.world
        rows, sources = [], []
        self._skip(self.rank * local)
        for _ in range(local):
            rows.append(self.packer.next_sequence())
            sources.append(getattr(self.packer, "last_source", None))
        self._skip(self.global_batch - (self.rank + 1) * local)
        batch = torch.from_numpy(np.stack(rows)).view(local // self.micro_batch, self.micro_batch, self.seq_len + 1)
        return batch, self.packer.state_dict(), (sources if sources[0] is not None else None)

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._next_step()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # surfaced in the training thread
            self._queue.put(err)

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> torch.Tensor:
        if self.prefetch == 0:
            batch, self._state, self.last_sources = self._next_step()
            return batch
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, name="hylo-data", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, self._state, self.last_sources = item
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"packer": self._state, "seq_len": self.seq_len, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._thread is not None:
            raise RuntimeError("load the data loader's state before iterating it")
        self.resume_note = None
        if state["seq_len"] != self.seq_len:
            if isinstance(self.packer, SequencePacker):
                # the streaming packer's position is a token (document + offset), whatever the window length
                self.resume_note = (f"[hylo] train.seq_len {state['seq_len']} -> {self.seq_len}: the data stream "
                                    "continues at the same token, nothing skipped or repeated")
            else:
                self.resume_note = (f"[hylo] train.seq_len {state['seq_len']} -> {self.seq_len}: the rest of the "
                                    "interrupted epoch is read in its order, cut to the new length (nothing "
                                    f"repeated; under {self.seq_len} tokens dropped at its end), then new epochs")
        if state["global_batch"] != self.global_batch:
            raise DataError(f"data state was saved with train.batch_size={state['global_batch']}, this run uses "
                             f"{self.global_batch}: keep the global batch when resuming (the number of ranks may "
                             "change)")
        if isinstance(self.packer, SequencePacker):
            self.packer.load_state_dict(state["packer"])
        else:  # token shards, or a mixture (whose token-shard sources re-cut an epoch at a new length)
            self.packer.load_state_dict(state["packer"], saved_seq_len=state["seq_len"])
        self._state = self.packer.state_dict()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def inputs_and_targets(micro_batch: torch.Tensor, positions: torch.Tensor | None = None):
    """One micro-batch -> (inputs, targets).  Text batches are (sequences, T + 1) tokens, the targets being the
    inputs shifted by one; recall-task batches are (sequences, 2, T + 1): tokens and, shifted the same way,
    targets that are -100 (ignored) where nothing is scored.  `positions`: this rank's context-parallel slice."""
    tokens, targets = (micro_batch[:, 0], micro_batch[:, 1]) if micro_batch.dim() == 3 else (micro_batch,) * 2
    inputs, targets = tokens[:, :-1], targets[:, 1:]
    if positions is not None:
        inputs, targets = inputs[:, positions], targets[:, positions]
    return inputs, targets
