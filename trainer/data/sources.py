"""Streaming data: documents -> tokens -> packed sequences -> this rank's share of each step's batch.

The order of sequences depends only on (seed, epoch, position in the corpus), never on the number of ranks:
every rank reads and tokenizes the same document stream, packs it into the same global sequence stream
(sequence g covers tokens [g*T, g*T + T + 1)), and step s uses global sequences [s*B, (s+1)*B), of which rank r
takes the r-th contiguous slice.  So no two ranks see the same sequence, a 2-rank run sees exactly the batch a
1-rank run sees, and the loader state (which document heads the stream, the offset into it, and the next global
sequence index) is the same on every rank.

The cost is that each rank tokenizes the whole stream; the tokenizer is Rust and batched, and the benchmark
checks that it outruns training.  For many ranks, pre-tokenize once instead (`hylo tokenize --out DIR`, read by
trainer/data/shards.py with random access).  Both paths resume exactly, on the same or a different number of ranks,
as long as the global batch size stays the same.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import xxhash

from hylo.trainer.config import DataConfig
from hylo.trainer.errors import DataError

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


def saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()
                              or (path / "dataset_dict.json").is_file())


def resolve_source(cfg: DataConfig) -> tuple[str, list[str] | str]:
    """(datasets builder, data files) for local data, ("saved", folder) for a dataset written by save_to_disk, or
    ("hf", name) for a Hugging Face dataset name (or a folder in the hub's layout).

    Fails with a clear message when the path does not exist or holds nothing readable.
    """
    if cfg.path and cfg.format in ("auto", "hf") and saved_dataset(Path(cfg.path).expanduser()):
        return "saved", str(Path(cfg.path).expanduser())
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

        if self.builder == "saved":
            ds = self._saved_dataset().to_iterable_dataset()  # streamed like the rest: same resume state
            ds.set_epoch(epoch)
            return ds
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

    def _saved_dataset(self):
        """The Dataset a save_to_disk folder holds (a DatasetDict's data.hf_split)."""
        from datasets import DatasetDict, load_from_disk

        try:
            ds = load_from_disk(self.source)
        except Exception as err:  # noqa: BLE001 - a damaged Arrow file or state.json
            raise DataError(f"could not read the saved dataset in {self.source} ({type(err).__name__}: "
                            f"{err})") from None
        if isinstance(ds, DatasetDict):
            if self.cfg.hf_split not in ds:
                raise DataError(f"the saved dataset in {self.source} has splits {sorted(ds)}, not "
                                f"'{self.cfg.hf_split}'; set data.hf_split")
            ds = ds[self.cfg.hf_split]
        return ds

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

    def describe(self) -> str:
        """The source in a few words: a dataset's name, or how many files and where."""
        if isinstance(self.source, str):
            return self.source
        if len(self.source) == 1:
            return self.source[0]
        return f"{len(self.source)} files under {os.path.commonpath(self.source)}"

    def iterate(self, epoch: int = 0, state: dict | None = None) -> Iterator[tuple[int, dict, str]]:
        while True:
            ds = self._dataset(epoch)
            # The position of the next document is where the stream stands now: the state just loaded, or the
            # epoch's start.  (A dataset reports a loaded state only once it iterates: asking it before would tag
            # the first document after a resume with the start of the corpus, and a save inside that document
            # would point back there.)
            before = ds.state_dict()
            whole_epoch = state is None  # counts of a resumed epoch would cover only its rest
            if state is not None:
                ds.load_state_dict(state)
                before, state = copy.deepcopy(state), None
            empty_epoch, passed, trained = True, 0, 0
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
                    passed += 1
                    continue
                empty_epoch, trained = False, trained + 1
                has_text = has_text or bool(text.strip())
                yield epoch, before, text
                before = ds.state_dict()
            if empty_epoch and passed and whole_epoch:
                other, fix = (("validation", "Lower data.val_fraction, or give more documents") if self.cfg.split ==
                              "train" else ("training", "Evaluate on other data (--data PATH), or train a new run with "
                                            "a larger data.val_fraction or more documents"))
                raise DataError(f"the {self.cfg.split} split of {self.describe()} is empty: data.val_fraction="
                                f"{self.cfg.val_fraction} put all {passed} of its documents in the {other} split (the "
                                f"split goes by a hash of each document's text). {fix}")
            if empty_epoch and whole_epoch:  # (the rest of a resumed epoch may be held out, or nothing)
                raise DataError(f"the data source {self.describe()} yielded no documents")
            said = os.environ.get("RANK", "0") == "0" and self.cfg.split == "train"  # rank 0's training stream
            if epoch == 0 and whole_epoch and self.cfg.val_fraction and said:
                print(f"[hylo] data: the first epoch of {self.describe()} held out {passed} of {passed + trained} "
                      f"documents for validation (data.val_fraction={self.cfg.val_fraction})", flush=True)
            if not has_text and whole_epoch:  # training would see nothing but end-of-document tokens
                raise DataError(f"the data source {self.describe()} holds no text (every document is empty)")
            epoch += 1
