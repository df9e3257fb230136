"""BASED linear attention in blocks: the quadratic kernel inside each block, the Taylor feature state across
blocks.  Memory O(T*C + (T/C)*D_phi*e); state and normaliser always accumulate in float32 (in bf16 the
zeroth-order part of the normaliser, which counts tokens, stops being exact at 256).  Long sequences run
segment by segment with the state passed between them (linear time on a CPU; the state passing context
parallelism uses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 128
SEGMENT = 2048


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """phi(x) with phi(q) . phi(k) = 1 + s + s^2/2, s = q.k/sqrt(d): [1, x/d^(1/4), vec(x x^T)/(sqrt(2) sqrt(d))],
    1 + d + d^2 features (273 for d = 16)."""
    d = x.shape[-1]
    second = (x[..., :, None] * x[..., None, :]).flatten(-2) / (2**0.5 * d**0.5)
    return torch.cat([torch.ones_like(x[..., :1]), x / d**0.25, second], dim=-1)


def _segment(q, k, v, state, norm, c, eps):
    b, t, h, d_f = q.shape
    e = v.shape[-1]
    n = -(-t // c)
    pad = n * c - t
    qb, kb, vb = (F.pad(x, (0, 0, 0, 0, 0, pad)).view(b, n, c, h, -1).permute(0, 3, 1, 2, 4)
                  for x in (q, k, v))  # (B, H, N, C, .)
    s = torch.matmul(qb, kb.transpose(-1, -2)) / d_f**0.5
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    kernel = (1 + s + s * s / 2).masked_fill(~causal, 0)
    num = torch.matmul(kernel, vb)
    den = kernel.sum(-1, keepdim=True)

    phi_q, phi_k = taylor_features(qb), taylor_features(kb)  # (B, H, N, C, F)
    if pad:  # a padded key's features are not zero (the constant 1): keep them out of the carried normaliser
        real = (torch.arange(n * c, device=q.device) < t).view(n, c, 1).to(phi_k.dtype)
        phi_k = phi_k * real
    block_state = torch.matmul(phi_k.transpose(-1, -2), vb)  # (B, H, N, F, e)
    block_norm = phi_k.sum(dim=3)  # (B, H, N, F)
    # The state entering block n holds everything before it: the incoming state plus blocks < n.
    states = torch.cat([state[:, :, None], block_state], dim=2).cumsum(dim=2)
    norms = torch.cat([norm[:, :, None], block_norm], dim=2).cumsum(dim=2)
    num = num + torch.matmul(phi_q, states[:, :, :-1])
    den = den + torch.matmul(phi_q, norms[:, :, :-1, :, None])
    out = (num / (den + eps)).permute(0, 2, 3, 1, 4).reshape(b, n * c, h, e)[:, :t]
    return out, states[:, :, -1], norms[:, :, -1]


def chunk_based_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6,
                                 initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
                                 block: int = BLOCK, segment: int = SEGMENT):
    """-> (out (B, T, H, e) in q's dtype, (S (B, H, F, e), z (B, H, F)) in float32/float64)."""
    b, t, h, d_f = q.shape
    e = v.shape[-1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_feat = 1 + d_f + d_f * d_f
    if initial_state is None:
        state = torch.zeros(b, h, n_feat, e, dtype=compute, device=q.device)
        norm = torch.zeros(b, h, n_feat, dtype=compute, device=q.device)
    else:
        state, norm = (x.to(compute) for x in initial_state)
    outs = []
    # split, not q[:, a:b]: every slice's backward would allocate a zero gradient of the whole sequence
    for qs, ks, vs in zip(*(x.to(compute).split(segment, dim=1) for x in (q, k, v)), strict=True):
        out, state, norm = _segment(qs, ks, vs, state, norm, min(block, t), eps)
        outs.append(out)
    return torch.cat(outs, dim=1).to(q.dtype), (state, norm)
