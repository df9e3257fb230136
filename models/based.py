"""BASED: Taylor-feature linear attention (`based`) and the gated short convolution (`baseconv`).

BASED models mix three layer types: these two plus sliding-window softmax attention (`swa` with a window of
64-256).  The linear attention projects q, k to a small feature dim (16 per head) whose 2nd-order Taylor map
approximates exp(q.k); v keeps the head dim.  No positional encoding: the convolutions and the causal sum carry
order.  BaseConv: in_proj to two halves u1, u2; a depthwise causal convolution (kernel 3, bias) on u1; SiLU;
times u2; out_proj.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hylo.kernels.ops import based_linear_attention, based_step, short_conv, short_conv_prefill, short_conv_step
from hylo.kernels.varlen import DocumentView
from hylo.models.mixer import Mixer, Reduce, Saved, state_norm_scalars, with_backend
from hylo.models.registry import register_mixer


@register_mixer("based")
class BasedLinearAttention(Mixer):
    monitor_group = "states"

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
        self.feature_dim = cfg.based.feature_dim
        self.qkv = nn.Linear(cfg.d_model, self.n_heads * (2 * self.feature_dim + self.head_dim), bias=False)
        self.out = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.out.is_residual_projection = True
        self.backend = cfg.based.backend
        self.op = with_backend(based_linear_attention, self.backend)  # CP swaps in a state-passing version

    def _qkv(self, x: torch.Tensor):
        b, t, _ = x.shape
        h, f = self.n_heads, self.feature_dim
        q, k, v = self.qkv(x).split([h * f, h * f, h * self.head_dim], dim=-1)
        return q.view(b, t, h, f), k.view(b, t, h, f), v.view(b, t, h, self.head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(self.op(*self._qkv(x), cu_seqlens=cu_seqlens).flatten(2))

    @torch.no_grad()
    def monitor(self, x: torch.Tensor, positions: torch.Tensor, reduce: Reduce,
                documents: DocumentView | None = None) -> dict[str, torch.Tensor]:
        """The norm of the state after the sequence's last token (mean over the batch; with packed documents, the
        last document's), per head."""
        _, (state, _) = self.op(*self._qkv(x), output_final_state=True,
                                cu_seqlens=None if documents is None else documents.cu_seqlens)
        return state_norm_scalars(self.layer_idx, reduce(state.float().norm(dim=(-2, -1)).mean(0)))

    def prefill(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """The parallel forward of a prompt plus the state `step` would hold after it."""
        o, state = based_linear_attention(*self._qkv(x), output_final_state=True, backend=self.backend)
        return self.out(o.flatten(2)), state

    def step(self, x: torch.Tensor, pos: int, cache) -> tuple[torch.Tensor, tuple]:
        q, k, v = self._qkv(x)
        o, cache = based_step(cache, q[:, 0], k[:, 0], v[:, 0])
        return self.out(o[:, None].flatten(2)), cache

    @classmethod
    def saved_per_token(cls, model_cfg, act: int, compute: int) -> list[Saved]:
        h, f = model_cfg.n_heads, model_cfg.based.feature_dim
        hd = model_cfg.head_dim or model_cfg.d_model // h
        return [Saved("q, k, v projection (views of it)", h * (2 * f + hd) * act),
                Saved("output", h * hd * act, op_output=True),
                Saved("normaliser (fp32)", h * 4, op_output=True)]

    @classmethod
    def check_config(cls, config) -> str | None:
        if config.model.based.feature_dim < 1:
            return f"model.based.feature_dim={config.model.based.feature_dim} must be >= 1"
        return None

    @classmethod
    def attention_flops_per_token(cls, model_cfg, seq_len: int) -> float:
        hd = model_cfg.head_dim or model_cfg.d_model // model_cfg.n_heads
        f = model_cfg.based.feature_dim
        n_features = 1 + f + f * f
        # write phi(k) v^T into the state and read it with phi(q) (2 FLOPs per multiply-add each), plus the
        # normaliser and the feature map itself
        return model_cfg.n_heads * (4 * n_features * hd + 4 * n_features + f * f)


@register_mixer("baseconv")
class BaseConv(Mixer):
    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.inner = cfg.based.conv_expand * cfg.d_model
        self.kernel = cfg.based.conv_kernel
        self.in_proj = nn.Linear(cfg.d_model, 2 * self.inner, bias=False)
        self.conv = nn.Conv1d(self.inner, self.inner, self.kernel, groups=self.inner, bias=True)  # holds w, b
        self.op = short_conv  # context parallelism swaps in a version that fetches the left neighbour's inputs
        self.out = nn.Linear(self.inner, cfg.d_model, bias=False)
        self.out.is_residual_projection = True

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        u1, u2 = self.in_proj(x).chunk(2, dim=-1)
        u1 = self.op(u1, self.conv.weight[:, 0], self.conv.bias, cu_seqlens=cu_seqlens)
        return self.out(F.silu(u1) * u2)

    def prefill(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The parallel forward of a prompt plus the last kernel-1 convolution inputs `step` would hold."""
        u1, u2 = self.in_proj(x).chunk(2, dim=-1)
        y = short_conv(u1, self.conv.weight[:, 0], self.conv.bias)
        return self.out(F.silu(y) * u2), short_conv_prefill(u1, self.kernel)

    def step(self, x: torch.Tensor, pos: int, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cache: the last kernel-1 inputs of the convolution, (B, kernel-1, inner)."""
        u1, u2 = self.in_proj(x).chunk(2, dim=-1)
        y, cache = short_conv_step(cache, u1[:, 0], self.conv.weight[:, 0], self.conv.bias)
        return self.out(F.silu(y)[:, None] * u2), cache

    @classmethod
    def saved_per_token(cls, model_cfg, act: int, compute: int) -> list[Saved]:
        inner = model_cfg.based.conv_expand * model_cfg.d_model
        return [Saved("input projection (u2 is a view of it)", 2 * inner * act),
                Saved("padded u1", inner * act),
                Saved("convolution output", inner * act, op_output=True),
                Saved("silu(conv)", inner * act),
                Saved("silu(conv) * u2", inner * act)]

    @classmethod
    def check_config(cls, config) -> str | None:
        b = config.model.based
        if b.conv_kernel < 1 or b.conv_expand < 1:
            return "model.based.conv_kernel and model.based.conv_expand must be >= 1"
        return None

    @classmethod
    def attention_flops_per_token(cls, model_cfg, seq_len: int) -> float:
        inner = model_cfg.based.conv_expand * model_cfg.d_model
        return 2 * model_cfg.based.conv_kernel * inner + 2 * inner  # the convolution and the gating product
