"""RAT: a gated linear recurrence inside chunks of L tokens, softmax attention across the chunks' summaries."""

from __future__ import annotations

import torch

from hylo.kernels.dispatch import choose_backend
from hylo.kernels.rat.chunk import chunk_rat_attention, scan_summaries
from hylo.kernels.rat.naive import naive_rat_attention
from hylo.kernels.rat.step import rat_prefill, rat_step
from hylo.kernels.varlen import packed, split_documents

__all__ = ["rat_attention", "rat_prefill", "rat_step", "scan_summaries", "naive_rat_attention", "chunk_rat_attention"]

TRITON_MAX_CHUNK = 128  # a chunk must fit in one tile of the Triton kernels' query blocks


def rat_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, chunk_size: int, *,
                  scale: float | None = None, rope_theta: float | None = None,
                  prefix: tuple[torch.Tensor, torch.Tensor] | None = None, backend: str = "auto",
                  cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v, gate (B, T, H, d), gate in (0, 1) -> (B, T, H, d).

    Inside each chunk of `chunk_size` tokens k~_l = g*k~_{l-1} + (1-g)*k_l (same for v), restarting per chunk.
    Query t attends in one softmax to the last k~ of every earlier chunk and to its own k~_t.  `rope_theta`:
    RoPE applied after the scan at chunk granularity, as the RAT paper does (the queries of chunk c and the
    scanned keys of chunk c rotate as position c; None = no rotation); pass q and k unrotated.  T need not be a
    multiple of chunk_size (a partial last chunk is padded internally).  `prefix` = (k, v) summaries (B, P, H, d),
    unrotated, of P chunks before this segment (see `scan_summaries`), which every query also sees and after which
    this segment's chunks are numbered: how context parallelism continues a sequence held by other ranks.
    backend: "naive" | "chunk" | "triton" | "flash" (the chunk path's scan, the softmax over chunk summaries on
    attention's flash backend: torch's FlashAttention kernel) | "auto" (Triton for fp32/bf16/fp16 CUDA tensors
    when triton is installed and chunk_size <= 128, else chunk).  The gate may be float32 while q, k, v are 16-bit.
    `cu_seqlens`: packed documents (batch 1, kernels/varlen.py); the chunk grid restarts at every document start
    (a document of n tokens has chunks [0, L), [L, 2L), ... of its own), so no summary mixes documents.
    """
    if q.dim() != 4 or not (q.shape == k.shape == gate.shape) or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"rat_attention expects q, k, gate (B, T, H, d) and v (B, T, H, e); got q{tuple(q.shape)} "
                         f"k{tuple(k.shape)} v{tuple(v.shape)} gate{tuple(gate.shape)}")
    if gate.shape[-1] != v.shape[-1]:
        raise ValueError("the gate is shared by the key and value scans: k and v need the same head dim")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if rope_theta is not None and q.shape[-1] % 2:
        raise ValueError(f"RoPE rotates channel pairs: head dim {q.shape[-1]} must be even")
    cu_seqlens = packed(cu_seqlens, q, "rat_attention")
    if cu_seqlens is not None:
        if prefix is not None:
            raise ValueError("rat_attention: a prefix of chunk summaries continues one sequence; it cannot be "
                             "combined with cu_seqlens")
        return torch.cat([rat_attention(qd, kd, vd, gd, chunk_size, scale=scale, rope_theta=rope_theta,
                                        backend=backend)
                          for qd, kd, vd, gd in split_documents(cu_seqlens, "rat_attention", q, k, v, gate)], dim=1)
    backend = choose_backend("rat_attention", backend, ("naive", "chunk", "triton", "flash"), (q, k, v),
                             triton_ok=lambda: chunk_size <= TRITON_MAX_CHUNK and q.shape[-1] % 2 == 0)
    if backend == "naive":
        if prefix is not None:
            raise ValueError("the naive RAT oracle takes whole sequences, not a prefix of chunk summaries")
        return naive_rat_attention(q, k, v, gate, chunk_size, scale, rope_theta)
    if backend == "triton":
        from hylo.kernels.rat.triton import (
            triton_rat_attention,  # imported late: needs triton, and TRITON_INTERPRET set
        )

        return triton_rat_attention(q, k, v, gate, chunk_size, scale, prefix, rope_theta)
    return chunk_rat_attention(q, k, v, gate, chunk_size, scale, prefix, rope_theta,
                               cross="flash" if backend == "flash" else "chunk")
