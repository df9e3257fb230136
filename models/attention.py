"""Sink-aware softmax attention mixers: full causal (`full`) and sliding window (`swa`).

Each head has a learned sink logit b_h (on by default, initialised to 0) that joins every softmax denominator
and carries no value (gpt-oss style), so a head can put mass "nowhere" instead of on the first token.  Options:
a head-wise sigmoid output gate, and for window layers StreamingLLM-style pinned first tokens.

Window convention: with `model.window = W` a query at position i sees keys i-W+1 .. i (itself and the W-1
tokens before it).

The sink monitor: when asked (`request_sink_monitor`), the next forward of each attention layer records per head
the mass on the learned sink, the mass on the first token, and the positions receiving the most attention from
a sample of queries, flagging them as *secondary sinks* above a threshold (Gu et al.'s 0.3 by default).
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import attention, attention_step
from models.registry import register_mixer
from models.rope import RotaryEmbedding, apply_rope


class SoftmaxAttention(nn.Module):
    window: int | None = None

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.out.is_residual_projection = True
        self.sink = nn.Parameter(torch.zeros(self.n_heads)) if cfg.attn.sink else None
        self.gate = nn.Linear(cfg.d_model, self.n_heads, bias=True) if cfg.attn.gate else None
        self.n_pinned = cfg.attn.pinned if self.window is not None else 0
        self.rope = RotaryEmbedding(self.head_dim, cfg.rope_theta)
        self.op = attention  # context parallelism swaps in ring / Ulysses / halo versions
        self.monitor: tuple[int, float] | None = None  # (sampled queries, threshold) for the next forward only
        self.sink_stats: dict[str, torch.Tensor] | None = None

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor):
        b, t, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], dim=-1)
        cos, sin = self.rope(positions)
        q = apply_rope(q.view(b, t, self.n_heads, hd), cos, sin)
        k = apply_rope(k.view(b, t, self.n_kv_heads, hd), cos, sin)
        return q, k, v.view(b, t, self.n_kv_heads, hd)

    def _output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            o = o * torch.sigmoid(self.gate(x)).unsqueeze(-1).to(o.dtype)
        return self.out(o.flatten(2))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x, positions)
        if self.monitor is None:
            o = self.op(q, k, v, window=self.window, sink=self.sink, n_pinned=self.n_pinned)
        else:
            o, lse = self.op(q, k, v, window=self.window, sink=self.sink, n_pinned=self.n_pinned, return_lse=True)
            self.sink_stats = sink_statistics(q, k, lse, self.sink, window=self.window, n_pinned=self.n_pinned,
                                              n_queries=self.monitor[0], threshold=self.monitor[1])
            self.monitor = None
        return self._output(x, o)

    def prefill(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The parallel forward of a prompt plus the cache `step` would hold after it."""
        q, k, v = self._qkv(x, positions)
        o = attention(q, k, v, window=self.window, sink=self.sink, n_pinned=self.n_pinned)
        n_pin = min(self.n_pinned, k.shape[1]) if self.window is not None else 0
        rest = slice(n_pin, None) if self.window is None else slice(max(n_pin, k.shape[1] - self.window), None)
        cache = {"pos": k.shape[1], "pinned_k": k[:, :n_pin], "pinned_v": v[:, :n_pin], "k": k[:, rest],
                 "v": v[:, rest]}
        return self._output(x, o), cache

    def step(self, x: torch.Tensor, pos: int, cache: dict | None) -> tuple[torch.Tensor, dict]:
        """x (B, 1, D) at global position `pos` -> (y (B, 1, D), cache)."""
        q, k, v = self._qkv(x, torch.tensor([pos], device=x.device))
        o, cache = attention_step(cache, q[:, 0], k[:, 0], v[:, 0], window=self.window, sink=self.sink,
                                  n_pinned=self.n_pinned)
        return self._output(x, o[:, None]), cache

    @classmethod
    def check_config(cls, config) -> str | None:
        """A reason this run's config does not suit the layer, or None."""
        if config.model.attn.pinned < 0:
            return f"model.attn.pinned={config.model.attn.pinned} must be >= 0"
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
        self.window = cfg.window
        super().__init__(cfg, layer_idx)

    @classmethod
    def check_config(cls, config) -> str | None:
        if config.model.window <= 0:
            return f"model.window={config.model.window} must be positive for 'swa' layers"
        return super().check_config(config)

    @classmethod
    def context_per_token(cls, model_cfg, seq_len: int) -> float:
        w = min(model_cfg.window, seq_len)
        # positions 0..w-1 see i+1 keys, the rest see w keys (pinned tokens add at most attn.pinned more)
        return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


# ------------------------------------------------------------------------------------------------ sink monitor
@torch.no_grad()
def sink_statistics(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor | None, *,
                    window: int | None, n_pinned: int = 0, n_queries: int = 64, threshold: float = 0.3,
                    top: int = 3) -> dict[str, torch.Tensor]:
    """Per-head attention-sink statistics from one forward's q (B,T,H,d), k (B,T,Hkv,d) and lse (B,H,T).

    sink_mass         mean over all queries of exp(b_h - lse): the mass on the learned sink (exact)
    first_token_mass  mean over the queries that can see token 0 of exp(s_t0 - lse)
    secondary_pos/_mass  the `top` positions other than 0 with the highest mean received attention alpha_j over
                      the last `n_queries` queries of the first sequence (only positions seen by at least a
                      quarter of them), and their alpha_j
    secondary_count   how many positions other than 0 have alpha_j > threshold: secondary sinks
    """
    b, t, h, d = q.shape
    group = h // k.shape[2]
    kh = k.float().repeat_interleave(group, dim=2)
    qf, lse = q.float(), lse.float()
    scale = d**-0.5
    pos = torch.arange(t, device=q.device)
    stats = {"sink_mass": (torch.exp(sink.float()[None, :, None] - lse).mean(dim=(0, 2)) if sink is not None
                           else torch.zeros(h, device=q.device))}
    sees_first = (pos < window) | (n_pinned > 0) if window is not None else torch.ones_like(pos, dtype=torch.bool)
    first_logit = torch.einsum("bthd,bhd->bht", qf, kh[:, 0]) * scale
    first_mass = torch.exp(first_logit - lse)[:, :, sees_first]
    stats["first_token_mass"] = first_mass.mean(dim=(0, 2))

    n = min(n_queries, t)
    rows = pos[t - n:]
    scores = torch.einsum("qhd,khd->hqk", qf[0, t - n:], kh[0]) * scale
    visible = rows[:, None] >= pos[None, :]
    if window is not None:
        visible &= (rows[:, None] - pos[None, :] < window) | (pos[None, :] < n_pinned)
    probs = torch.exp(scores - lse[0, :, t - n:, None]).masked_fill(~visible, 0)  # (H, n, T)
    seen_by = visible.sum(0)
    alpha = probs.sum(1) / seen_by.clamp(min=1)
    eligible = (seen_by >= max(1, n // 4)) & (pos > 0)
    alpha = alpha.masked_fill(~eligible, 0)
    k_top = min(top, t)
    mass, where = alpha.topk(k_top, dim=-1)
    stats.update(secondary_pos=where, secondary_mass=mass, secondary_count=(alpha > threshold).sum(-1))
    return stats


def request_sink_monitor(model: nn.Module, n_queries: int, threshold: float) -> None:
    """Ask every attention layer to record sink statistics during its next forward."""
    for module in model.modules():
        if isinstance(module, SoftmaxAttention):
            module.monitor = (n_queries, threshold)


def collect_sink_stats(model: nn.Module) -> dict[int, dict[str, torch.Tensor]]:
    """{layer index: statistics} from the attention layers that recorded them since the last request."""
    found = {}
    for module in model.modules():
        if isinstance(module, SoftmaxAttention) and module.sink_stats is not None:
            found[module.layer_idx] = module.sink_stats
            module.sink_stats = None
    return found
