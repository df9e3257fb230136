"""HybridLM: token embedding -> pre-norm blocks (mixer + SwiGLU MLP) -> RMSNorm -> tied or untied head.

Block i's mixer is `model.pattern[i % len(pattern)]`, looked up in the layer-type registry.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import MIXERS
from models.rope import RotaryEmbedding


def layer_types(cfg) -> list[str]:
    """The layer type of each of the `cfg.n_layers` blocks: the pattern repeated (and cut) to length."""
    return [cfg.pattern[i % len(cfg.pattern)] for i in range(cfg.n_layers)]


def ffn_width(cfg) -> int:
    return cfg.ffn_dim or 64 * math.ceil(8 * cfg.d_model / 3 / 64)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.down.is_residual_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg, layer_idx: int, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = MIXERS[layer_type](cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, ffn_width(cfg))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), rope)
        return x + self.mlp(self.mlp_norm(x))


class HybridLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (the trainer fills it from the tokenizer)")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i, kind) for i, kind in enumerate(layer_types(cfg)))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim or cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style: N(0, init_std), residual output projections scaled by 1/sqrt(2 * n_layers)."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if getattr(module, "is_residual_projection", False) else 1
                nn.init.normal_(module.weight, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (batch, seq) -> logits (batch, seq, vocab).  `positions` (seq,) are global positions."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        rope = self.rope(positions)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, rope)
        x = self.norm(x)
        return self.head(x) if self.head is not None else F.linear(x, self.embed.weight)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward = 3x forward) per token at context `seq_len`.

        6 per weight used in a matmul (the head included, the embedding lookup not), plus each layer's own
        sequence-mixing term from its layer type: causal softmax counts the keys actually attended, sliding
        windows count at most W, linear layers count a constant.
        """
        matmul_params = sum(p.numel() for name, p in self.named_parameters() if p.dim() >= 2 and "embed" not in name)
        if self.head is None:
            matmul_params += self.embed.weight.numel()
        mixing = sum(MIXERS[b.layer_type].attention_flops_per_token(self.cfg, seq_len) for b in self.blocks)
        return 6 * matmul_params + 3 * mixing
