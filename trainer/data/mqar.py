"""MQAR (multi-query associative recall, from the Zoology and BASED papers) as data: the sequence generator
and the training data source of `data.format=mqar`.  Scoring lives in trainer/evaluation/recall.py.

MQAR sequence (token ids are task ids, not text):  k1 v1 k2 v2 ... kN vN | q1 a1 q2 a2 ... qN aN | 0 0 ...
Keys come from [1, 1 + n_keys), values from [1 + n_keys, 1 + n_keys + n_values); the query part asks every key
once, in a random order, and the model must predict each answer a_i at the position of its query key q_i (the
target of input position t is the token at t + 1).  Only those N positions are scored and trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100  # cross_entropy's ignore_index: positions that are neither trained on nor scored



@dataclass
class MQARSpec:
    pairs: int = 8  # key-value pairs per sequence (and queries: each key is asked once)
    seq_len: int = 64  # tokens per sequence (>= 4 * pairs); the rest is padding (token 0)
    n_keys: int = 64
    n_values: int = 64

    @property
    def vocab(self) -> int:
        return 1 + self.n_keys + self.n_values

    def check(self) -> None:
        if self.pairs < 1 or self.n_keys < self.pairs or self.n_values < 1:
            raise ValueError(f"MQAR needs 1 <= pairs <= n_keys and n_values >= 1, got pairs={self.pairs}, "
                             f"n_keys={self.n_keys}, n_values={self.n_values}")
        if self.seq_len < 4 * self.pairs:
            raise ValueError(f"MQAR with {self.pairs} pairs needs seq_len >= {4 * self.pairs} (pairs, then queries); "
                             f"got {self.seq_len}")


def mqar_spec(cfg) -> MQARSpec:
    """The MQAR setting of a run config: data.mqar at train.seq_len."""
    q = cfg.data.mqar
    return MQARSpec(pairs=q.pairs, seq_len=cfg.train.seq_len, n_keys=q.n_keys, n_values=q.n_values)


def mqar_batch(spec: MQARSpec, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n sequences -> (inputs (n, seq_len), targets (n, seq_len)) with IGNORE everywhere but the answers."""
    spec.check()
    p = spec.pairs
    keys = torch.rand(n, spec.n_keys, generator=generator).argsort(-1)[:, :p] + 1  # distinct keys per sequence
    values = torch.randint(0, spec.n_values, (n, p), generator=generator) + 1 + spec.n_keys
    order = torch.rand(n, p, generator=generator).argsort(-1)
    asked, answers = keys.gather(1, order), values.gather(1, order)
    tokens = torch.zeros(n, spec.seq_len + 1, dtype=torch.long)
    tokens[:, 0:2 * p:2], tokens[:, 1:2 * p:2] = keys, values
    tokens[:, 2 * p:4 * p:2], tokens[:, 2 * p + 1:4 * p:2] = asked, answers
    targets = torch.full((n, spec.seq_len), IGNORE, dtype=torch.long)
    targets[:, 2 * p:4 * p:2] = answers  # input position of query key q_i predicts a_i
    return tokens[:, :-1], targets


class MQARLoader:
    """Training batches of MQAR for `data.format=mqar`, laid out like the text loader's (accum, micro, 2, T + 1):
    channel 0 the tokens, channel 1 the target of the previous position (so `batch[..., 1, 1:]` lines up with
    `batch[..., 0, :-1]`).  Global batch `step` is a function of (seed, step) only: exact resume on any layout."""

    def __init__(self, spec: MQARSpec, global_batch: int, micro_batch: int, rank: int, world: int, seed: int):
        spec.check()
        self.spec, self.global_batch, self.micro, self.rank, self.world = spec, global_batch, micro_batch, rank, world
        self.seed, self.step = seed, 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        self.step += 1
        inputs, targets = mqar_batch(self.spec, self.global_batch, generator)
        local = self.global_batch // self.world
        inputs, targets = (x[self.rank * local:(self.rank + 1) * local] for x in (inputs, targets))
        batch = torch.stack([torch.nn.functional.pad(inputs, (0, 1)),
                             torch.nn.functional.pad(targets, (1, 0), value=IGNORE)], dim=1)
        return batch.view(local // self.micro, self.micro, 2, self.spec.seq_len + 1)

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]

    def close(self) -> None:
        pass


