"""RAT: recurrence inside chunks of L tokens, softmax attention across the chunks' summaries.

From the pre-normed input: an output gate z (sigmoid), values v, a forget gate g (sigmoid of a linear map plus a
bias initialised to log U(1, L-1), so sigma(b) lies in [0.5, (L-1)/L]), and queries/keys projected to
`rat.qk_groups` groups tiled across the heads.  RoPE is applied as the paper does: after the in-chunk scan, at
chunk granularity (the queries and scanned keys of chunk c rotate as position c), so attention sees how many
chunks back a summary lies; the op rotates (`rope_theta`), since only it holds the scanned keys.  q, k, v reach the
op in the model's dtype (bf16 in training: tensor-core dots), the gate in fp32.  Output: out_proj(z * attn).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hylo.kernels.dispatch import upcast
from hylo.kernels.ops import rat_attention, rat_prefill, rat_step
from hylo.models.mixer import Mixer, Saved, with_backend
from hylo.models.registry import register_mixer


@register_mixer("rat")
class RAT(Mixer):
    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
        self.chunk = cfg.rat.chunk_size
        self.groups = cfg.rat.qk_groups or cfg.n_heads
        inner = self.n_heads * self.head_dim
        self.zvg = nn.Linear(cfg.d_model, 3 * inner, bias=False)
        self.gate_bias = nn.Parameter(torch.zeros(inner))
        self.qk = nn.Linear(cfg.d_model, 2 * self.groups * self.head_dim, bias=False)
        self.out = nn.Linear(inner, cfg.d_model, bias=False)
        self.out.is_residual_projection = True
        self.rope_theta = float(cfg.rope_theta)
        self.backend = cfg.rat.backend
        self.op = with_backend(rat_attention, self.backend)  # CP swaps in a version that all-gathers summaries
        self.init_special()

    @torch.no_grad()
    def init_special(self) -> None:
        """Forget-gate bias log U(1, L-1): each channel starts remembering over part of a chunk."""
        upper = max(self.chunk - 1, 1 + 1e-3)
        self.gate_bias.copy_(torch.empty_like(self.gate_bias).uniform_(1, upper).log())

    def _project(self, x: torch.Tensor):
        b, t, _ = x.shape
        shape = (b, t, self.n_heads, self.head_dim)
        z, v, g = self.zvg(x).chunk(3, dim=-1)
        g = upcast(g)  # the gate stays in fp32 (float64 in oracle tests) whatever the model's dtype
        gate = torch.sigmoid(g + self.gate_bias.to(g.dtype)).view(shape)
        q, k = (y.view(b, t, self.groups, self.head_dim).repeat(1, 1, self.n_heads // self.groups, 1)
                for y in self.qk(x).chunk(2, dim=-1))
        return torch.sigmoid(z), q, k, v.view(shape), gate

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        # positions are not needed: the op numbers the chunks itself (from each document's start), and RoPE only
        # sees chunk differences
        z, q, k, v, gate = self._project(x)
        o = self.op(q, k, v, gate, self.chunk, rope_theta=self.rope_theta, cu_seqlens=cu_seqlens)
        return self.out(z * o.flatten(2).to(z.dtype))

    def prefill(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The parallel forward of a prompt plus the cache `step` would hold after it (kept in fp32)."""
        z, q, k, v, gate = self._project(x)
        o = rat_attention(q, k, v, gate, self.chunk, rope_theta=self.rope_theta, backend=self.backend)
        k, v = k.to(gate.dtype), v.to(gate.dtype)
        return self.out(z * o.flatten(2).to(z.dtype)), rat_prefill(k, v, gate, self.chunk, self.rope_theta)

    def step(self, x: torch.Tensor, pos: int, cache: dict | None) -> tuple[torch.Tensor, dict]:
        z, q, k, v, gate = self._project(x)
        o, cache = rat_step(cache, *(y[:, 0].to(gate.dtype) for y in (q, k, v, gate)), self.chunk,
                            rope_theta=self.rope_theta)
        return self.out(z * o[:, None].flatten(2).to(z.dtype)), cache

    @classmethod
    def saved_per_token(cls, model_cfg, act: int, compute: int) -> list[Saved]:
        inner = model_cfg.n_heads * (model_cfg.head_dim or model_cfg.d_model // model_cfg.n_heads)
        return [Saved("z, v, g projection (v is a view of it)", 3 * inner * act),
                Saved("sigmoid(z)", inner * act),
                Saved("sigmoid gate (fp32)", inner * compute),
                Saved("q, k tiled over heads", 2 * inner * act),
                Saved("output", inner * act, op_output=True),
                Saved("chunk summaries of k and v", 2 * inner * act / model_cfg.rat.chunk_size, op_output=True),
                Saved("lse", model_cfg.n_heads * 4, op_output=True),
                Saved("z * output", inner * act)]

    @classmethod
    def check_config(cls, config) -> str | None:
        m = config.model
        if m.rat.chunk_size < 1:
            return f"model.rat.chunk_size={m.rat.chunk_size} must be >= 1"
        head_dim = m.head_dim or m.d_model // m.n_heads
        if head_dim % 2:
            return f"RAT rotates channel pairs (RoPE): its head dim must be even, got {head_dim}"
        groups = m.rat.qk_groups or m.n_heads
        if m.n_heads % groups:
            return f"model.n_heads={m.n_heads} must be a multiple of model.rat.qk_groups={groups}"
        if config.parallel.cp > 1 and m.rat.backend == "naive":
            return ("model.rat.backend=naive takes whole sequences only (the oracle); under context parallelism "
                    "use auto, flash, triton or chunk")
        return None

    @classmethod
    def attention_flops_per_token(cls, model_cfg, seq_len: int) -> float:
        hd = model_cfg.head_dim or model_cfg.d_model // model_cfg.n_heads
        # softmax over the earlier chunks' summaries (T/(2L) on average) plus the own key; the gated scans of
        # k and v (3 FLOPs per element each)
        keys = math.ceil(seq_len / model_cfg.rat.chunk_size) / 2 + 1
        return model_cfg.n_heads * hd * (4 * keys + 6)
