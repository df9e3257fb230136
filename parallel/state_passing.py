"""Lightning and BASED linear attention under CP, LASP-2 style: each rank computes, per segment, the state the
segment leaves behind (from a zero start), one all-gather shares these states, and each rank sums the decayed
states of all earlier segments into the state entering each of its own, then runs its segments with it.
Communication is O(state) per rank, independent of T; the backward mirrors it through the gather.

Packed documents: a boundary cuts everything before it.  A segment's contribution to later segments is its state
after its last boundary (its whole state when it holds none), and the state entering a segment sums only the
segments that hold tokens of the segment's first document; documents starting inside a segment start from zero
(the op's own `cu_seqlens`).
"""

from __future__ import annotations

import torch

from hylo.kernels.based import taylor_features
from hylo.kernels.dispatch import upcast
from hylo.kernels.ops import based_linear_attention, lightning_attention
from hylo.parallel.layout import CPContext, SequenceLayout, all_gather, sequence_layout, split_segments


def _last_document(layout: SequenceLayout, start: int, n: int) -> int:
    """Offset in segment [start, start + n) of its last document's first token (0 when it holds no boundary)."""
    return max([0] + [b - start for b in layout.bounds if start < b < start + n])


def _feeding(layout: SequenceLayout, start: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cp, n_seg) mask of the segments whose state flows into the segment starting at `start` — they end at or
    before it and after its document's start — and their distance to it."""
    ends = torch.tensor([[s + n for s, n in segs] for segs in layout.segments], device=device)
    return (ends <= start) & (ends > layout.doc_start(start)), (start - ends).clamp(min=0)


def _result(outs: list, segs, layout: SequenceLayout, output_final_state: bool):
    """The rank's output; with `output_final_state`, also the state after the sequence's last token on the rank
    holding it and zeros on the others (so a sum over the CP group gives every rank the sequence's)."""
    out = torch.cat([o for o, _ in outs], dim=1)
    if not output_final_state:
        return out
    ends_sequence = [i for i, (a, n) in enumerate(segs) if a + n == layout.bounds[-1]]
    final = outs[ends_sequence[0] if ends_sequence else 0][1]
    if not ends_sequence:
        final = tuple(torch.zeros_like(s) for s in final) if isinstance(final, tuple) else torch.zeros_like(final)
    return out, final


class LightningCP:
    def __init__(self, cp: CPContext):
        self.cp = cp

    def __call__(self, q, k, v, decay, *, output_final_state: bool = False, cu_seqlens=None, **kw):
        cp = self.cp
        layout = sequence_layout(cp.segments, cu_seqlens, q, cp.rank, "lightning attention")
        segs = layout.segments[cp.rank]
        s = upcast(decay.to(q.dtype))
        ks, vs = split_segments(k, segs), split_segments(v, segs)
        # The state each local segment leaves: sum_j lambda^(n-1-j) k_j^T v_j over its last document's tokens.
        own = []
        for kk, vv, (a, n) in zip(ks, vs, segs, strict=True):
            j0 = _last_document(layout, a, n)
            w = torch.exp(-s[:, None] * torch.arange(n - 1, -1, -1, device=q.device, dtype=s.dtype))  # (H, n)
            own.append(torch.einsum("bjhd,hj,bjhe->bhde", upcast(kk[:, j0:]), w[:, j0:], upcast(vv[:, j0:])))
        states = all_gather(torch.stack(own), cp, "states")  # (cp, n_seg, B, H, d, e)
        outs = []
        for qq, kk, vv, (a, n) in zip(split_segments(q, segs), ks, vs, segs, strict=True):
            # The state entering this segment: earlier segments' states decayed over the distance since.
            # One weighted sum over *all* gathered states (zero weight for the rest), so every rank joins the
            # gather's backward even when nothing feeds its segments (a rank skipping it would deadlock).
            feeding, dist_ = _feeding(layout, a, q.device)
            weights = torch.exp(-s[None, None, :] * dist_[..., None].to(s.dtype)) * feeding[..., None]
            init = torch.einsum("rnbhde,rnh->bhde", states, weights)
            outs.append(lightning_attention(qq, kk, vv, decay, initial_state=init, output_final_state=True,
                                            cu_seqlens=layout.local_cu_seqlens(a, n), **kw))
        return _result(outs, segs, layout, output_final_state)


class BasedCP:
    def __init__(self, cp: CPContext):
        self.cp = cp

    def __call__(self, q, k, v, *, output_final_state: bool = False, cu_seqlens=None, **kw):
        cp = self.cp
        layout = sequence_layout(cp.segments, cu_seqlens, q, cp.rank, "BASED linear attention")
        segs = layout.segments[cp.rank]
        ks, vs = split_segments(k, segs), split_segments(v, segs)
        own_s, own_z = [], []
        for kk, vv, (a, n) in zip(ks, vs, segs, strict=True):
            j0 = _last_document(layout, a, n)
            phi = taylor_features(upcast(kk[:, j0:]))
            own_s.append(torch.einsum("bjhf,bjhe->bhfe", phi, upcast(vv[:, j0:])))
            own_z.append(phi.sum(1))
        s_all = all_gather(torch.stack(own_s), cp, "states")  # (cp, n_seg, B, H, F, e)
        z_all = all_gather(torch.stack(own_z), cp, "normalisers")
        outs = []
        for qq, kk, vv, (a, n) in zip(split_segments(q, segs), ks, vs, segs, strict=True):
            feeding = _feeding(layout, a, q.device)[0].to(s_all.dtype)  # every rank uses the gathered states
            init = (torch.einsum("rnbhfe,rn->bhfe", s_all, feeding), torch.einsum("rnbhf,rn->bhf", z_all, feeding))
            outs.append(based_linear_attention(qq, kk, vv, initial_state=init, output_final_state=True,
                                               cu_seqlens=layout.local_cu_seqlens(a, n), **kw))
        return _result(outs, segs, layout, output_final_state)
