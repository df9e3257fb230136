"""RAT under CP: chunks never straddle ranks (every segment is a whole number of chunks), so each rank scans
its own chunks, one all-gather shares the chunk summaries (1/L of the sequence), and each segment attends to the
summaries of every chunk before it as a prefix.
"""

from __future__ import annotations

import torch

from kernels import rat_attention
from kernels.rat import scan_summaries
from parallel.context import CPContext, all_gather, refuse_documents, split_segments


class RatCP:
    def __init__(self, cp: CPContext):
        self.cp = cp

    def __call__(self, q, k, v, gate, chunk_size, **kw):
        refuse_documents(kw)
        cp, segs = self.cp, self.cp.local_segments
        for start, n in segs:
            if start % chunk_size or n % chunk_size:
                raise ValueError(f"RAT under context parallelism needs every rank's segments to be whole chunks: "
                                 f"segment [{start}, {start + n}) vs model.rat.chunk_size={chunk_size}")
        parts = zip(split_segments(k, segs), split_segments(v, segs), split_segments(gate, segs), strict=True)
        own = [torch.stack(scan_summaries(kk, vv, gg, chunk_size)) for kk, vv, gg in parts]  # (2, B, n/L, H, d)
        gathered = all_gather(torch.cat(own, dim=2), cp, "summaries")  # (cp, 2, B, local chunks, H, d)
        # Reassemble the summaries in sequence order.
        pieces = []
        for r, rank_segs in enumerate(cp.segments):
            offset = 0
            for start, n in rank_segs:
                pieces.append((start, gathered[r, :, :, offset:offset + n // chunk_size]))
                offset += n // chunk_size
        summaries = torch.cat([p for _, p in sorted(pieces, key=lambda item: item[0])], dim=2)
        outs = []
        for qq, kk, vv, gg, (start, _) in zip(*(split_segments(x, segs) for x in (q, k, v, gate)), segs, strict=True):
            c0 = start // chunk_size
            prefix = (summaries[0, :, :c0], summaries[1, :, :c0])
            outs.append(rat_attention(qq, kk, vv, gg, chunk_size, prefix=prefix, **kw))
        # A rank whose segments see no earlier chunk would not use the gathered summaries, skip the gather's
        # backward and deadlock the others: tie them into the output with weight zero.
        return torch.cat(outs, dim=1) + 0 * summaries.sum()
