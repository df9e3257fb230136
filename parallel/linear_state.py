"""Lightning and BASED linear attention under CP, LASP-2 style: each rank computes, per segment, the state the
segment leaves behind (from a zero start), one all-gather shares these states, and each rank sums the decayed
states of all earlier segments into the state entering each of its own, then runs its segments with it.
Communication is O(state) per rank, independent of T; the backward mirrors it through the gather.
"""

from __future__ import annotations

import torch

from kernels import based_linear_attention, lightning_attention
from kernels.based import taylor_features
from kernels.dispatch import upcast
from parallel.context import CPContext, all_gather, refuse_documents, split_segments


def _before(cp: CPContext, start: int, device) -> torch.Tensor:
    """(cp, n_seg) mask of the segments that end at or before `start`, and their distance to it."""
    ends = torch.tensor([[s + n for s, n in segs] for segs in cp.segments], device=device)
    return ends <= start, (start - ends).clamp(min=0)


def _result(outs: list, segs, cp: CPContext, output_final_state: bool):
    """The rank's output; with `output_final_state`, also the state after the sequence's last token on the rank
    holding it and zeros on the others (so a sum over the CP group gives every rank the sequence's)."""
    out = torch.cat([o for o, _ in outs], dim=1)
    if not output_final_state:
        return out
    ends_sequence = [i for i, (a, n) in enumerate(segs) if a + n == cp.seq_len]
    final = outs[ends_sequence[0] if ends_sequence else 0][1]
    if not ends_sequence:
        final = tuple(torch.zeros_like(s) for s in final) if isinstance(final, tuple) else torch.zeros_like(final)
    return out, final


class LightningCP:
    def __init__(self, cp: CPContext):
        self.cp = cp

    def __call__(self, q, k, v, decay, *, output_final_state: bool = False, **kw):
        refuse_documents(kw)
        cp, segs = self.cp, self.cp.local_segments
        s = upcast(decay.to(q.dtype))
        ks, vs = split_segments(k, segs), split_segments(v, segs)
        # The state each local segment leaves: sum_j lambda^(n-1-j) k_j^T v_j (exponents >= 0 only).
        own = []
        for kk, vv in zip(ks, vs, strict=True):
            n = kk.shape[1]
            w = torch.exp(-s[:, None] * torch.arange(n - 1, -1, -1, device=q.device, dtype=s.dtype))  # (H, n)
            own.append(torch.einsum("bjhd,hj,bjhe->bhde", upcast(kk), w, upcast(vv)))
        states = all_gather(torch.stack(own), cp, "states")  # (cp, n_seg, B, H, d, e)
        outs = []
        for qq, kk, vv, (a, _) in zip(split_segments(q, segs), ks, vs, segs, strict=True):
            # The state entering this segment: earlier segments' states decayed over the distance since.
            # One weighted sum over *all* gathered states (zero weight for later ones), so every rank joins the
            # gather's backward even when nothing precedes its segments (a rank skipping it would deadlock).
            earlier, dist_ = _before(cp, a, q.device)
            weights = torch.exp(-s[None, None, :] * dist_[..., None].to(s.dtype)) * earlier[..., None]
            init = torch.einsum("rnbhde,rnh->bhde", states, weights)
            outs.append(lightning_attention(qq, kk, vv, decay, initial_state=init, output_final_state=True, **kw))
        return _result(outs, segs, cp, output_final_state)


class BasedCP:
    def __init__(self, cp: CPContext):
        self.cp = cp

    def __call__(self, q, k, v, *, output_final_state: bool = False, **kw):
        refuse_documents(kw)
        cp, segs = self.cp, self.cp.local_segments
        ks, vs = split_segments(k, segs), split_segments(v, segs)
        own_s, own_z = [], []
        for kk, vv in zip(ks, vs, strict=True):
            phi = taylor_features(upcast(kk))
            own_s.append(torch.einsum("bjhf,bjhe->bhfe", phi, upcast(vv)))
            own_z.append(phi.sum(1))
        s_all = all_gather(torch.stack(own_s), cp, "states")  # (cp, n_seg, B, H, F, e)
        z_all = all_gather(torch.stack(own_z), cp, "normalisers")
        outs = []
        for qq, kk, vv, (a, _) in zip(split_segments(q, segs), ks, vs, segs, strict=True):
            earlier = _before(cp, a, q.device)[0].to(s_all.dtype)  # every rank uses the gathered states
            init = (torch.einsum("rnbhfe,rn->bhfe", s_all, earlier), torch.einsum("rnbhf,rn->bhf", z_all, earlier))
            outs.append(based_linear_attention(qq, kk, vv, initial_state=init, output_final_state=True, **kw))
        return _result(outs, segs, cp, output_final_state)
