"""Recurrent decoding for lightning attention: an O(1) (d x e) state per head, kept in float32."""

from __future__ import annotations

import torch

from hylo.kernels.dispatch import compute_dtype


def lightning_step(state: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   decay: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: q, k (B, H, d), v (B, H, e) -> (o (B, H, e), state (B, H, d, e)).  KV <- lambda KV + k^T v."""
    compute = compute_dtype(q.dtype)
    kv = k.to(compute)[..., :, None] * v.to(compute)[..., None, :]
    lam = torch.exp(-decay.to(compute))[None, :, None, None]
    state = kv if state is None else state * lam + kv
    out = torch.einsum("bhd,bhde->bhe", q.to(compute), state)
    return out.to(q.dtype), state
