"""Halo exchange for layers that look a fixed distance back: sliding-window attention (W-1 tokens of k/v) and
BaseConv (kernel-1 inputs).  Only the tokens a segment needs cross ranks — never a full ring — fetched point to
point from whichever ranks hold them (with zigzag that is not always the left neighbour, and a window longer
than a segment spans several).  With packed documents a halo stops at the start of the segment's first document:
tokens of an earlier document are never fetched, and a document starting inside a segment sees zeros (BaseConv)
or nothing (attention) before its first token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hylo.kernels.ops import attention, short_conv
from hylo.parallel.layout import CPContext, Segment, SequenceLayout, exchange, sequence_layout, split_segments


@dataclass(frozen=True)
class Piece:
    src: int  # CP rank holding the tokens
    src_offset: int  # in the source's local layout
    dst: int  # CP rank needing them
    dst_segment: int  # which of the destination's segments
    dst_offset: int  # in that segment's halo
    length: int


def halo_plan(segments: list[list[Segment]], first_needed: Callable[[int], int]
              ) -> tuple[list[Piece], list[list[int]]]:
    """All pieces that move (same list, same order on every rank) and each rank's halo length per segment: the
    tokens [first_needed(a), a) before each segment starting at a."""
    pieces, halo_lengths = [], []
    for dst, segs in enumerate(segments):
        lengths = []
        for si, (a, _) in enumerate(segs):
            lo_needed = first_needed(a)
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


def fetch_halos(x: torch.Tensor, cp: CPContext, layout: SequenceLayout, first_needed: Callable[[int], int],
                key: str) -> list[torch.Tensor]:
    """For each of this rank's segments (in `layout`), the tokens of x (dim 1) from first_needed(start) to it."""
    pieces, lengths = halo_plan(layout.segments, first_needed)
    return list(_HaloFetch.apply(x, cp, pieces, lengths[cp.rank], key))


def within_document(layout: SequenceLayout, h: int) -> Callable[[int], int]:
    """The h tokens before a segment, but none before its document's start."""
    return lambda a: max(a - h, layout.doc_start(a))


class HaloWindowAttention:
    """`attention` for sliding-window layers under CP: each segment's queries attend to the segment's keys plus
    the W-1 keys before it, fetched as a halo."""

    def __init__(self, cp: CPContext):
        self.cp = cp

    def __call__(self, q, k, v, *, window=None, sink=None, scale=None, return_lse=False, n_pinned=0, cu_seqlens=None,
                 **kw):
        if window is None or n_pinned:
            raise ValueError("halo attention needs a window and no pinned tokens")
        layout = sequence_layout(self.cp.segments, cu_seqlens, q, self.cp.rank, "halo window attention")
        kv = torch.cat([k, v], dim=-1)
        halos = fetch_halos(kv, self.cp, layout, within_document(layout, window - 1), f"{self.cp.tag}/halo")
        outs, lses = [], []
        segs = layout.segments[self.cp.rank]
        d = k.shape[-1]
        for qs, kvs, halo, (a, n) in zip(split_segments(q, segs), split_segments(kv, segs), halos, segs, strict=True):
            # The segment's first document continues the halo; documents starting inside it are a packed call.
            docs = layout.local_cu_seqlens(a, n)
            first = n if docs is None else int(docs[1])
            keys = torch.cat([halo, kvs[:, :first]], dim=1)
            o, lse = attention(qs[:, :first], keys[..., :d], keys[..., d:], window=window, sink=sink, scale=scale,
                               return_lse=True, **kw)
            outs.append(o)
            lses.append(lse)
            if first < n:
                o, lse = attention(qs[:, first:], kvs[:, first:, :, :d], kvs[:, first:, :, d:], window=window,
                                   sink=sink, scale=scale, return_lse=True, cu_seqlens=docs[1:] - first, **kw)
                outs.append(o)
                lses.append(lse)
        out = torch.cat(outs, dim=1)
        return (out, torch.cat(lses, dim=-1)) if return_lse else out


class HaloConv:
    """`short_conv` under CP: each segment starts from the kernel-1 inputs before it, fetched as a halo."""

    def __init__(self, cp: CPContext):
        self.cp = cp

    def __call__(self, x, weight, bias=None, *, cu_seqlens=None, **kw):
        k = weight.shape[1]
        layout = sequence_layout(self.cp.segments, cu_seqlens, x, self.cp.rank, "halo convolution")
        halos = fetch_halos(x, self.cp, layout, within_document(layout, k - 1), f"{self.cp.tag}/halo")
        outs = []
        segs = layout.segments[self.cp.rank]
        for xs, halo, (a, n) in zip(split_segments(x, segs), halos, segs, strict=True):
            if halo.shape[1] < k - 1:  # a sequence or document start: zeros before it
                halo = torch.cat([halo.new_zeros(halo.shape[0], k - 1 - halo.shape[1], *halo.shape[2:]), halo], 1)
            # the halo is the first document's; later documents in the segment start from zeros
            outs.append(short_conv(xs, weight, bias, initial_state=halo, cu_seqlens=layout.local_cu_seqlens(a, n),
                                   **kw))
        return torch.cat(outs, dim=1)
