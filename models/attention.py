"""Softmax attention mixers: full causal (`full`) and sliding window (`swa`), through PyTorch SDPA.

Window convention: with `model.window = W` a query at position i sees keys i-W+1 .. i (itself and the W-1
tokens before it).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import register_mixer
from models.rope import apply_rope


@lru_cache(maxsize=8)
def sliding_window_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """Boolean (seq, seq) mask, True where query i may attend to key j: 0 <= i - j < window."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (i - j < window)


class SoftmaxAttention(nn.Module):
    window: int | None = None

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.out.is_residual_projection = True

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1
        )
        q = apply_rope(q.view(b, t, self.n_heads, self.head_dim), *rope)
        k = apply_rope(k.view(b, t, self.n_kv_heads, self.head_dim), *rope)
        v = v.view(b, t, self.n_kv_heads, self.head_dim)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # SDPA wants (batch, heads, seq, dim)
        gqa = self.n_kv_heads != self.n_heads
        if self.window is None or self.window >= t:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            mask = sliding_window_mask(t, self.window, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.out(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    @classmethod
    def check_config(cls, config) -> str | None:
        """A reason this run's config does not suit the layer, or None."""
        return None

    @classmethod
    def context_per_token(cls, model_cfg, seq_len: int) -> float:
        """Mean number of keys a query attends to over a causal sequence of `seq_len` tokens."""
        return (seq_len + 1) / 2

    @classmethod
    def attention_flops_per_token(cls, model_cfg, seq_len: int) -> float:
        head_dim = model_cfg.head_dim or model_cfg.d_model // model_cfg.n_heads
        # QK^T and PV: 2 FLOPs per multiply-add, each over head_dim for every attended key and head.
        return 4 * model_cfg.n_heads * head_dim * cls.context_per_token(model_cfg, seq_len)


@register_mixer("full")
class FullAttention(SoftmaxAttention):
    window = None


@register_mixer("swa")
class SlidingWindowAttention(SoftmaxAttention):
    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.window = cfg.window

    @classmethod
    def check_config(cls, config) -> str | None:
        if config.model.window <= 0:
            return f"model.window={config.model.window} must be positive for 'swa' layers"
        return None

    @classmethod
    def context_per_token(cls, model_cfg, seq_len: int) -> float:
        w = min(model_cfg.window, seq_len)
        # positions 0..w-1 see i+1 keys, the rest see w keys
        return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len
