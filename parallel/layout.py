"""Context parallelism's shared pieces: the sequence layout over the CP ranks, the process groups, and
autograd-aware collectives that count the bytes they move.

Layouts (which global token positions each CP rank holds, as contiguous segments):
  contiguous  rank r holds [r*T/N, (r+1)*T/N)                                  (Ulysses)
  zigzag      T in 2N chunks; rank r holds chunks r and 2N-1-r, so causal work is balanced      (ring)
  hybrid      zigzag over the R ring ranks; each ring rank's two chunks split in U contiguous pieces over
              its U Ulysses ranks (U-way Ulysses inside, R-way ring across: the USP layout)
Every op under CP sees its rank's tokens in layout order and knows every rank's segments, so it can work out
which neighbour holds the tokens before one of its own.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from hylo.kernels.varlen import check_cu_seqlens

Segment = tuple[int, int]  # (global start, length)


def cp_degree_ulysses(cp: int, mode: str, ulysses: int) -> int:
    """How many ranks split heads with all-to-all (Ulysses) in this layout: all of them, none, or the hybrid's U."""
    return cp if mode == "ulysses" else ulysses if mode == "hybrid" else 1


def cp_segments(seq_len: int, cp: int, mode: str, ulysses: int = 1) -> list[list[Segment]]:
    """Each CP rank's segments, in the order its local tokens are stored."""
    if mode == "ulysses":
        n = seq_len // cp
        return [[(r * n, n)] for r in range(cp)]
    ring = cp // ulysses if mode == "hybrid" else cp
    u = ulysses if mode == "hybrid" else 1
    chunk = seq_len // (2 * ring)
    piece = chunk // u
    return [[(j * chunk + i * piece, piece), ((2 * ring - 1 - j) * chunk + i * piece, piece)]
            for j in range(ring) for i in range(u)]


def layout_problem(seq_len: int, cp: int, mode: str, ulysses: int) -> str | None:
    """Why this (seq_len, cp, mode) cannot be laid out, or None."""
    if mode == "ulysses":
        need, what = cp, f"parallel.cp={cp}"
    elif mode == "ring":
        need, what = 2 * cp, f"2 x parallel.cp = {2 * cp} (zigzag: two chunks per rank)"
    else:
        if ulysses < 1 or cp % ulysses:
            return f"parallel.ulysses={ulysses} must divide parallel.cp={cp} for cp_mode=hybrid"
        need, what = 2 * cp, f"2 x parallel.cp = {2 * cp} (zigzag over {cp // ulysses} ring ranks, {ulysses} pieces)"
    if seq_len % need:
        ok = [m for m in range(seq_len - seq_len % need, seq_len + 2 * need, need) if m > 0][:3]
        return f"train.seq_len={seq_len} is not divisible by {what}; use e.g. train.seq_len in {ok}"
    return None


class CommStats:
    """Bytes this rank sent, by (layer type, operation) — filled by the collectives below."""

    def __init__(self):
        self.sent: dict[str, int] = defaultdict(int)
        self.enabled = False

    def add(self, key: str, tensor: torch.Tensor, fraction: float = 1.0) -> None:
        if self.enabled:
            self.sent[key] += int(tensor.numel() * tensor.element_size() * fraction)


COMM = CommStats()


@dataclass
class CPContext:
    """This rank's view of context parallelism for one model."""

    group: dist.ProcessGroup
    size: int
    rank: int
    mode: str  # ring | ulysses | hybrid
    segments: list[list[Segment]]  # per CP rank
    ring_group: dist.ProcessGroup | None = None  # hybrid: the R ranks holding the same Ulysses index
    ulysses_group: dist.ProcessGroup | None = None  # hybrid/ulysses: the U ranks sharing one ring slot
    ulysses: int = 1
    tag: str = field(default="", compare=False)  # label for CommStats (the layer type being run)

    @property
    def local_segments(self) -> list[Segment]:
        return self.segments[self.rank]

    @property
    def seq_len(self) -> int:
        return sum(n for segs in self.segments for _, n in segs)

    def tagged(self, tag: str) -> CPContext:
        """The same context, counting its communication under `tag` (a layer type)."""
        return replace(self, tag=tag)

    def positions(self, device: torch.device | None = None) -> torch.Tensor:
        """Global positions of this rank's tokens, in local order."""
        return torch.cat([torch.arange(s, s + n, device=device) for s, n in self.local_segments])

    def global_rank(self, group: dist.ProcessGroup, group_rank: int) -> int:
        return dist.get_global_rank(group, group_rank)


@dataclass(frozen=True)
class SequenceLayout:
    """What a context-parallel op lays its local tokens against, per call: every CP rank's segments (global start,
    length) in local storage order, and the document boundaries of the whole sequence — `(0, T)` when no documents
    are packed.  With packed documents the B rows of a micro-batch are one sequence of B * T tokens (batch 1), so
    rank r holds segment (s, n) of row b at (b * T + s, n), rows one after the other."""

    segments: list[list[Segment]]
    bounds: tuple[int, ...]

    def doc_start(self, pos: int) -> int:
        """The first token of the document holding token `pos`."""
        return self.bounds[bisect.bisect_right(self.bounds, pos) - 1]

    def doc_index(self, pos: int) -> int:
        return bisect.bisect_right(self.bounds, pos) - 1

    def pieces(self, rank: int) -> list[tuple[int, int, int]]:
        """Rank's segments cut at document boundaries, in local order: (global start, length, document index)."""
        out = []
        for s, n in self.segments[rank]:
            cuts = [s, *(b for b in self.bounds if s < b < s + n), s + n]
            out += [(a, b - a, self.doc_index(a)) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        return out

    def local_cu_seqlens(self, start: int, n: int) -> torch.Tensor | None:
        """The boundaries of tokens [start, start + n) relative to `start` (CPU int32), or None for one document."""
        cuts = [b - start for b in self.bounds if start < b < start + n]
        return torch.tensor([0, *cuts, n], dtype=torch.int32) if cuts else None


def sequence_layout(segments: list[list[Segment]], cu_seqlens: torch.Tensor | None, x: torch.Tensor, rank: int,
                    op: str, seq_len: int | None = None) -> SequenceLayout:
    """The layout a CP op sees for local tokens x (B, T_local, ...): the CP segments and no documents, or, with
    `cu_seqlens` (the boundaries of the whole packed sequence of B * T tokens, batch 1 — every CP rank is given the
    same), the segments of every row and those boundaries.  A row boundary must be a document boundary.
    `seq_len`: a row's length, when `segments` are not all of it (a Ulysses group's members in the hybrid)."""
    seq_len = seq_len or sum(n for segs in segments for _, n in segs)
    if cu_seqlens is None:
        return SequenceLayout(segments, (0, seq_len))
    if x.shape[0] != 1:
        raise ValueError(f"{op}: with cu_seqlens the local tokens must be one packed sequence (batch 1), got batch "
                         f"{x.shape[0]}")
    total = int(cu_seqlens[-1]) if cu_seqlens.numel() else 0
    rows = total // seq_len if total % seq_len == 0 else 0
    local = sum(n for _, n in segments[rank])
    if rows == 0 or x.shape[1] != rows * local:
        raise ValueError(f"{op}: cu_seqlens must cover whole rows of {seq_len} tokens (the context-parallel sequence) "
                         f"and this rank must hold {local} tokens of each row: cu_seqlens ends at {total}, the rank "
                         f"holds {x.shape[1]} tokens")
    bounds = check_cu_seqlens(cu_seqlens, total, op)
    missing = sorted(set(range(0, total, seq_len)) - set(bounds))
    if missing:
        raise ValueError(f"{op}: every row start must be a document boundary (rows are separate sequences); "
                         f"cu_seqlens lacks {missing[:4]}")
    flat = [[(b * seq_len + s, n) for b in range(rows) for s, n in segs] for segs in segments]
    return SequenceLayout(flat, tuple(bounds))


def split_segments(x: torch.Tensor, segments: list[Segment], dim: int = 1) -> list[torch.Tensor]:
    return list(x.split([n for _, n in segments], dim=dim))


# ------------------------------------------------------------------------------------------------ collectives
class _AllGather(torch.autograd.Function):
    """all_gather_into_tensor along a new leading dim; backward reduce-scatters the gradients."""

    @staticmethod
    def forward(ctx, x, group, size, key):
        ctx.group, ctx.size, ctx.key = group, size, key
        x = x.contiguous()
        out = x.new_empty(size * x.shape[0], *x.shape[1:])  # gloo wants the ranks concatenated along dim 0
        COMM.add(key, x, (size - 1))  # ring algorithm: each rank forwards (size-1) blocks
        dist.all_gather_into_tensor(out, x, group=group)
        return out.view(size, *x.shape)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.reshape(-1, *grad.shape[2:]).contiguous()
        out = grad.new_empty(grad.shape[0] // ctx.size, *grad.shape[1:])
        COMM.add(ctx.key + "/backward", out, (ctx.size - 1))
        dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None, None, None


def all_gather(x: torch.Tensor, ctx: CPContext, key: str = "all_gather") -> torch.Tensor:
    """(...) -> (cp, ...) with every CP rank's x; differentiable."""
    return _AllGather.apply(x, ctx.group, ctx.size, f"{ctx.tag}/{key}")


class _AllToAll(torch.autograd.Function):
    """all_to_all_single on dim 0 (one slice per rank); its own inverse, so backward is the same exchange."""

    @staticmethod
    def forward(ctx, x, group, key):
        ctx.group, ctx.key = group, key
        x = x.contiguous()
        out = torch.empty_like(x)
        COMM.add(key, x, (x.shape[0] - 1) / x.shape[0])
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad, ctx.group, ctx.key + "/backward"), None, None


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup, key: str) -> torch.Tensor:
    return _AllToAll.apply(x, group, key)


def exchange(sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], key: str) -> None:
    """Point-to-point: send sends[peer] to each peer and fill recvs[peer] from each (global ranks)."""
    ops = []
    for peer, buf in sends.items():
        COMM.add(key, buf)
        ops.append(dist.P2POp(dist.isend, buf.contiguous(), peer))
    for peer, buf in recvs.items():
        ops.append(dist.P2POp(dist.irecv, buf, peer))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
