"""Activation checkpointing policies, applied to a plain model from outside (as torchtitan's parallelize step does).
Parameter names do not change, so checkpoints are interchangeable between policies.

  none       autograd keeps what every op saves
  selective  each block keeps its input and what its mixer op needs (the expensive part, never rerun); the norms,
             projections, residual adds and the MLP are recomputed in backward
  full       each block keeps only its input; its whole forward runs again in backward

`selective` is torch's selective checkpointing with a per-op policy (as in torchtitan), keyed on the mixer's `op`
call, in one of two ways by how the op runs:
  fused      (the Triton/SDPA kernels a GPU runs) the outputs of the fused ops inside the call (hylo's Triton
             ops, SDPA, convolutions, collectives) are cached, so attention output and lse, RAT's chunk summaries
             and the linear layers' outputs are kept, the op's inputs (q, k, v) are recomputed with the
             projections, and under context parallelism the collectives are not re-sent.  Where a GPU call falls
             back to the PyTorch path after all (a RAT chunk over 128, a decay that wants its gradient) nothing in
             it is cached and the op is recomputed, as under `full`.
  composite  (the PyTorch paths of a CPU: many small ops) the op runs outside the checkpoint, keeping exactly
             what its own backward needs, and backward hands its outputs to the recompute instead of rerunning
             it (caching its every intermediate would keep more than no checkpointing).

README "Long-context memory" lists what each layer type keeps under each policy (the planner's model,
trainer/memory_plan.py, which is of the fused kind).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from hylo.kernels import dispatch

POLICIES = ("none", "selective", "full")

# Per thread (backward recomputes on the thread that runs it): how deep inside a fused mixer-op call we are, and
# which phase of which selective checkpoint is running, with the outputs its composite op calls stashed.
_state = threading.local()


_FUSED_NAMESPACES = ("hylo", "c10d", "_c10d_functional")


def _is_fused(op) -> bool:
    """One of the expensive single ops: hylo's Triton kernels, SDPA's, a convolution, a collective.  (Only these
    are cached: an intermediate of a PyTorch path would keep more than its backward needs.)"""
    namespace = getattr(op, "namespace", "")
    return namespace in _FUSED_NAMESPACES or (namespace == "aten" and any(
        name in str(op) for name in ("scaled_dot_product", "convolution")))


def _keep_mixer_ops(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if getattr(_state, "depth", 0) and _is_fused(op):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class _Stash:
    """A composite op's outputs, saved in forward and read back in order by each recompute."""

    def __init__(self):
        self.outputs: list = []
        self.next = 0


class _Phase(contextlib.AbstractContextManager):
    """torch's selective-checkpoint context for one phase, plus the phase and stash the mixer ops read."""

    def __init__(self, inner, name: str, stash: _Stash):
        self.inner, self.phase = inner, (name, stash)

    def __enter__(self):
        self.outer = getattr(_state, "phase", None)
        _state.phase = self.phase
        self.phase[1].next = 0  # a second backward through the graph recomputes from the start again
        return self.inner.__enter__()

    def __exit__(self, *exc):
        _state.phase = self.outer
        return self.inner.__exit__(*exc)


def _selective_contexts():
    # The fused path's cache may hold buffers the op filled in place; it keeps their final contents, which is
    # what the recompute reads back.
    forward, recompute = create_selective_checkpoint_contexts(_keep_mixer_ops, allow_cache_entry_mutation=True)
    stash = _Stash()
    return _Phase(forward, "forward", stash), _Phase(recompute, "recompute", stash)


def _runs_fused(args) -> bool:
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return first is not None and dispatch.triton_fits(first)


def _marked(op: Callable) -> Callable:
    """The mixer's op as selective checkpointing runs it (module docstring); outside a checkpoint, just the op."""

    @functools.wraps(op)
    def run(*args, **kwargs):
        phase = getattr(_state, "phase", None)
        if phase is None or _runs_fused(args):
            _state.depth = getattr(_state, "depth", 0) + 1
            try:
                return op(*args, **kwargs)
            finally:
                _state.depth -= 1
        name, stash = phase
        if name == "recompute":
            stash.next += 1
            return stash.outputs[stash.next - 1]
        with saved_tensors_hooks(lambda t: t, lambda t: t):  # saved by the op's own graph, not the checkpoint
            out = op(*args, **kwargs)
        stash.outputs.append(out)
        return out

    run.marked_op = op
    return run


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
