"""Rotary position embeddings: the rotation itself, shared by the layers (models/rope.py) and the ops that rotate
inside themselves (RAT rotates its scanned keys by their chunk index, kernels/rat)."""

from __future__ import annotations

import torch

from hylo.kernels.dispatch import upcast


def inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/d) for i < d/2, computed in float64 (then cast by the caller)."""
    if head_dim % 2:
        raise ValueError(f"RoPE rotates channel pairs: the head dim must be even, got {head_dim}")
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (n,) -> cos, sin (n, d/2) in inv_freq's dtype (float32 in the layers, float64 in oracle tests)."""
    angles = positions.to(inv_freq.dtype)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[..., i], x[..., i + d/2]) by the angles whose cos/sin broadcast against x[..., :d/2]
    (for x (B, T, H, d): cos/sin (T, 1, d/2)).  Computes in at least float32, returns x's dtype."""
    x1, x2 = upcast(x).chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)


def rope_table(n: int, head_dim: int, theta: float, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (n, d/2) of positions 0..n-1, computed in `dtype` (at least float32)."""
    inv_freq = inverse_frequencies(head_dim, theta).to(device=device, dtype=torch.promote_types(dtype, torch.float32))
    return rope_cos_sin(torch.arange(n, device=device), inv_freq)
