"""Oracle: TNL lightning attention as one decayed causal score matrix (quadratic; run it in float64)."""

from __future__ import annotations

import torch


def naive_lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                              initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """O = (Q K^T * M) V + (Q S0) * lambda^(i+1), M_ij = exp(-s_h (i - j)) for j <= i, else 0.  q, k (B, T, H, d),
    v (B, T, H, e), decay (H,) slopes s_h >= 0, S0 (B, H, d, e) an incoming state.  No softmax, no scale, no
    denominator.  Also returns the final state sum_j lambda^(T-1-j) k_j^T v_j + lambda^T S0."""
    t = q.shape[1]
    s = decay.to(q.dtype)
    i = torch.arange(t, device=q.device)
    dist = (i[:, None] - i[None, :]).to(q.dtype)
    mask = torch.exp(-s[:, None, None] * dist.clamp(min=0)) * (dist >= 0)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * mask
    out = torch.einsum("bhij,bjhe->bihe", scores, v)
    to_end = torch.exp(-s[:, None] * (t - 1 - i).to(q.dtype))  # (H, T): lambda^(T-1-j)
    final = torch.einsum("bjhd,hj,bjhe->bhde", k, to_end, v)
    if initial_state is not None:
        read = torch.exp(-s[:, None] * (i + 1).to(q.dtype))  # (H, T): lambda^(i+1)
        out = out + torch.einsum("bihd,bhde,hi->bihe", q, initial_state.to(q.dtype), read)
        final = final + initial_state.to(q.dtype) * torch.exp(-s * t)[None, :, None, None]
    return out, final
