"""Packed documents, FlashAttention/fla's varlen convention: a batch of one sequence holding several documents, and
`cu_seqlens = [0, l1, l1 + l2, ..., T]`, a 1-D integer tensor of document boundaries.

Every op that takes `cu_seqlens` promises the same result (outputs, lse, final states, every input gradient) as
running each document on its own and concatenating.  They keep that promise by running each document through the
op's chosen backend (naive, chunk or triton): work across a boundary is never done at all, so masking costs
nothing and shorter documents mean less attention work (each document is one call, though, which many tiny
documents pay for).  A CPU tensor for `cu_seqlens` avoids a device sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, op: str) -> list[int]:
    """The boundaries of `cu_seqlens` as a list, after checking they describe documents covering `total` tokens."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        raise ValueError(f"{op}: cu_seqlens must be a 1-D tensor [0, l1, l1+l2, ..., T], got "
                         f"{type(cu_seqlens).__name__} {tuple(getattr(cu_seqlens, 'shape', ()))}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    bounds = cu_seqlens.tolist()
    if len(bounds) < 2 or bounds[0] != 0:
        raise ValueError(f"{op}: cu_seqlens must start at 0 and hold at least one document, got {bounds[:4]}...")
    if bounds[-1] != total:
        raise ValueError(f"{op}: cu_seqlens must end at the sequence length {total}, ends at {bounds[-1]}")
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if b <= a:
            raise ValueError(f"{op}: cu_seqlens must increase strictly (document {i} would have length {b - a}; "
                             "zero-length documents are not allowed)")
    return bounds


def document_bounds(cu_seqlens: torch.Tensor, x: torch.Tensor, op: str) -> list[tuple[int, int]]:
    """The (start, end) of each document of x (1, T, ...), after checking `cu_seqlens` against it."""
    if x.shape[0] != 1:
        raise ValueError(f"{op}: with cu_seqlens the batch must be one packed sequence (batch size 1), got batch "
                         f"{x.shape[0]}; flatten the rows into one sequence and add their boundaries")
    bounds = check_cu_seqlens(cu_seqlens, x.shape[1], op)
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def packed(cu_seqlens: torch.Tensor | None, x: torch.Tensor, op: str) -> torch.Tensor | None:
    """`cu_seqlens` if it holds more than one document (checked against x), else None: one document is the
    plain op, without a split and a concatenation."""
    if cu_seqlens is None or len(document_bounds(cu_seqlens, x, op)) > 1:
        return cu_seqlens
    return None


def split_documents(cu_seqlens: torch.Tensor, op: str, *tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Each document's pieces of `tensors` (1, T, ...), after checking `cu_seqlens` against the first.  One split
    per tensor, not a slice per document: each slice's backward would add a zero gradient of the whole sequence."""
    lengths = [b - a for a, b in document_bounds(cu_seqlens, tensors[0], op)]
    return list(zip(*(t.split(lengths, dim=1) for t in tensors), strict=True))


def positions_within_documents(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """Each token's position counted from its document's start."""
    bounds = cu_seqlens.long().cpu()
    starts = torch.zeros(length, dtype=torch.long)
    starts[bounds[1:-1]] = 1
    return torch.arange(length) - bounds[starts.cumsum(0)]  # minus the start of the token's document


@dataclass(frozen=True)
class DocumentView:
    """Packed documents as the layer monitors see them: the boundaries, and for each token a layer holds (all of
    them, or a context-parallel rank's) its document and its position inside it."""

    cu_seqlens: torch.Tensor
    index: torch.Tensor  # (T_local,) the document of each token
    within: torch.Tensor  # (T_local,) its position inside that document
    count: int  # documents in the packed sequence
    longest: int  # the longest document (the first of equals): where the sink monitor looks for secondary sinks
    longest_length: int


def document_view(cu_seqlens: torch.Tensor, positions: torch.Tensor) -> DocumentView:
    """The view for tokens at `positions` of the whole packed sequence (global, 0..B*T-1)."""
    bounds = cu_seqlens.long().cpu()
    positions = positions.long().cpu()
    index = torch.bucketize(positions, bounds, right=True) - 1
    lengths = bounds[1:] - bounds[:-1]
    longest = int(lengths.argmax())
    return DocumentView(cu_seqlens, index, positions - bounds[index], len(lengths), longest, int(lengths[longest]))


@dataclass(frozen=True)
class ChunkTable:
    """Packed documents as chunk-parallel kernels take them (fla's varlen layout): every document cut into chunks
    of its own, [bos, bos + chunk), ..., its last one possibly short, so no chunk holds two documents."""

    cu: torch.Tensor  # (documents + 1,) int32: the boundaries
    first_chunk: torch.Tensor  # (documents,) int32: each document's first chunk in the table
    rows: torch.Tensor  # (chunks, 2) int32: each chunk's first row and end row

    @property
    def documents(self) -> int:
        return self.first_chunk.shape[0]

    @property
    def chunks(self) -> int:
        return self.rows.shape[0]


def chunk_table(cu_seqlens: torch.Tensor, chunk: int, device: torch.device) -> ChunkTable:
    """The chunk table of checked `cu_seqlens` (computed on the host, then copied to `device`)."""
    bounds = cu_seqlens.to("cpu", torch.int64)
    lengths = bounds[1:] - bounds[:-1]
    per_doc = (lengths + chunk - 1) // chunk
    first_chunk = torch.cumsum(per_doc, 0) - per_doc
    within = torch.arange(int(per_doc.sum())) - torch.repeat_interleave(first_chunk, per_doc)
    first_row = torch.repeat_interleave(bounds[:-1], per_doc) + within * chunk
    end_row = torch.minimum(first_row + chunk, torch.repeat_interleave(bounds[1:], per_doc))
    to = dict(device=device, dtype=torch.int32, non_blocking=True)
    return ChunkTable(bounds.to(**to), first_chunk.to(**to), torch.stack([first_row, end_row], 1).to(**to))
