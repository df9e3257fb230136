"""The public forms the benchmarks measure hylo's ops against (benchmark-only, never used in training):

- RAT as the official code computes it: the gated scan inside chunks, RoPE at chunk granularity, then
  FlexAttention over every scanned key with a block mask "the last key of each earlier chunk, and itself" —
  written here from the paper's equations; `tests/test_kernels.py` checks its forward against hylo's oracle.
- flash-linear-attention's BASED and lightning kernels (`fla-core`, carried to the GPU as a wheel), when installed.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch


@lru_cache(maxsize=8)
def _rat_block_mask(t: int, chunk_size: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def visible(b, h, i, j):
        return ((j % chunk_size == chunk_size - 1) & (j // chunk_size < i // chunk_size)) | (i == j)
    return create_block_mask(visible, None, None, t, t, device=device)


def rat_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, chunk_size: int,
             rope_theta: float | None = None) -> torch.Tensor:
    """q, k, v, gate (B, T, H, d), T a multiple of chunk_size -> (B, T, H, d)."""
    from torch.nn.attention.flex_attention import flex_attention

    from hylo.kernels.rope import apply_rope, rope_table

    b, t, h, d = q.shape
    n = t // chunk_size
    g = gate.float().view(b, n, chunk_size, h, d)

    def scan(x):  # x~_l = g_l x~_{l-1} + (1 - g_l) x_l inside each chunk, all chunks at once
        x, acc, out = x.float().view(b, n, chunk_size, h, -1), 0, []
        for step in range(chunk_size):
            acc = g[:, :, step] * acc + (1 - g[:, :, step]) * x[:, :, step]
            out.append(acc)
        return torch.stack(out, dim=2).view(b, t, h, -1)

    k_scan, v_scan = scan(k), scan(v)
    q = q.float()
    if rope_theta is not None:
        cos, sin = rope_table(n, d, rope_theta, torch.float32, q.device)
        chunk_of = torch.arange(t, device=q.device) // chunk_size
        q, k_scan = (apply_rope(x, cos[chunk_of][:, None], sin[chunk_of][:, None]) for x in (q, k_scan))
    out = flex_attention(*(x.to(v.dtype).transpose(1, 2) for x in (q, k_scan, v_scan)),
                         block_mask=_rat_block_mask(t, chunk_size, str(q.device)))
    return out.transpose(1, 2)


def fla_available() -> bool:
    return importlib.util.find_spec("fla") is not None


def fla_lightning(q, k, v, layer_idx: int, n_layers: int) -> torch.Tensor:
    from fla.ops.lightning_attn import chunk_lightning_attn

    return chunk_lightning_attn(q, k, v, layer_idx, n_layers)[0]


def fla_based(q, k, v) -> torch.Tensor:
    from fla.ops.based import fused_chunk_based

    return fused_chunk_based(q, k, v)
