"""Ulysses (DeepSpeed-Ulysses) attention: all-to-all from sequence-sharded to head-sharded, attention over the
whole sequence on H/U heads, all-to-all back.  Works for every softmax variant (full, window, sinks — sliced per
head — and pinned tokens), with GQA: k/v heads are replicated when there are fewer of them than ranks.
In the hybrid mode the inner attention is ring attention across the Ulysses groups (USP).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.context import Segment, all_to_all, refuse_documents


def _seq_to_heads(x: torch.Tensor, group, key: str) -> torch.Tensor:
    """(B, T_loc, H, d) -> (B, U * T_loc, H / U, d): group members' tokens in group-rank order."""
    u = dist.get_world_size(group)
    b, t, h, d = x.shape
    y = all_to_all(x.reshape(b, t, u, h // u, d).permute(2, 0, 1, 3, 4), group, key)
    return y.permute(1, 0, 2, 3, 4).reshape(b, u * t, h // u, d)


def _heads_to_seq(y: torch.Tensor, group, key: str) -> torch.Tensor:
    u = dist.get_world_size(group)
    b, ut, hu, d = y.shape
    x = all_to_all(y.reshape(b, u, ut // u, hu, d).permute(1, 0, 2, 3, 4), group, key)
    return x.permute(1, 2, 0, 3, 4).reshape(b, ut // u, u * hu, d)


class UlyssesAttention:
    def __init__(self, group: dist.ProcessGroup, member_segments: list[list[Segment]], inner, key: str = "ulysses"):
        """member_segments: the segments of each rank of `group`, in group-rank order; `inner` runs attention on
        the gathered sequence (plain `attention`, or ring attention across groups)."""
        self.group, self.inner, self.key = group, inner, key
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        starts = torch.cat([torch.arange(s, s + n) for segs in member_segments for s, n in segs])
        self.order = torch.argsort(starts)  # gathered (rank-major) order -> sequence order
        self.inverse = torch.argsort(self.order)

    def __call__(self, q, k, v, *, sink=None, return_lse=False, **kw):
        refuse_documents(kw)
        u, h, h_kv = self.size, q.shape[2], k.shape[2]
        if h % u:
            raise ValueError(f"Ulysses over {u} ranks needs the query heads ({h}) divisible by {u}")
        if h_kv % u:
            if u % h_kv:
                raise ValueError(f"Ulysses over {u} ranks: {h_kv} key/value heads neither divide nor are "
                                 f"divided by {u}")
            k, v = k.repeat_interleave(u // h_kv, dim=2), v.repeat_interleave(u // h_kv, dim=2)
        order, inverse = self.order.to(q.device), self.inverse.to(q.device)
        qh, kh, vh = (_seq_to_heads(x, self.group, self.key)[:, order] for x in (q, k, v))
        sink_h = None if sink is None else sink.view(u, h // u)[self.rank]
        out, lse = self.inner(qh, kh, vh, sink=sink_h, return_lse=True, **kw)
        out = _heads_to_seq(out[:, inverse], self.group, self.key)
        if not return_lse:
            return out
        lse = _heads_to_seq(lse.transpose(1, 2)[:, inverse, :, None], self.group, self.key + "/lse")
        return out, lse[..., 0].transpose(1, 2)
