"""Activation checkpointing policies, applied to a plain model from outside (as torchtitan's parallelize step does).
Parameter names do not change, so checkpoints are interchangeable between policies.

  none       autograd keeps what every op saves
  selective  each block keeps its input and what its mixer op produced (attention output and lse, RAT's chunk
             summaries, the linear layers' outputs): the expensive part.  Norms, projections, the MLP and the
             residual adds are recomputed in backward.  torch's selective checkpointing (a per-op policy, as in
             torchtitan): every op run inside the mixer's `op` call is cached, everything else recomputed.
  full       each block keeps only its input; its whole forward runs again in backward

README "Memory" lists what each layer type keeps under each policy (the planner's model, trainer/plan.py).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

POLICIES = ("none", "selective", "full")

_inside = threading.local()  # depth of mixer-op calls on this thread (the autograd engine runs recompute here too)


def _keep_mixer_ops(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # Views are free to recompute, and a cached view would keep its whole base alive (a projection's output).
    if getattr(_inside, "depth", 0) and not getattr(op, "is_view", False):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _marked(op: Callable) -> Callable:
    """The mixer's op, run with the marker that makes the selective policy keep what it computes."""

    @functools.wraps(op)
    def run(*args, **kwargs):
        _inside.depth = getattr(_inside, "depth", 0) + 1
        try:
            return op(*args, **kwargs)
        finally:
            _inside.depth -= 1

    run.marked_op = op
    return run


def _selective_contexts():
    # The chunked PyTorch paths fill buffers in place after creating them; the cache holds their final contents,
    # which is what the recompute reads back.
    return create_selective_checkpoint_contexts(_keep_mixer_ops, allow_cache_entry_mutation=True)


def _recomputed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _selectively_recomputed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, context_fn=_selective_contexts, **kwargs)


def apply_activation_checkpointing(model: nn.Module, policy: str = "full") -> None:
    """Wrap the forward of every block in `model.blocks` by `policy` (after context parallelism has swapped the
    mixers' ops, before torch.compile, FSDP2 or DeepSpeed wrap the blocks)."""
    if policy not in POLICIES:
        raise ValueError(f"activation checkpointing policy '{policy}' is not one of {list(POLICIES)}")
    if policy == "none":
        return
    for block in model.blocks:
        if policy == "selective":
            if not hasattr(block.mixer.op, "marked_op"):
                block.mixer.op = _marked(block.mixer.op)
            block.forward = functools.partial(_selectively_recomputed, block.forward)
        else:
            block.forward = functools.partial(_recomputed, block.forward)
