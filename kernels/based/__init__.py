"""BASED linear attention: 2nd-order Taylor feature map, causal, normalised by the running sum."""

from __future__ import annotations

import torch

from kernels.based.chunk import chunk_based_linear_attention, taylor_features
from kernels.based.naive import naive_based_linear_attention
from kernels.based.step import based_step

__all__ = ["based_linear_attention", "based_step", "taylor_features", "naive_based_linear_attention",
           "chunk_based_linear_attention"]


def based_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float = 1e-6,
                           backend: str = "auto") -> torch.Tensor:
    """q, k (B, T, H, d_f) with the small feature dim (16 by default in the layer), v (B, T, H, e) -> (B, T, H, e).

    y_t = sum_{j<=t} (1 + s + s^2/2) v_j / (sum_{j<=t} (1 + s + s^2/2) + eps), s = q_t . k_j / sqrt(d_f).
    The kernel is >= 1/2, so the normaliser never vanishes.  backend: "naive" | "chunk" | "auto".
    """
    if q.dim() != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"based_linear_attention expects q, k (B, T, H, d_f) and v (B, T, H, e); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if backend == "naive":
        return naive_based_linear_attention(q, k, v, eps)
    if backend in ("auto", "chunk"):
        return chunk_based_linear_attention(q, k, v, eps)
    raise ValueError(f"backend='{backend}' is not one of 'auto', 'naive', 'chunk'")
