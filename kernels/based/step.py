"""Recurrent decoding for BASED linear attention: O(1) state (D_phi x e) and normaliser (D_phi), float32."""

from __future__ import annotations

import torch

from hylo.kernels.based.chunk import taylor_features


def based_step(state: tuple[torch.Tensor, torch.Tensor] | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               eps: float = 1e-6) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One token: q, k (B, H, d_f), v (B, H, e) -> (y (B, H, e), (S (B, H, F, e), z (B, H, F)))."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    phi_q, phi_k = taylor_features(q.to(compute)), taylor_features(k.to(compute))
    kv = phi_k[..., :, None] * v.to(compute)[..., None, :]
    s, z = (kv, phi_k) if state is None else (state[0] + kv, state[1] + phi_k)
    num = torch.einsum("bhf,bhfe->bhe", phi_q, s)
    den = (phi_q * z).sum(-1, keepdim=True)
    return (num / (den + eps)).to(q.dtype), (s, z)
