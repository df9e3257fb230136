"""BASED linear attention in blocks: the quadratic kernel inside each block, the Taylor feature state across
blocks.  Memory O(T*C + (T/C)*D_phi*e); state and normaliser always accumulate in float32 (in bf16 the
zeroth-order part of the normaliser, which counts tokens, stops being exact at 256).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 64


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """phi(x) with phi(q) . phi(k) = 1 + s + s^2/2, s = q.k/sqrt(d): [1, x/d^(1/4), vec(x x^T)/(sqrt(2) sqrt(d))],
    1 + d + d^2 features (273 for d = 16)."""
    d = x.shape[-1]
    second = (x[..., :, None] * x[..., None, :]).flatten(-2) / (2**0.5 * d**0.5)
    return torch.cat([torch.ones_like(x[..., :1]), x / d**0.25, second], dim=-1)


def chunk_based_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6,
                                 block: int = BLOCK) -> torch.Tensor:
    b, t, h, d_f = q.shape
    e = v.shape[-1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    c = min(block, t)
    n = -(-t // c)
    pad = n * c - t
    qb, kb, vb = (F.pad(x.to(compute), (0, 0, 0, 0, 0, pad)).view(b, n, c, h, -1).permute(0, 3, 1, 2, 4)
                  for x in (q, k, v))  # (B, H, N, C, .)
    # Padded keys would add 1 (the kernel's constant term) to later normalisers, but padding only follows the
    # last real token, so no real query ever sees it.
    s = torch.matmul(qb, kb.transpose(-1, -2)) / d_f**0.5
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    kernel = (1 + s + s * s / 2).masked_fill(~causal, 0)
    num = torch.matmul(kernel, vb)
    den = kernel.sum(-1, keepdim=True)

    phi_q, phi_k = taylor_features(qb), taylor_features(kb)  # (B, H, N, C, F)
    state = torch.matmul(phi_k.transpose(-1, -2), vb).cumsum(dim=2)  # (B, H, N, F, e) up to each block's end
    norm = phi_k.sum(dim=3).cumsum(dim=2)  # (B, H, N, F)
    state = F.pad(state, (0, 0, 0, 0, 1, -1))  # shift: the state entering block n holds blocks < n
    norm = F.pad(norm, (0, 0, 1, -1))
    num = num + torch.matmul(phi_q, state)
    den = den + torch.matmul(phi_q, norm[..., None])
    out = num / (den + eps)
    return out.permute(0, 2, 3, 1, 4).reshape(b, n * c, h, e)[:, :t].to(q.dtype)
