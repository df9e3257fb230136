"""Oracle: TNL lightning attention as one decayed causal score matrix (quadratic; run it in float64)."""

from __future__ import annotations

import torch


def naive_lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """O = (Q K^T * M) V with M_ij = exp(-s_h (i - j)) for j <= i, else 0.  q, k (B, T, H, d), v (B, T, H, e),
    decay (H,) slopes s_h >= 0.  No softmax, no scale, no denominator."""
    t = q.shape[1]
    i = torch.arange(t, device=q.device)
    dist = (i[:, None] - i[None, :]).to(q.dtype)
    mask = torch.exp(-decay.to(q.dtype)[:, None, None] * dist.clamp(min=0)) * (dist >= 0)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * mask
    return torch.einsum("bhij,bjhe->bihe", scores, v)
