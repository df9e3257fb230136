"""Apply context parallelism to a plain model from outside: lay the sequence out over the CP ranks of the device
mesh and swap each mixer's op for the context-parallel op it declares (`Mixer.context_parallel_op`, models/
mixer.py).  The strategies, one file each:

  ring.py          full attention, zigzag ring (K/V passed around, lse merges)
  ulysses.py       full attention, all-to-all from sequence to heads
  (hybrid)         Ulysses inside each ring slot, ring across — `full_attention_op` below picks by cp_mode
  halo.py          sliding windows and short convolutions: the previous W-1 / K-1 tokens from the left neighbour
  linear_state.py  TNL and BASED: one all-gather of per-segment states
  rat.py           RAT: one all-gather of chunk summaries
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from hylo.kernels.ops import attention
from hylo.parallel.layout import CPContext, cp_degree_ulysses, cp_segments, layout_problem
from hylo.parallel.ring import RingAttention
from hylo.parallel.ulysses import UlyssesAttention


def cp_config_problem(cfg, world: int, layer_classes: Iterable[type]) -> str | None:
    """Why parallel.cp/cp_mode/ulysses do not fit this run (the layout, or a layer type's own constraint from
    its `cp_problem`), or None.  Checked before any work starts."""
    p, seq = cfg.parallel, cfg.train.seq_len
    if p.cp < 1 or world % p.cp:
        return f"parallel.cp={p.cp} must divide the number of ranks ({world}); the rest is data parallel"
    if p.cp == 1:
        return None
    problem = layout_problem(seq, p.cp, p.cp_mode, p.ulysses)
    if problem:
        return problem
    segments = cp_segments(seq, p.cp, p.cp_mode, cp_degree_ulysses(p.cp, p.cp_mode, p.ulysses))
    for cls in layer_classes:
        problem = cls.cp_problem(cfg, segments)
        if problem:
            return problem
    return None


def make_context(mesh: DeviceMesh, seq_len: int, mode: str, ulysses: int) -> CPContext:
    group = mesh.get_group("cp")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    u = cp_degree_ulysses(size, mode, ulysses)
    ctx = CPContext(group=group, size=size, rank=rank, mode=mode, ulysses=u,
                    segments=cp_segments(seq_len, size, mode, u))
    if mode == "hybrid":
        # every rank must create every group, in the same order
        members = [dist.get_global_rank(group, i) for i in range(size)]
        ring = size // u
        for i in range(u):
            g = dist.new_group([members[j * u + i] for j in range(ring)])
            if rank % u == i:
                ctx.ring_group = g
        for j in range(ring):
            g = dist.new_group(members[j * u:(j + 1) * u])
            if rank // u == j:
                ctx.ulysses_group = g
    elif mode == "ulysses":
        ctx.ulysses_group = group
    return ctx


def full_attention_op(ctx: CPContext, backend: str = "auto"):
    """Full causal attention by parallel.cp_mode: ring, Ulysses, or Ulysses inside a ring (hybrid); `backend`
    names the kernels every step runs on (auto: kernels/dispatch.py's choice)."""
    if ctx.mode == "ring":
        return RingAttention(ctx.group, ctx.segments, key="full/ring", backend=backend)
    if ctx.mode == "ulysses":
        inner = attention if backend == "auto" else partial(attention, backend=backend)
        return UlyssesAttention(ctx.group, ctx.segments, inner, key="full/ulysses")
    u = ctx.ulysses
    ring_segments = cp_segments(ctx.seq_len, ctx.size // u, "ring")
    ring = RingAttention(ctx.ring_group, ring_segments, key="full/ring", backend=backend)
    j = ctx.rank // u
    return UlyssesAttention(ctx.ulysses_group, ctx.segments[j * u:(j + 1) * u], ring, key="full/ulysses",
                            seq_len=ctx.seq_len)


def apply_context_parallel(model: nn.Module, ctx: CPContext) -> None:
    """Swap every mixer's op for its context-parallel version (in place; the model stays a plain model)."""
    for block in model.blocks:
        block.mixer.op = block.mixer.context_parallel_op(ctx.tagged(block.mixer.layer_type))
