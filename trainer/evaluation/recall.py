"""Recall tasks: multi-query associative recall (MQAR, from the Zoology and BASED papers) and passkey retrieval
(needle in a haystack): scoring for both, the passkey generator and a heat-map image (MQAR's sequences and its
training data source: trainer/data/mqar.py).

MQAR sequence (token ids are task ids, not text):  k1 v1 k2 v2 ... kN vN | q1 a1 q2 a2 ... qN aN | 0 0 ...
Keys come from [1, 1 + n_keys), values from [1 + n_keys, 1 + n_keys + n_values); the query part asks every key
once, in a random order, and the model must predict each answer a_i at the position of its query key q_i (the
target of input position t is the token at t + 1).  Only those N positions are scored and trained on.

Passkey: filler text with "The pass key is 48213. Remember it. 48213 is the pass key." inserted at a depth
(0 = start, 1 = just before the question), then "What is the pass key? The pass key is"; the model must produce
the digits.  Accuracy per (length, depth) cell, all answer tokens right under teacher forcing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hylo.trainer.data.mqar import IGNORE, MQARSpec, mqar_batch


def recall_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """(correct, scored) over the positions whose target is not IGNORE; argmax prediction.  `logits` are either
    every position's (batch, T, vocab) or only the scored positions' (n, vocab), as `model(..., logits_at=)`
    gives them."""
    scored = targets != IGNORE
    if logits.dim() == 2:
        return int((logits.argmax(-1) == targets[scored]).sum()), int(scored.sum())
    correct = (logits.argmax(-1) == targets) & scored
    return int(correct.sum()), int(scored.sum())


@torch.no_grad()
def mqar_accuracy(model: torch.nn.Module, spec: MQARSpec, n: int = 256, batch_size: int = 64, seed: int = 1234,
                  device: torch.device | str = "cpu") -> float:
    """Accuracy on a fixed set of n sequences (the same for a given seed)."""
    generator = torch.Generator().manual_seed(seed)
    correct = total = 0
    for start in range(0, n, batch_size):
        inputs, targets = mqar_batch(spec, min(batch_size, n - start), generator)
        scored = (targets != IGNORE).to(device)  # only these positions' logits: never (batch, T, vocab)
        c, t = recall_accuracy(model(inputs.to(device), logits_at=scored).float().cpu(), targets)
        correct, total = correct + c, total + t
    return correct / total



# ---------------------------------------------------------------------------------------------------- passkey
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


@dataclass
class PasskeySample:
    tokens: torch.Tensor  # (T,) prompt followed by the answer tokens
    answer: torch.Tensor  # the answer's token ids (the last len(answer) tokens of `tokens`)
    needle_start: int  # token index where the needle begins
    needle_len: int
    depth: float  # requested depth in [0, 1]


def passkey_sample(tokenizer, length: int, depth: float, rng: np.random.Generator) -> PasskeySample:
    """A prompt of exactly `length` tokens (filler, needle at `depth` of the filler, question, answer)."""
    key = str(rng.integers(10_000, 100_000))
    enc = lambda text: tokenizer.encode(text).ids  # noqa: E731
    needle, question, answer = enc(NEEDLE.format(key=key)), enc(QUESTION), enc(" " + key)
    filler_len = length - len(needle) - len(question) - len(answer)
    if filler_len < 0:
        raise ValueError(f"passkey length {length} is shorter than the needle, question and answer "
                         f"({length - filler_len} tokens)")
    unit = enc(FILLER)
    filler = (unit * (filler_len // len(unit) + 1))[:filler_len]
    at = round(depth * filler_len)
    tokens = filler[:at] + needle + filler[at:] + question + answer
    return PasskeySample(torch.tensor(tokens), torch.tensor(answer), at, len(needle), depth)


def passkey_correct(logits: torch.Tensor, sample: PasskeySample) -> bool:
    """logits (T, vocab) of the sample's tokens, or only of the len(answer) positions where the answer tokens are
    due (position t predicts token t + 1): right iff every answer token is the argmax where it is due."""
    n = len(sample.answer)
    predicted = (logits if logits.shape[0] == n else logits[-n - 1:-1]).argmax(-1)
    return bool((predicted.cpu() == sample.answer).all())


@torch.no_grad()
def passkey_grid(model: torch.nn.Module, tokenizer, lengths: list[int], depths: list[float], trials: int = 4,
                 seed: int = 0, device: torch.device | str = "cpu") -> np.ndarray:
    """Accuracy (len(lengths), len(depths)) over `trials` random pass keys per cell."""
    rng = np.random.default_rng(seed)
    grid = np.zeros((len(lengths), len(depths)))
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            samples = [passkey_sample(tokenizer, length, depth, rng) for _ in range(trials)]
            tokens = torch.stack([s.tokens for s in samples]).to(device)
            due = torch.zeros(tokens.shape, dtype=torch.bool, device=device)  # where the answer tokens are due
            for row, s in enumerate(samples):
                due[row, -len(s.answer) - 1:-1] = True
            logits = model(tokens, logits_at=due).float().split([len(s.answer) for s in samples])
            grid[i, j] = np.mean([passkey_correct(lg, s) for lg, s in zip(logits, samples, strict=True)])
    return grid


def heatmap_image(grid: np.ndarray) -> np.ndarray:
    """(3, H, W) uint8 image of a [0, 1] grid for TensorBoard's add_image: red (0) -> green (1), 16 px per cell,
    rows = lengths (short at the top), columns = depths (start at the left)."""
    g = np.clip(grid, 0.0, 1.0)
    rgb = np.stack([(1 - g) * 220 + 20, g * 200 + 30, np.full_like(g, 40)]).astype(np.uint8)
    return rgb.repeat(16, axis=1).repeat(16, axis=2)
