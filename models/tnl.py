"""TNL (TransNormerLLM) token mixer: lightning attention with a per-layer decay schedule.

qkvu = Linear(D, 4*hidden); SiLU on q and k; optional LRPE; lightning attention with TNL's slopes for this
layer (ALiBi-style per head, scaled by 1 - l/(L-1) + 1e-5); SRMSNorm over the hidden dim; times u; out_proj.
The rest of a TNL model is set in the config: `model.mlp: sglu`, `model.norm: srms`, `model.embed_scale: true`.

LRPE (learnable relative positional encoding) maps x at position t to [x cos(t theta), x sin(t theta)] with a
learned theta per head and channel, so q_t . k_s picks up cos(theta (t - s)); it doubles the q/k dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hylo.kernels.dispatch import upcast
from hylo.kernels.ops import lightning_attention, lightning_step, tnl_slopes
from hylo.kernels.varlen import DocumentView
from hylo.models.layers import RMSNorm
from hylo.models.mixer import Mixer, Reduce, Saved, state_norm_scalars, with_backend
from hylo.models.registry import register_mixer


@register_mixer("tnl")
class TNL(Mixer):
    monitor_group = "states"

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        hidden = cfg.tnl.hidden or cfg.d_model
        self.n_heads = cfg.n_heads
        self.head_dim = hidden // cfg.n_heads
        self.qkvu = nn.Linear(cfg.d_model, 4 * hidden, bias=False)
        self.norm = RMSNorm(hidden, 1e-6, weight=False)
        self.out = nn.Linear(hidden, cfg.d_model, bias=False)
        self.out.is_residual_projection = True
        self.register_buffer("slopes", tnl_slopes(cfg.n_heads, layer_idx, cfg.n_layers), persistent=False)
        self.slope_args = (cfg.n_heads, layer_idx, cfg.n_layers)
        self.lrpe = nn.Parameter(torch.empty(cfg.n_heads, self.head_dim)) if cfg.tnl.lrpe else None
        self.backend = cfg.tnl.backend
        self.op = with_backend(lightning_attention, self.backend)  # CP swaps in a state-passing version
        self.init_special()

    @torch.no_grad()
    def init_special(self) -> None:
        if self.lrpe is not None:  # start from RoPE-like frequencies, one per channel
            freqs = 10000 ** (-torch.arange(self.head_dim, dtype=torch.float32) / self.head_dim)
            self.lrpe.copy_(freqs.expand_as(self.lrpe))

    def _lrpe(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.lrpe is None:
            return x
        angle = positions.to(torch.float32)[:, None, None] * self.lrpe.float()  # (T, H, d)
        x32 = upcast(x)
        return torch.cat([x32 * angle.cos(), x32 * angle.sin()], dim=-1).to(x.dtype)

    def _project(self, x: torch.Tensor, positions: torch.Tensor):
        b, t, _ = x.shape
        q, k, v, u = self.qkvu(x).chunk(4, dim=-1)
        shape = (b, t, self.n_heads, self.head_dim)
        q = self._lrpe(F.silu(q).view(shape), positions)
        k = self._lrpe(F.silu(k).view(shape), positions)
        return q, k, v.view(shape), u

    def _output(self, o: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(o.flatten(2)).to(u.dtype) * u)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v, u = self._project(x, positions)
        return self._output(self.op(q, k, v, self.slopes, cu_seqlens=cu_seqlens), u)

    @torch.no_grad()
    def monitor(self, x: torch.Tensor, positions: torch.Tensor, reduce: Reduce,
                documents: DocumentView | None = None) -> dict[str, torch.Tensor]:
        """The norm of the state after the sequence's last token (mean over the batch; with packed documents, the
        last document's), per head."""
        q, k, v, _ = self._project(x, positions)
        _, state = self.op(q, k, v, self.slopes, output_final_state=True,
                           cu_seqlens=None if documents is None else documents.cu_seqlens)
        return state_norm_scalars(self.layer_idx, reduce(state.float().norm(dim=(-2, -1)).mean(0)))

    def prefill(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The parallel forward of a prompt plus the state `step` would hold after it."""
        q, k, v, u = self._project(x, positions)
        o, state = lightning_attention(q, k, v, self.slopes, output_final_state=True, backend=self.backend)
        return self._output(o, u), state

    def step(self, x: torch.Tensor, pos: int, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v, u = self._project(x, torch.tensor([pos], device=x.device))
        o, cache = lightning_step(cache, q[:, 0], k[:, 0], v[:, 0], self.slopes)
        return self._output(o[:, None], u), cache

    def rebuild_buffers(self) -> None:
        """Recompute the slopes from the config (no checkpoint stores them; see RotaryEmbedding.rebuild_buffers)."""
        device = self.slopes.device if self.slopes.device.type != "meta" else torch.device("cpu")
        self.slopes = tnl_slopes(*self.slope_args).to(device)

    @classmethod
    def saved_per_token(cls, model_cfg, act: int, compute: int) -> list[Saved]:
        hidden = model_cfg.tnl.hidden or model_cfg.d_model
        rotated = 2 * hidden * act if model_cfg.tnl.lrpe else 0  # LRPE doubles q and k
        saved = [Saved("q, k, v, u projection (v, u are views of it)", 4 * hidden * act),
                 Saved("silu(q), silu(k)", 2 * hidden * act + rotated),
                 Saved("output", hidden * act, op_output=True),
                 Saved("SRMSNorm statistics", compute),
                 Saved("normed output", hidden * compute),
                 Saved("normed output * u", hidden * act)]
        if act != compute:
            saved.append(Saved("normed output cast for the product", hidden * act))
        return saved

    @classmethod
    def check_config(cls, config) -> str | None:
        m = config.model
        hidden = m.tnl.hidden or m.d_model
        if hidden % m.n_heads:
            return f"model.tnl.hidden={hidden} must be divisible by model.n_heads={m.n_heads}"
        return None

    @classmethod
    def attention_flops_per_token(cls, model_cfg, seq_len: int) -> float:
        hidden = model_cfg.tnl.hidden or model_cfg.d_model
        d_qk = 2 * hidden if model_cfg.tnl.lrpe else hidden
        # write k^T v into the (d_qk x d_v) state per head and read it with q: 2 x 2 FLOPs per state element
        return 4 * d_qk * (hidden // model_cfg.n_heads)
