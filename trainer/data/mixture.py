"""Data mixtures: several weighted sources (`data.sources`) behind the one-source loader's interface.

Global sequence g comes from the source whose share is furthest behind its weight after g sequences (a smooth
weighted round robin: every source's count stays within one sequence of weight x g), so the choice depends only
on the sequence index and the weights — never on the number of ranks — and a 2-rank run sees exactly the 1-rank
batches.  Each source packs its own documents into sequences (a sequence never mixes sources: per-source
accounting is exact), with its own shuffle, epochs, and document shaping (`min_doc_tokens`, `upsample_long`:
trainer/data/packing.py's SequencePacker).  The state is every source's position plus the counts, so a resume continues
bit-exactly on any number of ranks.  New weights on resume take effect from the resumed sequence on (the round
robin restarts its bookkeeping there), with a note; a source that reaches `max_epochs` stops being drawn and its
weight goes to the others, with a note; a source starting another epoch says so once.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

from hylo.trainer.config import DataConfig, SourceConfig
from hylo.trainer.errors import DataError


def source_data(cfg: DataConfig, source: SourceConfig) -> DataConfig:
    """The one-source DataConfig a mixture's source reads with (its own path and reading settings)."""
    return dataclasses.replace(cfg, path=source.path, format=source.format, text_field=source.text_field,
                               hf_split=source.hf_split, sources=[])


def source_seed(seed: int, name: str) -> int:
    """Each source shuffles by its own seed (the same names and seed give the same order)."""
    return (seed * 1_000_003 + int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)) % 2**31


class MixturePacker:
    """The next global sequence of a mixture, with the SequencePacker interface (next_sequence, state_dict,
    load_state_dict).  `build(source)` opens one source's own packer (trainer/data/packing.py's `source_packer`); `say`
    prints the notes (rank 0)."""

    kind = "mixture"

    def __init__(self, cfg: DataConfig, build: Callable[[SourceConfig], Any], say: Callable[[str], None] = print):
        self.cfg, self.say = cfg, say
        self.names = [s.name for s in cfg.sources]
        self.settings = {s.name: s for s in cfg.sources}
        # zero-weight sources stay listed (provenance) and are never opened
        self.packers = {s.name: build(s) for s in cfg.sources if s.weight > 0}
        self.weights = {s.name: s.weight for s in cfg.sources}
        self.next_index = 0
        self.counts = dict.fromkeys(self.names, 0)  # sequences drawn from each source so far
        self.base_index, self.base_counts = 0, dict(self.counts)  # where the round robin's bookkeeping starts
        self.exhausted: list[str] = []  # sources past their max_epochs
        self.epochs = dict.fromkeys(self.names, 0)  # the epoch each source was last seen in (for the notes)
        self._shapings = {n: self._shaping(n) for n in self.names}  # (saved with every state: built once)
        self._rebase()

    # ------------------------------------------------------------------------------------------------ drawing
    def _active(self) -> dict[str, float]:
        active = {n: w for n, w in self.weights.items() if w > 0 and n not in self.exhausted}
        if not active:
            raise DataError("every source of data.sources reached its max_epochs; raise max_epochs or add data")
        total = sum(active.values())
        return {n: w / total for n, w in active.items()}

    def _choose(self) -> str:
        """The active source whose count lags its share of the sequences since the last rebase the most (the
        first listed among equals); where that rule has a short period, read from the period (`_cycle`)."""
        if self._period is not None:
            return self._period[(self.next_index - self.base_index) % len(self._period)]
        steps = self.next_index - self.base_index + 1
        best, lag = "", -float("inf")
        for name, share in self._shares:
            behind = share * steps - (self.counts[name] - self.base_counts[name])
            if behind > lag:
                best, lag = name, behind
        return best

    def _rebase(self) -> None:
        """Start the round robin's bookkeeping here (new weights, or a source stopped): the shares of the active
        sources, in listed order."""
        self.base_index, self.base_counts = self.next_index, dict(self.counts)
        self._shares = list(self._active().items())
        self._set_period()

    def _set_period(self) -> None:
        self._period = self._cycle()
        self._drawn: dict[tuple[int, int], list[tuple[str, int]] | None] = {}
        self._period_prefix = {name: np.cumsum([0] + [c == name for c in self._period]).tolist()
                               for name, _ in self._shares} if self._period else {}

    def _cycle(self) -> list[str] | None:
        """The round robin's choices over one period, where it has a short one: shares that are multiples of 1/P
        (0.7/0.2/0.1: P = 10) bring every source back to exactly its share after P sequences, and the choices
        repeat from there.  Lets `skip` pass over many sequences at once; None when no period up to 4,096."""
        counts, choices = dict.fromkeys(self.names, 0), []
        for steps in range(1, 4097):
            best = max(self._shares, key=lambda item: item[1] * steps - counts[item[0]])[0]  # (first among equals)
            counts[best] += 1
            choices.append(best)
            if all(abs(share * steps - counts[name]) < 1e-9 for name, share in self._shares):
                return choices
        return None

    def next_sequence(self, keep: bool = True) -> np.ndarray | None:
        name = self._choose()
        packer = self.packers[name]
        out = packer.next_sequence(keep)
        self.last_source = name
        self.counts[name] += 1
        self.next_index += 1
        epoch = packer.epoch()
        if epoch != self.epochs[name]:
            self._new_epoch(name, epoch, f"[hylo] data: source '{name}' starts epoch {epoch + 1} (reshuffled)")
        return out

    def _new_epoch(self, name: str, epoch: int, note: str) -> None:
        """Source `name` reads epoch `epoch` from its next sequence: said with `note`, or, past its max_epochs,
        the source stops being drawn and its weight goes to the others."""
        self.epochs[name] = epoch
        limit = self.settings[name].max_epochs
        if limit and epoch >= limit:
            if name not in self.exhausted:
                self.exhausted.append(name)
                self._rebase()
                self.say(f"[hylo] data: source '{name}' finished its max_epochs={limit}; its weight goes to the "
                         f"others ({', '.join(n for n in self._active())})")
        else:
            self.say(note)

    def skip(self, n: int) -> None:
        """Pass over the next n global sequences (other ranks' rows).  Where the round robin has a period and every
        source drawn in them is token-shard windows that stays inside its epoch, the choices come from the period
        and each source skips its share in one index step; otherwise one sequence at a time (the same result)."""
        period = self._period
        if n and period is not None:
            a = (self.next_index - self.base_index) % len(period)
            drawn = self._drawn[(a, n)] if (a, n) in self._drawn else self._draws(a, n)
            packers, counts = self.packers, self.counts
            if drawn is not None and all((packers[name].left_in_epoch() or 0) > m for name, m in drawn):
                for name, m in drawn:
                    packers[name].skip(m)
                    counts[name] += m
                self.next_index += n
                self.last_source = period[(a + n - 1) % len(period)]
                return
        for _ in range(n):
            self.next_sequence(keep=False)

    def _draws(self, a: int, n: int) -> list[tuple[str, int]] | None:
        """(source, sequences) drawn in n sequences from position a of the period (every rank asks the same few
        (a, n): cached); None when a source drawn cannot skip in one step (its packer reads documents)."""
        p = len(self._period)
        full, rest = divmod(n, p)
        drawn = []
        for name, before in self._period_prefix.items():  # before[i]: its picks among the period's first i
            extra = before[a + rest] - before[a] if a + rest <= p else before[p] - before[a] + before[a + rest - p]
            if full * before[p] + extra:
                drawn.append((name, full * before[p] + extra))
        if not all(hasattr(self.packers[name], "left_in_epoch") for name, _ in drawn):
            drawn = None
        if len(self._drawn) < 4096:
            self._drawn[(a, n)] = drawn
        return drawn

    def step_sources(self) -> dict[str, int]:
        """Sequences drawn from each source so far (the cumulative per-source accounting)."""
        return dict(self.counts)

    # -------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "next_index": self.next_index, "counts": dict(self.counts),
                "base_index": self.base_index, "base_counts": dict(self.base_counts), "weights": dict(self.weights),
                "exhausted": list(self.exhausted), "epochs": dict(self.epochs),
                "sources": {n: p.state_dict() for n, p in self.packers.items()},
                "shaping": self._shapings}

    def _switch_reading(self, name: str, packer) -> None:
        """A token-shard source that starts or stops shaping its documents on resume switches between reading
        shuffled windows and reading documents: two orders with no common position, so it starts its next epoch."""
        epoch = self.epochs[name] + 1
        if reads_windows(packer):
            packer.load_state_dict({"kind": "tokens", "next_index": epoch * packer.n, "carry": None})
            how = "reads windows again (no document shaping)"
        else:
            packer.load_state_dict({"epoch": epoch, "doc_state": None, "offset": 0, "next_index": 0})
            how = "now reads documents (min_doc_tokens / upsample_long)"
        self._new_epoch(name, epoch, f"[hylo] data: token-shard source '{name}' {how}: it starts epoch {epoch + 1} "
                                     f"here (the rest of epoch {epoch} is not read)")

    def _shaping(self, name: str) -> list:
        s = self.settings[name]
        return [s.min_doc_tokens, s.upsample_long.min_tokens, s.upsample_long.factor, s.max_epochs]

    def load_state_dict(self, state: dict[str, Any], saved_seq_len: int | None = None) -> None:
        if state.get("kind") != self.kind:
            raise DataError("the data state was saved by a one-source loader (data.path); this run reads "
                            "data.sources — resume with the same data settings")
        if missing := [n for n in state["counts"] if n not in self.names]:
            raise DataError(f"data.sources: the checkpoint's source(s) {missing} are gone from this run; keep them "
                            "(a weight of 0 stops drawing from a source) or set data.allow_source_change=true")
        self.next_index = state["next_index"]
        self.counts = {n: state["counts"].get(n, 0) for n in self.names}
        self.base_index = state["base_index"]
        self.base_counts = {n: state["base_counts"].get(n, 0) for n in self.names}
        self.exhausted = [n for n in state["exhausted"] if n in self.names]
        self.epochs = {n: state["epochs"].get(n, 0) for n in self.names}
        self._shares = list(self._active().items())
        self._set_period()
        for name, packer in self.packers.items():
            saved = state["sources"].get(name)
            if saved is None:  # (a source whose weight was 0 then starts at its beginning)
                continue
            if (saved.get("kind") == "tokens") != reads_windows(packer):
                self._switch_reading(name, packer)
            elif saved_seq_len is not None and saved.get("kind") == "tokens":
                packer.load_state_dict(saved, saved_seq_len=saved_seq_len)
            else:
                packer.load_state_dict(saved)
        changed = [f"{n} {state['weights'].get(n, 0):g} -> {self.weights[n]:g}" for n in self.names
                   if state["weights"].get(n, 0) != self.weights[n]]
        reshaped = [n for n in self.names if state.get("shaping", {}).get(n, self._shaping(n)) != self._shaping(n)]
        if changed:
            self._rebase()
            self.say(f"[hylo] data: new source weights from sequence {self.next_index} on: {', '.join(changed)}")
        if reshaped:
            self.say(f"[hylo] data: new document shaping (min_doc_tokens, upsample_long, max_epochs) for "
                     f"{', '.join(reshaped)} from here on")


def reads_windows(packer) -> bool:
    """Whether a source's packer reads token-shard windows (trainer/data/shards.py's ShardSequences) rather than
    documents."""
    return packer.state_dict().get("kind") == "tokens"
