"""This rank's share of each step's batch, prefetched in a background thread, with an exact state_dict; and
the split of a micro-batch into inputs and targets."""

from __future__ import annotations

import queue
import threading
from typing import Any

import numpy as np
import torch

from hylo.trainer.config import DataConfig
from hylo.trainer.data.packing import SequencePacker, source_packer
from hylo.trainer.data.sources import DocumentStream
from hylo.trainer.errors import DataError


class DataLoader:
    """Per step: this rank's share of the global batch as a (micro_steps, micro_batch, seq_len + 1) tensor.

    A background thread packs `prefetch` steps ahead; each prepared step carries the loader state *after* it,
    so `state_dict()` describes exactly the batches handed out, never the ones merely prefetched.
    """

    def __init__(self, cfg: DataConfig, tokenizer, *, seq_len: int, global_batch: int, micro_batch: int,
                 rank: int = 0, world: int = 1, seed: int = 0):
        if global_batch % world or (global_batch // world) % micro_batch:
            raise ValueError(f"global batch {global_batch} does not split into {world} ranks x {micro_batch}")
        from hylo.trainer.data.mixture import MixturePacker
        from hylo.trainer.data.shards import ShardSequences, TokenShards, is_shard_dir

        if cfg.sources:  # a weighted mixture (trainer/data/mixture.py); its notes come from rank 0
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

    def reads_windows(self) -> bool:
        """Whether any of the data is token-shard windows (re-cut at a new length) rather than documents (whose
        position is a token, whatever the length)."""
        from hylo.trainer.data.mixture import MixturePacker, reads_windows

        if isinstance(self.packer, MixturePacker):
            return any(reads_windows(packer) for packer in self.packer.packers.values())
        return not isinstance(self.packer, SequencePacker)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._thread is not None:
            raise RuntimeError("load the data loader's state before iterating it")
        self.resume_note = None
        if state["seq_len"] != self.seq_len:
            if not self.reads_windows():
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
