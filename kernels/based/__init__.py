"""BASED linear attention: 2nd-order Taylor feature map, causal, normalised by the running sum."""

from __future__ import annotations

import torch

from hylo.kernels.based.chunk import chunk_based_linear_attention, taylor_features
from hylo.kernels.based.naive import naive_based_linear_attention
from hylo.kernels.based.step import based_step
from hylo.kernels.dispatch import choose_backend
from hylo.kernels.varlen import packed, split_documents

__all__ = ["based_linear_attention", "based_step", "taylor_features", "naive_based_linear_attention",
           "chunk_based_linear_attention"]


def based_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float = 1e-6,
                           initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
                           output_final_state: bool = False, backend: str = "auto",
                           cu_seqlens: torch.Tensor | None = None):
    """q, k (B, T, H, d_f) with the small feature dim (16 by default in the layer), v (B, T, H, e) -> (B, T, H, e).

    y_t = sum_{j<=t} (1 + s + s^2/2) v_j / (sum_{j<=t} (1 + s + s^2/2) + eps), s = q_t . k_j / sqrt(d_f).
    The kernel is >= 1/2, so the normaliser never vanishes.  State passing: `initial_state=(S, z)` continues an
    earlier segment (S (B, H, F, e), z (B, H, F), F = 1 + d_f + d_f^2); `output_final_state=True` also returns
    the state after the last token.  backend: "naive" | "chunk" | "triton" | "auto" (Triton for CUDA q, k, v
    of one dtype, not float64; the chunk path otherwise).  The chunk and Triton paths return states in float32
    (chunk: float64 for float64 inputs) in one feature order, so either continues the other's segment.
    `cu_seqlens`: packed documents (batch 1, kernels/varlen.py), each starting from a zero state; `initial_state`
    applies to the first document, the final state is the last document's.
    """
    if q.dim() != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"based_linear_attention expects q, k (B, T, H, d_f) and v (B, T, H, e); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    cu_seqlens = packed(cu_seqlens, q, "based_linear_attention")
    backend = choose_backend("based_linear_attention", backend, ("naive", "chunk", "triton"), (q, k, v))
    if backend == "triton":
        from hylo.kernels.based.triton import triton_based_linear_attention  # imports triton: only when asked for

        # packed documents too: the kernels restart at each document themselves
        return triton_based_linear_attention(q, k, v, eps, initial_state, output_final_state, cu_seqlens)
    if cu_seqlens is not None:  # the PyTorch paths: each document on its own
        outs, state = [], initial_state
        for i, (qd, kd, vd) in enumerate(split_documents(cu_seqlens, "based_linear_attention", q, k, v)):
            out, state = based_linear_attention(qd, kd, vd, eps=eps, initial_state=state if i == 0 else None,
                                                output_final_state=True, backend=backend)  # then from zero
            outs.append(out)
        return (torch.cat(outs, dim=1), state) if output_final_state else torch.cat(outs, dim=1)
    if backend == "naive":
        out, final = naive_based_linear_attention(q, k, v, eps, initial_state)
    else:
        out, final = chunk_based_linear_attention(q, k, v, eps, initial_state)
    return (out, final) if output_final_state else out
