"""Oracle: softmax attention as one masked score matrix (quadratic memory; run it in float64)."""

from __future__ import annotations

import torch


def visible(t_q: int, t_k: int, *, causal: bool, window: int | None, n_pinned: int = 0,
            device: torch.device | None = None) -> torch.Tensor:
    """(t_q, t_k) bool: may query i see key j?  Queries are the last t_q of the t_k positions.

    Causal: j <= i.  Window W: additionally i - j < W (itself and the W-1 keys before it), except for the first
    `n_pinned` keys, which stay visible to every later query (StreamingLLM).
    """
    i = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    j = torch.arange(t_k, device=device)[None, :]
    mask = j <= i if causal else torch.ones(t_q, t_k, dtype=torch.bool, device=device)
    if window is not None:
        mask = mask & ((i - j < window) | (j < n_pinned))
    return mask


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    window: int | None = None, sink: torch.Tensor | None = None, scale: float | None = None,
                    n_pinned: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Tq, H, d), k/v (B, Tk, Hkv, d) -> (out (B, Tq, H, d), lse (B, H, Tq)).  The sink joins the softmax
    denominator of every query of its head and carries no value."""
    h, h_kv = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = k.repeat_interleave(h // h_kv, dim=2)
    v = v.repeat_interleave(h // h_kv, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    mask = visible(q.shape[1], k.shape[1], causal=causal, window=window, n_pinned=n_pinned, device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sink is not None:
        sink_col = sink.to(scores.dtype)[None, :, None, None].expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, sink_col], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    if sink is not None:
        probs = probs[..., :-1]
    out = torch.einsum("bhij,bjhd->bihd", probs, v)
    return out, lse
