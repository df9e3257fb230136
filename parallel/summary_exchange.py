"""RAT under CP: one all-gather of chunk summaries (1/L of the sequence), and each segment attends to the
summaries of its document's earlier chunks as a prefix.

A chunk may straddle ranks: chunks are laid on each document's own grid ([d, d + L), [d + L, d + 2L), ... for a
document starting at d; the whole sequence is one document without packing), wherever the rank boundaries fall.
The rank holding a chunk's last token owns it: it fetches the chunk's earlier tokens (k, v and gate, fewer than L)
from whichever ranks hold them, the halo exchange of parallel/halo.py, scans the whole chunk, and contributes its
summary.  Each segment thus runs from the start of the chunk holding its first token; the outputs of those
re-scanned tokens belong to their own rank and are dropped.  Nothing about the layout must divide: with whole
chunks per segment (the unpacked case when L divides a segment) the halos are empty and no token is scanned twice.
"""

from __future__ import annotations

import torch

from hylo.kernels.ops import rat_attention
from hylo.kernels.rat import scan_summaries
from hylo.parallel.halo import fetch_halos
from hylo.parallel.layout import CPContext, SequenceLayout, all_gather, sequence_layout, split_segments


def _chunk_start(layout: SequenceLayout, pos: int, chunk: int) -> int:
    """The first token of the chunk holding token `pos`, on its document's grid."""
    d = layout.doc_start(pos)
    return d + (pos - d) // chunk * chunk


def _owned_chunks(layout: SequenceLayout, rank: int, chunk: int) -> list[int]:
    """Start of every complete chunk (L tokens of one document) whose last token `rank` holds, in local order: the
    order its scans produce them."""
    owned = []
    for a, n in layout.segments[rank]:
        run_start = _chunk_start(layout, a, chunk)
        cuts = [run_start, *(b for b in layout.bounds if run_start < b < a + n), a + n]
        for p0, p1 in zip(cuts[:-1], cuts[1:], strict=True):  # each starts on its document's chunk grid
            owned += range(p0, p1 - chunk + 1, chunk)
    return owned


class RatCP:
    def __init__(self, cp: CPContext):
        self.cp = cp

    def __call__(self, q, k, v, gate, chunk_size, *, cu_seqlens=None, **kw):
        cp, size = self.cp, chunk_size
        layout = sequence_layout(cp.segments, cu_seqlens, q, cp.rank, "RAT")
        segs = layout.segments[cp.rank]
        dk = k.shape[-1]
        # k, v and the gate of each segment's first chunk's earlier tokens (one exchange; fp32 for 16-bit k/v, and
        # k/v come back to their own dtype exactly)
        kvg = torch.cat([k, v, gate], dim=-1)
        halos = fetch_halos(kvg, cp, layout, lambda a: _chunk_start(layout, a, size), f"{cp.tag}/halo")

        runs, own = [], []  # per segment: (q, k, v, gate) from its first chunk's start; the summaries it owns
        for qq, x, halo, (a, _) in zip(split_segments(q, segs), split_segments(kvg, segs), halos, segs, strict=True):
            x = torch.cat([halo, x], dim=1)
            kk, vv, gg = x[..., :dk].to(k.dtype), x[..., dk:dk + v.shape[-1]].to(v.dtype), x[..., dk + v.shape[-1]:]
            qq = torch.cat([qq.new_zeros(qq.shape[0], halo.shape[1], *qq.shape[2:]), qq], dim=1)  # outputs dropped
            start = a - halo.shape[1]
            docs = layout.local_cu_seqlens(start, x.shape[1])
            cuts = [0, x.shape[1]] if docs is None else docs.tolist()
            for p0, p1 in zip(cuts[:-1], cuts[1:], strict=True):
                whole = (p1 - p0) // size * size
                if whole:
                    own.append(torch.stack(scan_summaries(kk[:, p0:p0 + whole], vv[:, p0:p0 + whole],
                                                          gg[:, p0:p0 + whole], size), dim=0))
            runs.append((qq, kk, vv, gg, start, docs, halo.shape[1]))

        # One all-gather of every rank's summaries, padded to the most any rank owns.
        owned = [_owned_chunks(layout, r, size) for r in range(cp.size)]
        most = max(1, max(map(len, owned)))
        b, h, d = k.shape[0], k.shape[2], dk
        compute = torch.promote_types(k.dtype, torch.float32)
        mine = torch.cat(own, dim=2) if own else torch.zeros(2, b, 0, h, d, dtype=compute, device=k.device)
        assert mine.shape[2] == len(owned[cp.rank]), "the scans and the ownership plan disagree"
        padded = torch.cat([mine, mine.new_zeros(2, b, most - mine.shape[2], h, d)], dim=2)
        # Two collectives run in backward, the gather's and the halos': every rank must run them in one order, so
        # the gather hangs off the halos on every rank (weight zero; a rank owning no chunk has no edge otherwise)
        # and autograd finishes its backward before the halos'.
        padded = padded + 0 * sum(halo.sum() for halo in halos)
        gathered = all_gather(padded, cp, "summaries")  # (cp, 2, B, most, H, d)
        where = {c: (r, i) for r, starts in enumerate(owned) for i, c in enumerate(starts)}

        outs = []
        for qq, kk, vv, gg, start, docs, dropped in runs:
            # The prefix of the first document: its complete chunks before `start`, in order.
            d0 = layout.doc_start(start)
            index = torch.tensor([where[c] for c in range(d0, start, size)], dtype=torch.long).view(-1, 2)
            prefix = gathered[index[:, 0], :, :, index[:, 1]].permute(1, 2, 0, 3, 4)  # (2, B, P, H, d)
            first = qq.shape[1] if docs is None else int(docs[1])
            o = [rat_attention(qq[:, :first], kk[:, :first], vv[:, :first], gg[:, :first], size,
                               prefix=(prefix[0], prefix[1]), **kw)]
            if first < qq.shape[1]:  # documents starting inside the segment: no prefix
                o.append(rat_attention(qq[:, first:], kk[:, first:], vv[:, first:], gg[:, first:], size,
                                       cu_seqlens=docs[1:] - first, **kw))
            outs.append(torch.cat(o, dim=1)[:, dropped:])
        # A rank whose segments see no earlier chunk would not use the gathered summaries, skip the gather's
        # backward and deadlock the others: tie them into the output with weight zero.
        return torch.cat(outs, dim=1) + 0 * gathered.sum()
