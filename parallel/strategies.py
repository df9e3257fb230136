"""Apply context parallelism to a plain model from outside: lay the sequence out over the CP ranks of the device
mesh and swap each mixer's op for its layer type's context-parallel op, looked up in `STRATEGIES` below (models/
knows nothing of this; a new layer type adds its row here).  The strategies, one file each:

  ring.py          full attention, zigzag ring (K/V passed around, lse merges)
  ulysses.py       full attention, all-to-all from sequence to heads
  (hybrid)         Ulysses inside each ring slot, ring across — `full_attention_op` below picks by cp_mode
  halo.py          sliding windows and short convolutions: the previous W-1 / K-1 tokens from the left neighbour
  state_passing.py     TNL and BASED: one all-gather of per-segment states
  summary_exchange.py  RAT: one all-gather of chunk summaries
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from hylo.kernels.ops import attention
from hylo.models.mixer import Mixer, with_backend
from hylo.parallel.halo import HaloConv, HaloWindowAttention
from hylo.parallel.layout import CPContext, cp_degree_ulysses, cp_segments, layout_problem
from hylo.parallel.ring import RingAttention
from hylo.parallel.state_passing import BasedCP, LightningCP
from hylo.parallel.summary_exchange import RatCP
from hylo.parallel.ulysses import UlyssesAttention


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


def ulysses_heads_problem(config, segments: list) -> str | None:
    """Ulysses (and the hybrid's inner Ulysses) splits the heads over its ranks."""
    p, m = config.parallel, config.model
    u = cp_degree_ulysses(p.cp, p.cp_mode, p.ulysses)
    if u > 1:
        kv = m.n_kv_heads or m.n_heads
        if m.n_heads % u:
            return f"cp_mode={p.cp_mode}: Ulysses over {u} ranks needs model.n_heads={m.n_heads} divisible by {u}"
        if kv % u and u % kv:
            return f"cp_mode={p.cp_mode}: model.n_kv_heads={kv} must divide or be divisible by the {u} Ulysses ranks"
    return None


def pinned_problem(config, segments: list) -> str | None:
    if config.model.attn.pinned:
        return "model.attn.pinned is not supported with context parallelism yet; set model.attn.pinned=0"
    return None


@dataclass(frozen=True)
class Strategy:
    """How one layer type runs with its sequence split over ranks: `op(mixer, ctx)` builds the op that replaces
    `mixer.op` (same signature, on the kernels the mixer's config names); `problem(config, segments)` is a reason
    it cannot run on this layout (segments: each CP rank's (global start, length) pieces), or None."""

    op: Callable[[Mixer, CPContext], Callable[..., Any]]
    problem: Callable[[Any, list], str | None] = lambda config, segments: None


STRATEGIES: dict[str, Strategy] = {
    "full": Strategy(lambda mixer, ctx: full_attention_op(ctx, mixer.backend), ulysses_heads_problem),
    "swa": Strategy(lambda mixer, ctx: with_backend(HaloWindowAttention(ctx), mixer.backend), pinned_problem),
    "baseconv": Strategy(lambda mixer, ctx: HaloConv(ctx)),
    "based": Strategy(lambda mixer, ctx: with_backend(BasedCP(ctx), mixer.backend)),
    "tnl": Strategy(lambda mixer, ctx: with_backend(LightningCP(ctx), mixer.backend)),
    "rat": Strategy(lambda mixer, ctx: with_backend(RatCP(ctx), mixer.backend)),
}


def cp_config_problem(cfg, world: int, layer_types: Iterable[str]) -> str | None:
    """Why parallel.cp/cp_mode/ulysses do not fit this run (the layout, or a layer type's own constraint under its
    strategy), or None.  Checked before any work starts."""
    p, seq = cfg.parallel, cfg.train.seq_len
    if p.cp < 1 or world % p.cp:
        return f"parallel.cp={p.cp} must divide the number of ranks ({world}); the rest is data parallel"
    if p.cp == 1:
        return None
    problem = layout_problem(seq, p.cp, p.cp_mode, p.ulysses)
    if problem:
        return problem
    segments = cp_segments(seq, p.cp, p.cp_mode, cp_degree_ulysses(p.cp, p.cp_mode, p.ulysses))
    for layer_type in layer_types:
        if layer_type not in STRATEGIES:
            return (f"layer type '{layer_type}' has no context-parallel strategy (parallel/strategies.py); "
                    "set parallel.cp=1")
        problem = STRATEGIES[layer_type].problem(cfg, segments)
        if problem:
            return problem
    return None


def apply_context_parallel(model: nn.Module, ctx: CPContext) -> None:
    """Swap every mixer's op for its layer type's context-parallel op (in place; the model stays a plain model)."""
    for block in model.blocks:
        mixer = block.mixer
        mixer.op = STRATEGIES[mixer.layer_type].op(mixer, ctx.tagged(mixer.layer_type))
