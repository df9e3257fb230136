"""Ulysses (DeepSpeed-Ulysses) attention: all-to-all from sequence-sharded to head-sharded, attention over the
whole sequence on H/U heads, all-to-all back.  Works for every softmax variant (full, window, sinks — sliced per
head — and pinned tokens), with GQA: k/v heads are replicated when there are fewer of them than ranks.
In the hybrid mode the inner attention is ring attention across the Ulysses groups (USP).  Packed documents: the
gathered heads hold every token of the group's part of the sequence in order, so the inner attention takes the
whole sequence's `cu_seqlens` as they are (plain attention over the whole sequence, or the ring, which cuts its
segments at them).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hylo.parallel.layout import Segment, all_to_all, sequence_layout


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
    def __init__(self, group: dist.ProcessGroup, member_segments: list[list[Segment]], inner, key: str = "ulysses",
                 seq_len: int | None = None):
        """member_segments: the segments of each rank of `group`, in group-rank order; `inner` runs attention on
        the gathered sequence (plain `attention`, or ring attention across groups); seq_len: the whole sequence's
        length when the members hold only part of it (the hybrid)."""
        self.group, self.inner, self.key = group, inner, key
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.member_segments, self.seq_len = member_segments, seq_len
        self._orders: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _order(self, segments: list[list[Segment]]) -> tuple[torch.Tensor, torch.Tensor]:
        """gathered (rank-major) order -> sequence order, and back, for these member segments."""
        key = tuple(map(tuple, segments))
        if key not in self._orders:
            starts = torch.cat([torch.arange(s, s + n) for segs in segments for s, n in segs])
            order = torch.argsort(starts)
            self._orders = {key: (order, torch.argsort(order))}  # one entry: rows per micro-batch rarely change
        return self._orders[key]

    def __call__(self, q, k, v, *, sink=None, return_lse=False, cu_seqlens=None, **kw):
        u, h, h_kv = self.size, q.shape[2], k.shape[2]
        if h % u:
            raise ValueError(f"Ulysses over {u} ranks needs the query heads ({h}) divisible by {u}")
        if h_kv % u:
            if u % h_kv:
                raise ValueError(f"Ulysses over {u} ranks: {h_kv} key/value heads neither divide nor are "
                                 f"divided by {u}")
            k, v = k.repeat_interleave(u // h_kv, dim=2), v.repeat_interleave(u // h_kv, dim=2)
        # With documents the rows are one packed sequence: the members' segments of every row, in order.
        # (the boundaries are checked by the inner attention, against the gathered sequence)
        segments = self.member_segments
        if cu_seqlens is not None:
            segments = sequence_layout(segments, cu_seqlens, q, self.rank, "Ulysses attention", self.seq_len).segments
        order, inverse = (x.to(q.device) for x in self._order(segments))
        qh, kh, vh = (_seq_to_heads(x, self.group, self.key)[:, order] for x in (q, k, v))
        sink_h = None if sink is None else sink.view(u, h // u)[self.rank]
        out, lse = self.inner(qh, kh, vh, sink=sink_h, return_lse=True, cu_seqlens=cu_seqlens, **kw)
        out = _heads_to_seq(out[:, inverse], self.group, self.key)
        if not return_lse:
            return out
        lse = _heads_to_seq(lse.transpose(1, 2)[:, inverse, :, None], self.group, self.key + "/lse")
        return out, lse[..., 0].transpose(1, 2)
