"""Oracle: RAT as the paper writes it, in float64: a step-by-step gated scan of the keys and values inside each
chunk, RoPE applied *after* the scan at chunk granularity (query and scanned key of token t both rotate as
position t // L), then one masked softmax over all scanned keys."""

from __future__ import annotations

import torch

from hylo.kernels.rope import apply_rope, rope_table


def gated_scan(x: torch.Tensor, gate: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """x~_t = g_t * x~_{t-1} + (1 - g_t) * x_t along dim 1, restarting at every multiple of chunk_size."""
    out, acc = [], torch.zeros_like(x[:, 0])
    for t in range(x.shape[1]):
        acc = (1 - gate[:, t]) * x[:, t] if t % chunk_size == 0 else gate[:, t] * acc + (1 - gate[:, t]) * x[:, t]
        out.append(acc)
    return torch.stack(out, dim=1)


def rat_mask(t: int, chunk_size: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, T) bool: query t sees key j iff j ends a chunk earlier than t's, or j = t."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    chunk_end = (j % chunk_size == chunk_size - 1) & (j // chunk_size < i // chunk_size)
    return chunk_end | (i == j)


def naive_rat_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, chunk_size: int,
                        scale: float | None = None, rope_theta: float | None = None) -> torch.Tensor:
    t, d = q.shape[1], q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    k_scan, v_scan = gated_scan(k, gate, chunk_size), gated_scan(v, gate, chunk_size)
    if rope_theta is not None:
        cos, sin = rope_table(-(-t // chunk_size), d, rope_theta, q.dtype, q.device)
        chunk_of = torch.arange(t, device=q.device) // chunk_size
        cos, sin = cos[chunk_of][:, None], sin[chunk_of][:, None]
        q, k_scan = apply_rope(q, cos, sin), apply_rope(k_scan, cos, sin)
    scores = torch.einsum("bihd,bjhd->bhij", q, k_scan) * scale
    scores = scores.masked_fill(~rat_mask(t, chunk_size, q.device), float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v_scan)
