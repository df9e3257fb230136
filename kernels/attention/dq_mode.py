"""Which dQ the Triton attention backward computes: a process-wide switch, read when the backward runs."""

from __future__ import annotations

import os

import torch

DQ_MODES = ("deterministic", "atomic")
_dq_mode = os.environ.get("HYLO_ATTENTION_DQ", "deterministic")


def set_backward_dq(mode: str) -> None:
    """How the Triton backward computes dQ (also `HYLO_ATTENTION_DQ`, or `train.attention_dq`):

    deterministic  the default: a dQ kernel of its own recomputes the scores; every sum runs in a fixed order, so
                   gradients are bit-reproducible run to run
    atomic         FlashAttention-2's way: the dK/dV kernel adds each tile's dQ share into a float32 buffer with
                   atomics; one pass over the scores instead of two, but float32 sums in arrival order

    `torch.use_deterministic_algorithms(True)` keeps the deterministic kernel whatever is set here."""
    global _dq_mode
    if mode not in DQ_MODES:
        raise ValueError(f"attention dQ mode '{mode}' is not one of {list(DQ_MODES)}")
    _dq_mode = mode


def atomic_dq() -> bool:
    """Whether the Triton backward adds dQ atomically (see `set_backward_dq`)."""
    if _dq_mode not in DQ_MODES:
        raise ValueError(f"HYLO_ATTENTION_DQ='{_dq_mode}' is not one of {list(DQ_MODES)}")
    return _dq_mode == "atomic" and not torch.are_deterministic_algorithms_enabled()
