"""Activation checkpointing applied to a plain model from outside (as torchtitan's parallelize step does): each
block keeps only its input and recomputes its activations in backward.  Parameter names do not change, so
checkpoints are interchangeable with and without it."""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def _recomputed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap the forward of every block in `model.blocks` (before torch.compile, FSDP2 or DeepSpeed wrap it)."""
    for block in model.blocks:
        block.forward = functools.partial(_recomputed, block.forward)
