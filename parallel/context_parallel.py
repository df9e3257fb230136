"""Apply context parallelism to a plain model from outside: build the (dp, cp) mesh, lay the sequence out over
the CP ranks, and swap each mixer's op for the CP version its math needs:

  full       ring (zigzag) | Ulysses | hybrid (Ulysses inside, ring across)   -- by parallel.cp_mode
  swa        halo of the previous W-1 keys/values
  baseconv   halo of the previous kernel-1 inputs
  tnl, based state passing (one all-gather of per-segment states)
  rat        one all-gather of chunk summaries
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from kernels import attention
from parallel.context import CPContext, cp_segments, layout_problem
from parallel.halo import HaloConv, HaloWindowAttention
from parallel.linear_state import BasedCP, LightningCP
from parallel.rat import RatCP
from parallel.ring import RingAttention
from parallel.ulysses import UlyssesAttention


def cp_config_problem(cfg, world: int) -> str | None:
    """Why parallel.cp/cp_mode/ulysses do not fit this run, or None.  Checked before any work starts."""
    p, m, seq = cfg.parallel, cfg.model, cfg.train.seq_len
    if p.cp < 1 or world % p.cp:
        return f"parallel.cp={p.cp} must divide the number of ranks ({world}); the rest is data parallel"
    if p.cp == 1:
        return None
    problem = layout_problem(seq, p.cp, p.cp_mode, p.ulysses)
    if problem:
        return problem
    types = set(m.pattern)
    u = p.cp if p.cp_mode == "ulysses" else p.ulysses if p.cp_mode == "hybrid" else 1
    if "full" in types and u > 1:
        kv = m.n_kv_heads or m.n_heads
        if m.n_heads % u:
            return f"cp_mode={p.cp_mode}: Ulysses over {u} ranks needs model.n_heads={m.n_heads} divisible by {u}"
        if kv % u and u % kv:
            return f"cp_mode={p.cp_mode}: model.n_kv_heads={kv} must divide or be divisible by the {u} Ulysses ranks"
    if m.attn.pinned and "swa" in types:
        return "model.attn.pinned is not supported with context parallelism yet; set model.attn.pinned=0"
    if "rat" in types:
        segs = cp_segments(seq, p.cp, p.cp_mode, p.ulysses)
        piece = segs[0][0][1]
        if piece % m.rat.chunk_size:
            return (f"RAT chunks may not straddle ranks: each rank's sequence pieces are {piece} tokens "
                    f"(train.seq_len={seq}, parallel.cp={p.cp}, cp_mode={p.cp_mode}), not a multiple of "
                    f"model.rat.chunk_size={m.rat.chunk_size}")
    return None


def build_mesh(world: int, cp: int, device: torch.device) -> DeviceMesh:
    return init_device_mesh(device.type, (world // cp, cp), mesh_dim_names=("dp", "cp"))


def make_context(mesh: DeviceMesh, seq_len: int, mode: str, ulysses: int) -> CPContext:
    group = mesh.get_group("cp")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    u = size if mode == "ulysses" else ulysses if mode == "hybrid" else 1
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


def full_attention_op(ctx: CPContext, seq_len: int):
    if ctx.mode == "ring":
        return RingAttention(ctx.group, ctx.segments, key="full/ring")
    if ctx.mode == "ulysses":
        return UlyssesAttention(ctx.group, ctx.segments, attention, key="full/ulysses")
    u = ctx.ulysses
    ring_segments = cp_segments(seq_len, ctx.size // u, "ring")
    ring = RingAttention(ctx.ring_group, ring_segments, key="full/ring")
    j = ctx.rank // u
    return UlyssesAttention(ctx.ulysses_group, ctx.segments[j * u:(j + 1) * u], ring, key="full/ulysses")


def apply_context_parallel(model: nn.Module, ctx: CPContext, seq_len: int) -> None:
    """Swap every mixer's op for its context-parallel version (in place; the model stays a plain model)."""
    full = full_attention_op(ctx, seq_len)
    per_type = {"swa": HaloWindowAttention, "baseconv": HaloConv, "tnl": LightningCP, "based": BasedCP,
                "rat": RatCP}
    for block in model.blocks:
        kind = block.layer_type
        if kind == "full":
            block.mixer.op = full
        elif kind in per_type:
            block.mixer.op = per_type[kind](CPContext(**{**ctx.__dict__, "tag": kind}))
        else:
            raise ValueError(f"layer type '{kind}' has no context-parallel implementation")


def shard_sequence(batch: torch.Tensor, ctx: CPContext) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of whole sequences (B, T) -> this CP rank's tokens (B, T/cp) and their global positions."""
    positions = ctx.positions(batch.device)
    return batch[:, positions], positions
