"""Halo exchange for layers that look a fixed distance back: sliding-window attention (W-1 tokens of k/v) and
BaseConv (kernel-1 inputs).  Only the tokens a segment needs cross ranks — never a full ring — fetched point to
point from whichever ranks hold them (with zigzag that is not always the left neighbour, and a window longer
than a segment spans several).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import attention, short_conv
from parallel.context import CPContext, Segment, exchange, refuse_documents, split_segments


@dataclass(frozen=True)
class Piece:
    src: int  # CP rank holding the tokens
    src_offset: int  # in the source's local layout
    dst: int  # CP rank needing them
    dst_segment: int  # which of the destination's segments
    dst_offset: int  # in that segment's halo
    length: int


def halo_plan(segments: list[list[Segment]], h: int) -> tuple[list[Piece], list[list[int]]]:
    """All pieces that move (same list, same order on every rank) and each rank's halo length per segment."""
    pieces, halo_lengths = [], []
    for dst, segs in enumerate(segments):
        lengths = []
        for si, (a, _) in enumerate(segs):
            lo_needed = max(0, a - h)
            lengths.append(a - lo_needed)
            for src, src_segs in enumerate(segments):
                offset = 0
                for b, n in src_segs:
                    lo, hi = max(lo_needed, b), min(a, b + n)
                    if lo < hi:
                        pieces.append(Piece(src, offset + lo - b, dst, si, lo - lo_needed, hi - lo))
                    offset += n
        halo_lengths.append(lengths)
    return pieces, halo_lengths


class _HaloFetch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cp: CPContext, pieces: list[Piece], lengths: list[int], key: str):
        ctx.cp, ctx.pieces, ctx.key, ctx.t_local = cp, pieces, key, x.shape[1]
        me = cp.rank
        halos = [x.new_zeros(x.shape[0], n, *x.shape[2:]) for n in lengths]
        sends = {}
        for dst in range(cp.size):
            mine = [p for p in pieces if p.src == me and p.dst == dst]
            if dst == me:
                for p in mine:
                    part = x[:, p.src_offset:p.src_offset + p.length]
                    halos[p.dst_segment][:, p.dst_offset:p.dst_offset + p.length] = part
            elif mine:
                sends[cp.global_rank(cp.group, dst)] = torch.cat(
                    [x[:, p.src_offset:p.src_offset + p.length] for p in mine], dim=1)
        incoming = {src: [p for p in pieces if p.src == src and p.dst == me] for src in range(cp.size) if src != me}
        recvs = {cp.global_rank(cp.group, src): x.new_empty(x.shape[0], sum(p.length for p in ps), *x.shape[2:])
                 for src, ps in incoming.items() if ps}
        exchange(sends, recvs, key)
        for src, ps in incoming.items():
            if ps:
                for p, part in zip(ps, recvs[cp.global_rank(cp.group, src)].split([p.length for p in ps], 1),
                                   strict=True):
                    halos[p.dst_segment][:, p.dst_offset:p.dst_offset + p.length] = part
        return tuple(halos)

    @staticmethod
    def backward(ctx, *grads):
        cp, me = ctx.cp, ctx.cp.rank
        ref = next(g for g in grads if g is not None)
        grads = [torch.zeros_like(ref[:, :0]) if g is None else g for g in grads]
        grad_x = ref.new_zeros(ref.shape[0], ctx.t_local, *ref.shape[2:])
        sends = {}
        for src in range(cp.size):  # send each piece's gradient back to where the piece came from
            mine = [p for p in ctx.pieces if p.dst == me and p.src == src]
            if src == me:
                for p in mine:
                    grad_x[:, p.src_offset:p.src_offset + p.length] += \
                        grads[p.dst_segment][:, p.dst_offset:p.dst_offset + p.length]
            elif mine:
                sends[cp.global_rank(cp.group, src)] = torch.cat(
                    [grads[p.dst_segment][:, p.dst_offset:p.dst_offset + p.length] for p in mine], dim=1)
        outgoing = {dst: [p for p in ctx.pieces if p.src == me and p.dst == dst] for dst in range(cp.size) if dst != me}
        recvs = {cp.global_rank(cp.group, dst): ref.new_empty(ref.shape[0], sum(p.length for p in ps), *ref.shape[2:])
                 for dst, ps in outgoing.items() if ps}
        exchange(sends, recvs, ctx.key + "/backward")
        for dst, ps in outgoing.items():
            if ps:
                for p, part in zip(ps, recvs[cp.global_rank(cp.group, dst)].split([p.length for p in ps], 1),
                                   strict=True):
                    grad_x[:, p.src_offset:p.src_offset + p.length] += part
        return grad_x, None, None, None, None


def fetch_halos(x: torch.Tensor, cp: CPContext, h: int, key: str) -> list[torch.Tensor]:
    """For each of this rank's segments, the (up to) h tokens of x (dim 1) that precede it in the sequence."""
    pieces, lengths = halo_plan(cp.segments, h)
    return list(_HaloFetch.apply(x, cp, pieces, lengths[cp.rank], key))


class HaloWindowAttention:
    """`attention` for sliding-window layers under CP: each segment's queries attend to the segment's keys plus
    the W-1 keys before it, fetched as a halo."""

    def __init__(self, cp: CPContext):
        self.cp = cp

    def __call__(self, q, k, v, *, window=None, sink=None, scale=None, return_lse=False, n_pinned=0, **kw):
        refuse_documents(kw)
        if window is None or n_pinned:
            raise ValueError("halo attention needs a window and no pinned tokens")
        kv = torch.cat([k, v], dim=-1)
        halos = fetch_halos(kv, self.cp, window - 1, f"{self.cp.tag}/halo")
        outs, lses = [], []
        segs = self.cp.local_segments
        for qs, kvs, halo in zip(split_segments(q, segs), split_segments(kv, segs), halos, strict=True):
            keys = torch.cat([halo, kvs], dim=1)
            o, lse = attention(qs, keys[..., :k.shape[-1]], keys[..., k.shape[-1]:], window=window, sink=sink,
                               scale=scale, return_lse=True, **kw)
            outs.append(o)
            lses.append(lse)
        out = torch.cat(outs, dim=1)
        return (out, torch.cat(lses, dim=-1)) if return_lse else out


class HaloConv:
    """`short_conv` under CP: each segment starts from the kernel-1 inputs before it, fetched as a halo."""

    def __init__(self, cp: CPContext):
        self.cp = cp

    def __call__(self, x, weight, bias=None, **kw):
        refuse_documents(kw)
        k = weight.shape[1]
        halos = fetch_halos(x, self.cp, k - 1, f"{self.cp.tag}/halo")
        outs = []
        for xs, halo in zip(split_segments(x, self.cp.local_segments), halos, strict=True):
            if halo.shape[1] < k - 1:  # the sequence start: zeros before it
                halo = torch.cat([halo.new_zeros(halo.shape[0], k - 1 - halo.shape[1], *halo.shape[2:]), halo], 1)
            outs.append(short_conv(xs, weight, bias, initial_state=halo, **kw))
        return torch.cat(outs, dim=1)
