"""Oracle: BASED linear attention as a quadratic kernel matrix (run it in float64)."""

from __future__ import annotations

import torch

from hylo.kernels.based.chunk import taylor_features


def naive_based_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6,
                                 initial_state: tuple[torch.Tensor, torch.Tensor] | None = None):
    """y_t = (sum_{j<=t} K_tj v_j + phi(q_t) S0) / (sum_{j<=t} K_tj + phi(q_t) . z0 + eps),
    K_tj = 1 + s + s^2/2, s = q_t . k_j / sqrt(d_f).  Returns (y, (S, z)) with the state after the last token:
    S = S0 + sum_j phi(k_j)^T v_j, z = z0 + sum_j phi(k_j)."""
    t, d_f = q.shape[1], q.shape[-1]
    s = torch.einsum("bihd,bjhd->bhij", q, k) / d_f**0.5
    kernel = (1 + s + s * s / 2) * torch.ones(t, t, device=q.device).tril().to(s.dtype)
    num = torch.einsum("bhij,bjhe->bihe", kernel, v)
    den = kernel.sum(-1).transpose(1, 2)[..., None]
    phi_k = taylor_features(k)
    state = torch.einsum("bjhf,bjhe->bhfe", phi_k, v)
    norm = torch.einsum("bjhf->bhf", phi_k)
    if initial_state is not None:
        s0, z0 = (x.to(q.dtype) for x in initial_state)
        phi_q = taylor_features(q)
        num = num + torch.einsum("bihf,bhfe->bihe", phi_q, s0)
        den = den + torch.einsum("bihf,bhf->bih", phi_q, z0)[..., None]
        state, norm = state + s0, norm + z0
    return num / (den + eps), (state, norm)
